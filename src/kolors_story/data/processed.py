"""The processed dataset: ``<data_dir>/train/<n>.jpg`` + ``train/metadata.csv`` (file_name,text, the
DiffSynth-Studio layout) and ``<data_dir>/report.json``.

``train/`` is built in a temp folder and swapped in (``files.atomic_dir``), and report.json is
written atomically after it, so an interrupted run leaves the previous dataset whole.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from kolors_story.data.cache_files import CacheError
from kolors_story.data.candidates import DataError
from kolors_story.files import atomic_dir, atomic_write_json, file_sha256

REPORT_NAME = "report.json"
FAILED_REPORT_NAME = "report.failed.json"


@dataclass
class PreparedDataset:
    data_dir: Path
    train_dir: Path
    metadata_csv: Path
    report: dict
    dataset_hash: str
    items: list[tuple[Path, str]]  # (image path, caption) in metadata.csv order
    report_path: Path | None = None
    reused: bool = False  # True when an unchanged earlier result was returned as is
    names: list[str] = field(default_factory=list)  # original file of each item (source-relative)


def dataset_hash(pairs: list[tuple[str, str]]) -> str:
    """Hash of (image bytes sha256, caption) pairs in order: same pixels + captions -> same hash,
    whatever the folder is called."""
    h = hashlib.sha256()
    for image_sha, caption in pairs:
        h.update(f"{image_sha}\t{caption}\n".encode("utf-8"))
    return h.hexdigest()


def metadata_csv_text(rows: list[tuple[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file_name", "text"])
    writer.writerows(rows)
    return buf.getvalue()


def read_metadata_csv(path: str | Path) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return [(row["file_name"], row["text"]) for row in csv.DictReader(f)]


def write_train_dir(data_dir: Path, images: list[tuple[Path, str]], *, move: bool = True) -> list[dict]:
    """Put ``images`` ([(RGB JPEG file, caption)]) into a fresh ``train/`` as 0.jpg, 1.jpg, ...
    with metadata.csv, replacing the old one only once the new one is complete.
    Returns one dict per item: file_name, text, sha256."""
    items = []
    with atomic_dir(Path(data_dir) / "train") as tmp:
        for n, (src, caption) in enumerate(images):
            name = f"{n}.jpg"
            (os.replace if move else shutil.copyfile)(src, tmp / name)
            items.append({"file_name": name, "text": caption, "sha256": file_sha256(tmp / name)})
        (tmp / "metadata.csv").write_text(metadata_csv_text([(i["file_name"], i["text"]) for i in items]),
                                          encoding="utf-8")
    return items


def write_report(data_dir: Path, report: dict) -> Path:
    path = atomic_write_json(data_dir / REPORT_NAME, report)
    failed = data_dir / FAILED_REPORT_NAME
    if failed.exists():
        failed.unlink()
    return path


def write_failed_report(data_dir: Path, report: dict) -> Path:
    """A failed run's report goes beside (not over) the last good one, which still matches train/."""
    return atomic_write_json(data_dir / FAILED_REPORT_NAME, report)


def load_prepared(data_dir: str | Path, *, verify: bool = True) -> PreparedDataset:
    """The processed dataset already in ``data_dir`` (for ``stage=train``). With ``verify`` the
    images are re-hashed and must match report.json's dataset hash."""
    data_dir = Path(data_dir).resolve()
    train = data_dir / "train"
    csv_path = train / "metadata.csv"
    report_path = data_dir / REPORT_NAME
    if not csv_path.is_file() or not report_path.is_file():
        raise DataError(f"no processed dataset in {data_dir} (train/metadata.csv + report.json): run "
                        "`python train.py stage=data` first", step="processed")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    rows = read_metadata_csv(csv_path)
    items = [(train / name, text) for name, text in rows]
    missing = [str(p) for p, _ in items if not p.is_file()]
    if missing:
        raise DataError(f"processed dataset in {data_dir} is incomplete: {len(missing)} image(s) missing, e.g. {missing[0]}; "
                        "rerun `python train.py stage=data dataset.rebuild=true`", step="processed")
    digest = report.get("dataset_hash", "")
    if verify:
        digest = dataset_hash([(file_sha256(p), t) for p, t in items])
        if digest != report.get("dataset_hash"):
            raise DataError(f"processed dataset in {data_dir} does not match its report.json (files changed by hand?); "
                            "rerun `python train.py stage=data dataset.rebuild=true`", step="processed")
    names = [i.get("source", "") for i in report.get("items", [])]
    return PreparedDataset(data_dir, train, csv_path, report, digest, items, report_path, reused=True, names=names)


# ------------------------------------------------------------------ read back (the cache's input)


def _resolve(train: Path, p: Path) -> Path:
    return p if p.is_absolute() or not (train / p).exists() and p.exists() else train / p


def _read_processed_folder(root: Path) -> tuple[Path, list[tuple[Path, str]]]:
    train = root / "train" if (root / "train" / "metadata.csv").exists() else root
    csv_path = train / "metadata.csv"
    if not csv_path.is_file():
        raise CacheError(
            f"No processed dataset at {root}: expected {root / 'train' / 'metadata.csv'} (file_name,text). "
            "Prepare it first with `python train.py stage=data`."
        )
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = {"file_name", "text"} - set(reader.fieldnames or [])
        if missing:
            raise CacheError(f"{csv_path} lacks column(s) {sorted(missing)} (has {reader.fieldnames}).")
        return train, [(train / row["file_name"], row["text"] or "") for row in reader]


def dataset_items(prepared) -> tuple[list[tuple[Path, str]], str | None]:
    """(image path, caption) pairs and the dataset hash of a ``PreparedDataset`` (duck-typed) or a
    processed folder (``<dir>/train/metadata.csv``)."""
    if isinstance(prepared, (str, os.PathLike)):
        train, items = _read_processed_folder(Path(prepared))
        dataset_hash = None
    else:
        train = Path(prepared.train_dir)
        # paths may be absolute, relative to train_dir, or relative to the working directory
        items = [(_resolve(train, Path(p)), str(t)) for p, t in prepared.items]
        dataset_hash = getattr(prepared, "dataset_hash", None)
    if not items:
        raise CacheError(f"The processed dataset in {train} has no images: nothing to cache.")
    missing = [str(p) for p, _ in items if not p.is_file()]
    if missing:
        raise CacheError(
            f"{len(missing)} image(s) listed in {train / 'metadata.csv'} do not exist, e.g. {missing[:3]}. "
            "Re-run `python train.py stage=data`."
        )
    return items, dataset_hash
