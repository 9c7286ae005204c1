"""Sources: turn the ``dataset`` settings into a list of (image file, caption) candidates.

- ``folder``: images with same-name ``.txt`` captions, or a ``metadata.csv`` / ``metadata.jsonl``
  with ``file_name,text`` (the DiffSynth-Studio layout). Nothing is judged here except what only
  the listing can see (a row naming no file, a caption with no image); preflight judges the rest.
- ``lowres_anime``: the baseline's ModelScope dataset, written once into ``dataset.path`` as a
  folder with ``metadata.jsonl``, then listed like ``folder``.
- ``demo``: generated offline by code (``kolors_story.tiny.draw_demo``) into ``dataset.path``, then listed.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from kolors_story.config import DatasetSettings, ModelScopeDatasetSettings
from kolors_story.data.candidates import (
    IMAGE_EXTS,
    Candidate,
    DataError,
    Dropped,
    SourceListing,
)
from kolors_story.files import atomic_write_json, atomic_write_text

METADATA_FILES = ("metadata.csv", "metadata.jsonl")
# Files our own sources write beside the images (not reported as ignored).
MARKER_FILES = ("download.json", "demo.json")


def normalise_caption(text: str) -> str:
    """One line, single spaces: captions end up in a CSV cell and a 256-token prompt."""
    return " ".join(str(text).replace("\ufeff", "").split())


def _read_caption_file(path: Path) -> tuple[str | None, str | None]:
    """(caption, problem) of a ``.txt`` caption."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return None, f"caption file unreadable: {path.name}: {exc}"
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None, f"caption file is not UTF-8 text: {path.name}"
    text = normalise_caption(text)
    if not text:
        return None, f"empty caption: {path.name} has no text"
    return text, None


def _read_metadata(path: Path) -> list[tuple[int, str | None, str | None, str | None]]:
    """Rows of a metadata file as (row number, file_name, text, problem). Raises on an unusable file."""
    rows: list[tuple[int, str | None, str | None, str | None]] = []
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save the metadata file as UTF-8", step="source") from None
    if path.suffix == ".csv":
        reader = csv.DictReader(raw.splitlines())
        fields = [f.strip() for f in (reader.fieldnames or [])]
        if fields and not {"file_name", "text"} <= set(fields):
            raise DataError(
                f"{path}: needs the columns file_name,text (found {','.join(fields)}); "
                "the first line must be the header `file_name,text`",
                step="source",
            )
        for n, row in enumerate(reader, start=2):  # row 1 is the header
            row = {(k or "").strip(): v for k, v in row.items()}
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue  # blank line
            rows.append((n, (row.get("file_name") or "").strip() or None, row.get("text"), None))
    else:
        for n, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                rows.append((n, None, None, f"invalid JSON on line {n}: {exc}"))
                continue
            name = obj.get("file_name")
            text = obj.get("text")
            rows.append((n, str(name).strip() if name not in (None, "") else None,
                         None if text is None else str(text), None))
    return rows


class _Folder:
    """One dataset folder being listed: its root, caption rules and the outside-the-folder rule."""

    def __init__(self, root: Path, caption_prefix: str, default_caption: str | None, allow_outside: bool):
        self.root = root
        self.real_root = root.resolve()
        self.prefix = str(caption_prefix or "")
        self.default = normalise_caption(default_caption) if default_caption else None
        self.allow_outside = allow_outside

    def caption(self, text: str | None) -> str | None:
        return None if text is None else normalise_caption(self.prefix + text)

    def outside(self, path: Path, name: str) -> str | None:
        """Why ``path`` must not be read (it resolves outside the folder, e.g. ``../x.png``, an
        absolute path or a symlink pointing out), or None. Resolving follows links without opening."""
        if self.allow_outside:
            return None
        real = path.resolve()
        if real == self.real_root or self.real_root in real.parents:
            return None
        return (f"outside the dataset folder: {name} resolves to {real}, which is not inside {self.root}; "
                "copy the file into the folder (or set dataset.allow_outside=true)")

    def from_metadata(self, meta: Path, images: list[Path]) -> list[Candidate]:
        rows = _read_metadata(meta)
        if not rows:
            report = {"dropped": [Dropped(meta.name, "source", f"empty metadata: {meta.name} has no rows").as_dict()]}
            raise DataError(f"empty metadata: {meta} has no rows. Add `file_name,text` rows (one per image), "
                            "or delete it to caption images with same-name .txt files", step="source", report=report)
        candidates, seen = [], {}
        for n, name, text, problem in rows:
            where = f"{meta.name} {'row' if meta.suffix == '.csv' else 'line'} {n}"
            if problem or not name:
                candidates.append(Candidate(where, None, None, problem or f"{where}: empty file_name"))
                continue
            file = self.root / name
            caption = normalise_caption(text) if text is not None else ""
            outside = self.outside(file, name)
            if outside:  # rejected unread: not even checked for existence beyond resolving the name
                candidates.append(Candidate(name, None, self.caption(caption) if caption else None, outside))
                continue
            key = file.resolve()
            if key in seen:
                candidates.append(Candidate(name, None, None, f"duplicate: {name} is listed again in {where} (first on {seen[key]})"))
                continue
            seen[key] = n
            if not file.exists():
                candidates.append(Candidate(name, None, self.caption(caption) if caption else None,
                                            f"missing file: {where} names {name}, which is not in {self.root}"))
            elif not caption:
                candidates.append(Candidate(name, file, None, f"empty caption: {where} has no text for {name}"))
            else:
                candidates.append(Candidate(name, file, self.caption(caption)))
        for img in images:
            if img.resolve() in seen:
                continue
            if self.default:
                candidates.append(Candidate(img.name, img, self.caption(self.default)))
            else:
                candidates.append(Candidate(img.name, img, None, f"caption missing: {img.name} is not listed in {meta.name}"))
        return candidates

    def from_txt_files(self, images: list[Path], files: list[Path]) -> list[Candidate]:
        candidates = []
        for img in images:
            txt = img.with_suffix(".txt")
            outside = self.outside(txt, txt.name) if txt.is_symlink() else None  # a linked caption is not read either
            if outside:
                candidates.append(Candidate(img.name, img, None, outside))
            elif txt.is_file():
                caption, problem = _read_caption_file(txt)
                candidates.append(Candidate(img.name, img, self.caption(caption), problem))
            elif self.default:
                candidates.append(Candidate(img.name, img, self.caption(self.default)))
            else:
                candidates.append(Candidate(img.name, img, None, f"caption missing: no {txt.name} beside {img.name}"))
        stems = {p.stem for p in images}
        for txt in (p for p in files if p.suffix.lower() == ".txt" and p.stem not in stems):
            candidates.append(Candidate(txt.name, None, None, f"missing file: caption {txt.name} has no image named {txt.stem}.*"))
        return candidates


def list_folder(path: str | Path, *, caption_prefix: str = "", default_caption: str | None = None,
                allow_outside: bool = False) -> SourceListing:
    """Candidates of a folder of images (non-recursive for ``.txt`` captions; metadata rows may name
    files in sub-folders). Every file must resolve inside the folder (links followed); what does
    not is listed as a bad file and never opened, unless ``allow_outside``."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(
            f"dataset folder not found: {root} (dataset.path). Point dataset.path at a folder of images "
            "with same-name .txt captions or a metadata.csv (file_name,text)",
            step="source",
        )
    folder = _Folder(root, caption_prefix, default_caption, allow_outside)
    present = [m for m in METADATA_FILES if (root / m).is_file()]
    if len(present) > 1:
        raise DataError(f"{root} has both metadata.csv and metadata.jsonl: keep one of them", step="source")
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".") and p.name not in MARKER_FILES)
    outside = [Candidate(p.name, None, None, folder.outside(p, p.name)) for p in files if folder.outside(p, p.name)]
    files = [p for p in files if not folder.outside(p, p.name)]  # links pointing out are never read
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTS]
    if present:
        meta = root / present[0]
        if meta not in files:
            raise DataError(f"{meta} is a link to a file outside the dataset folder: keep the metadata file in "
                            f"{root} (or set dataset.allow_outside=true)", step="source")
        candidates = folder.from_metadata(meta, images)
        named = {c.name for c in candidates}
        ignored = [p.name for p in files if p not in images and p != meta and p.suffix.lower() != ".txt"]
        return SourceListing(root, candidates + [c for c in outside if c.name not in named], meta.name, ignored)
    candidates = folder.from_txt_files(images, files)
    ignored = [p.name for p in files if p not in images and p.suffix.lower() != ".txt"]
    return SourceListing(root, candidates + outside, ".txt files", ignored)


# --------------------------------------------------------------------------- ModelScope source

def _save_ms_image(image, folder: Path, index: int) -> str:
    """Write one dataset image losslessly; returns its file name."""
    from PIL import Image

    if isinstance(image, (str, Path)):  # some loaders yield file paths
        src = Path(image)
        name = f"{index:06d}{src.suffix.lower() or '.img'}"
        shutil.copyfile(src, folder / name)
        return name
    if not isinstance(image, Image.Image):
        raise TypeError(f"row has no PIL image (got {type(image).__name__})")
    name = f"{index:06d}.png"
    img = image if image.mode in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA") else image.convert("RGB")
    img.save(folder / name, format="PNG")
    return name


def fetch_modelscope(dataset: ModelScopeDatasetSettings, raw_dir: str | Path) -> Path:
    """Write the ModelScope dataset ``dataset.repo`` into ``raw_dir`` (images/ + metadata.jsonl) once;
    later calls reuse it. Network or import problems raise a DataError that says what to do."""
    raw_dir = Path(raw_dir)
    spec = {"repo": dataset.repo, "subset": dataset.subset, "split": dataset.split, "limit": dataset.limit,
            "caption": dataset.caption}
    marker = raw_dir / "download.json"
    if marker.is_file() and (raw_dir / "metadata.jsonl").is_file():
        try:
            if json.loads(marker.read_text(encoding="utf-8")).get("spec") == spec:
                return raw_dir
        except ValueError:
            pass  # a damaged marker: download again
    what = f"ModelScope dataset {spec['repo']} (subset {spec['subset']}, split {spec['split']})"
    try:
        from modelscope.msdatasets import MsDataset
    except Exception as exc:
        raise DataError(
            f"cannot load {what}: modelscope's dataset loader does not import ({type(exc).__name__}: {exc}). "
            "Install its dataset extras (`pip install \"modelscope[datasets]\"`, which brings addict), "
            "or download the images elsewhere and use dataset=folder dataset.path=<folder>",
            step="source",
        ) from exc
    advice = (
        "This source downloads from modelscope.cn on first use: check the network/proxy, "
        "or download it on a connected machine and use dataset=folder dataset.path=<folder>"
    )
    try:
        ds = MsDataset.load(spec["repo"], subset_name=spec["subset"], split=spec["split"],
                            cache_dir=str(raw_dir / "modelscope_cache"))
    except Exception as exc:
        raise DataError(f"could not download {what}: {type(exc).__name__}: {exc}. {advice}", step="source") from exc

    images = raw_dir / "images"
    if images.exists():
        shutil.rmtree(images)
    images.mkdir(parents=True)
    rows, errors = [], []
    limit = spec["limit"]
    try:
        for i, row in enumerate(tqdm(ds, desc=f"{spec['repo']}: writing images", unit="img", dynamic_ncols=True)):
            if limit is not None and i >= int(limit):
                break
            try:
                name = _save_ms_image(row["image"], images, i)
            except Exception as exc:  # noqa: BLE001 - one bad row must not stop the download
                errors.append({"file": f"{spec['repo']} row {i}", "reason": f"image not readable: {type(exc).__name__}: {exc}"})
                continue
            text = spec["caption"] if spec["caption"] is not None else row.get("text")
            rows.append({"file_name": f"images/{name}", "text": "" if text is None else str(text)})
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"download of {what} failed part-way: {type(exc).__name__}: {exc}. {advice}", step="source") from exc
    if not rows:
        raise DataError(f"{what} yielded no images ({len(errors)} unreadable rows)", step="source")
    atomic_write_text(raw_dir / "metadata.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_json(marker, {"spec": spec, "images": len(rows), "errors": errors})
    return raw_dir


def _download_errors(raw_dir: Path) -> list[Candidate]:
    try:
        errors = json.loads((raw_dir / "download.json").read_text(encoding="utf-8")).get("errors", [])
    except (OSError, ValueError):
        return []
    return [Candidate(e["file"], None, None, e["reason"]) for e in errors]


# --------------------------------------------------------------------------- dispatch

SOURCES = ("folder", "lowres_anime", "demo")


def list_source(dataset: DatasetSettings) -> SourceListing:
    """Materialise (lowres_anime, demo) and list the configured source."""
    source = str(dataset.source)
    prefix, default = dataset.caption_prefix or "", dataset.default_caption
    outside = dataset.allow_outside
    if source == "folder":
        return list_folder(dataset.path, caption_prefix=prefix, default_caption=default, allow_outside=outside)
    if source == "demo":
        from kolors_story import tiny

        folder = tiny.draw_demo(dataset)
        return list_folder(folder, caption_prefix=prefix, default_caption=default, allow_outside=outside)
    if source == "lowres_anime":
        if not isinstance(dataset, ModelScopeDatasetSettings):
            raise DataError("dataset.source=lowres_anime needs the ModelScope keys (repo, subset, split, limit, "
                            "caption): use dataset=lowres_anime", step="source")
        folder = fetch_modelscope(dataset, dataset.path)
        listing = list_folder(folder, caption_prefix=prefix, default_caption=default, allow_outside=outside)
        listing.candidates.extend(_download_errors(folder))
        return listing
    raise DataError(f"dataset.source={source!r} is not known: use one of {', '.join(SOURCES)}", step="source")
