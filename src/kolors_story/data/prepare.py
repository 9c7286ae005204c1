"""The data stage end to end: source -> preflight -> curation (dedup, aesthetic threshold; optional)
-> captions (a vision-language model; optional) -> data-juicer recipe -> processed dataset."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from kolors_story.config import DatasetSettings, FilterSettings, ScorerSettings
from kolors_story.data import captioning, curation
from kolors_story.data.candidates import DataError, Dropped, SourceListing
from kolors_story.data.filtering import check_executor, recipe_ops, run_recipe
from kolors_story.data.preflight import load_rgb, preflight
from kolors_story.data.processed import (
    PreparedDataset,
    dataset_hash,
    load_prepared,
    write_failed_report,
    write_report,
    write_train_dir,
)
from kolors_story.data.sources import list_source, normalise_caption
from kolors_story.files import recover_dir

REPORT_FORMAT = 1  # bump when the processed output changes for the same inputs (forces a rebuild)


def _fingerprint(listing: SourceListing, dataset: DatasetSettings, recipe: FilterSettings,
                 scorer: ScorerSettings | None, data_dir: Path) -> str:
    """Everything the processed output depends on: file identities (size + mtime), captions,
    preflight settings, the curation (and the predictor that scored) and the recipe. Equal
    fingerprint -> the previous result is reused."""
    files = []
    for c in listing.candidates:
        stat = None
        if c.path is not None and c.path.exists():
            st = c.path.stat()
            stat = [st.st_size, st.st_mtime_ns]
        files.append([c.name, str(c.path) if c.path else None, stat, c.caption, c.problem])
    spec = {
        "format": REPORT_FORMAT,
        "files": files,
        "on_bad_file": dataset.on_bad_file,
        "max_pixels": dataset.max_pixels,
        "filter": {"name": recipe.name, "process": list(recipe.process)},
    }
    if curation.enabled(recipe):  # absent when off: fingerprints of uncurated datasets stay as they were
        spec["curation"] = {"min_aesthetic": recipe.min_aesthetic, "dedup": bool(recipe.dedup),
                            "dedup_distance": int(recipe.dedup_distance) if recipe.dedup else None,
                            "scorer": curation.scorer_fingerprint(scorer)
                            if recipe.min_aesthetic is not None and scorer is not None else None}
    if captioning.enabled(dataset):  # the captioner and the reviewed captions.csv as it stands
        spec["captions"] = {"captioner": dataset.captioner, "mode": dataset.caption_mode,
                            "language": dataset.caption_language, "max_tokens": int(dataset.captioner_max_tokens),
                            "path": str(dataset.captioner_path), "csv": captioning.captions_digest(data_dir)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


@contextlib.contextmanager
def _locked(data_dir: Path):
    """One data stage per data_dir at a time (parallel sweep jobs share it)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _summary(dropped: list[Dropped], limit: int = 8) -> str:
    lines = [f"  {d.file}: {d.reason}" for d in dropped[:limit]]
    if len(dropped) > limit:
        lines.append(f"  ... and {len(dropped) - limit} more")
    return "\n".join(lines)


class _Run:
    """One data-stage run: its report (written to report.failed.json if a step fails)."""

    def __init__(self, dataset: DatasetSettings, recipe: FilterSettings, data_dir: Path):
        self.dataset, self.recipe, self.data_dir = dataset, recipe, data_dir
        self.max_pixels = int(dataset.max_pixels) if dataset.max_pixels else None
        self.report: dict = {
            "format": REPORT_FORMAT,
            "status": "running",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dataset": {"name": str(dataset.name), "source": str(dataset.source), "path": str(dataset.path)},
            "preflight": {"on_bad_file": dataset.on_bad_file, "max_pixels": self.max_pixels},
            "filter": {"name": recipe.name, "process": list(recipe.process), "ran": False},
            "counts": {},
            "dropped": [],
        }

    def fail(self, exc: DataError) -> DataError:
        report = self.report
        report.update(status="failed", step=exc.step, error=str(exc))
        if exc.report.get("dropped"):
            report["dropped"] = report["dropped"] + [d for d in exc.report["dropped"] if d not in report["dropped"]]
        exc.report = report
        write_failed_report(self.data_dir, report)
        return exc

    def listed(self, listing: SourceListing) -> None:
        self.report["dataset"].update(root=str(listing.root), captions_from=listing.captions_from)
        self.report["ignored"] = listing.ignored
        self.report["counts"]["source"] = len(listing.candidates)
        if not listing.candidates:
            raise self.fail(DataError(f"the source step found no images in {listing.root} (dataset.path): add "
                                      "images with captions, or point dataset.path elsewhere", step="source"))

    def preflight(self, listing: SourceListing, stage_dir: Path, progress: bool):
        try:
            pre = preflight(listing.candidates, stage_dir, policy=self.dataset.on_bad_file,
                            max_pixels=self.max_pixels, progress=progress,
                            allow_uncaptioned=captioning.enabled(self.dataset), workers=int(self.dataset.workers))
        except DataError as exc:
            raise self.fail(exc) from exc
        n = len(listing.candidates)
        self.report["dropped"] = [d.as_dict() for d in pre.dropped]
        self.report["converted"] = pre.converted
        self.report["counts"]["preflight"] = {"in": n, "kept": len(pre.kept), "dropped": len(pre.dropped)}
        if not pre.kept:
            raise self.fail(DataError(
                f"preflight removed every image ({len(pre.dropped)} of {n} bad):\n{_summary(pre.dropped)}\n"
                f"Full list: {self.data_dir / 'report.failed.json'}", step="preflight"))
        return pre

    def curate(self, kept: list, scorer: ScorerSettings | None, progress: bool) -> list:
        """Dedup and the aesthetic threshold (filter.dedup, filter.min_aesthetic); the survivors."""
        if not curation.enabled(self.recipe):
            return kept
        try:
            result = curation.curate(kept, self.recipe, scorer, self.data_dir, progress)
        except DataError as exc:
            raise self.fail(exc) from exc
        self.report["dropped"] += [d.as_dict() for d in result.dropped]
        self.report["curation"] = {"min_aesthetic": self.recipe.min_aesthetic, "dedup": bool(self.recipe.dedup),
                                   "dedup_distance": int(self.recipe.dedup_distance), "scores": result.scores,
                                   "duplicate_groups": result.groups, "pictures": result.pictures}
        self.report["counts"]["curation"] = {"in": len(kept), "kept": len(result.kept),
                                             "dropped": len(kept) - len(result.kept)}
        if not result.kept:
            raise self.fail(DataError(
                f"curation removed every image ({len(kept)} in): lower filter.min_aesthetic "
                f"({self.recipe.min_aesthetic}) or filter.dedup_distance; scores are in "
                f"{self.data_dir / 'report.failed.json'}", step="curation"))
        return result.kept

    def caption(self, kept: list, progress: bool) -> list:
        """Captions from the captioner (dataset.captioner); the images that have one."""
        if not captioning.enabled(self.dataset):
            return kept
        try:
            captioned, dropped, info = captioning.caption_images(kept, self.dataset, self.data_dir, progress)
        except DataError as exc:
            raise self.fail(exc) from exc
        self.report["dropped"] += [d.as_dict() for d in dropped]
        self.report["captions"] = info
        self.report["counts"]["captions"] = {"in": len(kept), "kept": len(captioned), "dropped": len(dropped),
                                             "generated": info["generated"], "reused": info["reused"]}
        if not captioned:
            raise self.fail(DataError(f"the captioner wrote no caption for any of the {len(kept)} images; see "
                                      f"{info['file']}", step="captions"))
        return captioned

    def filter(self, kept: list, stage_dir: Path, progress: bool) -> list[tuple[Path, str, str, int, int]]:
        """The recipe's survivors as (file, caption, source name, width, height)."""
        if not self.recipe.process:
            self.report["counts"]["filter"] = {"in": len(kept), "kept": len(kept), "dropped": 0, "ops": []}
            return [(s.staged, s.caption, s.name, s.width, s.height) for s in kept]
        by_id = {s.id: s for s in kept}
        rows = [{"id": s.id, "text": s.caption, "image": [str(s.staged.resolve())]} for s in kept]
        try:
            result = run_recipe(rows, list(self.recipe.process), self.data_dir / "work" / "data_juicer",
                                name=self.recipe.name, np_workers=self.recipe.np, timeout=self.recipe.timeout,
                                executor=str(self.recipe.executor), ray_address=self.recipe.ray_address,
                                progress=progress)
        except DataError as exc:
            raise self.fail(exc) from exc
        self._record_filter(result, by_id, len(rows))
        final = []
        for row in result.kept:
            s = by_id[int(row["id"])]
            image = Path(row["image"][0]) if row.get("image") else s.staged
            caption = normalise_caption(row.get("text", s.caption)) or s.caption
            if image.resolve() != s.staged.resolve():  # a mapper op wrote a new image
                rgb, _ = load_rgb(image, self.max_pixels)
                image = stage_dir / f"{s.id:06d}.mapped.jpg"
                rgb.save(image, format="JPEG", quality=95)
                s.width, s.height = rgb.size
            final.append((image, caption, s.name, s.width, s.height))
        return final

    def _record_filter(self, result, by_id: dict, n_in: int) -> None:
        report = self.report
        for rid, (op, reason) in sorted(result.dropped.items()):
            report["dropped"].append(Dropped(by_id[rid].name, "filter", reason, op).as_dict())
        report["filter"].update(ran=True, export=str(result.export_path), log=str(result.log_path),
                                seconds=round(result.seconds, 2), notes=result.notes)
        report["counts"]["filter"] = {"in": n_in, "kept": len(result.kept), "dropped": n_in - len(result.kept),
                                      "ops": [c.as_dict() for c in result.ops]}
        if not result.kept:
            per_op = ", ".join(f"{c.op} dropped {c.dropped}" for c in result.ops)
            raise self.fail(DataError(
                f"the data-juicer recipe filter={self.recipe.name} removed every image ({n_in} in, 0 kept: {per_op}). "
                "Use larger images, another recipe (e.g. filter=relaxed) or filter=none. "
                "(Ops that need a model from the hub keep 0 samples when offline.)", step="filter"))

    def finish(self, final: list[tuple[Path, str, str, int, int]]) -> PreparedDataset:
        items = write_train_dir(self.data_dir, [(f, c) for f, c, *_ in final], move=True)
        for item, (_, _, name, w, h) in zip(items, final):
            item.update(source=name, width=w, height=h)
        digest = dataset_hash([(i["sha256"], i["text"]) for i in items])
        self.report["counts"]["final"] = len(items)
        self.report.update(items=items, dataset_hash=digest, status="ok")
        report_path = write_report(self.data_dir, self.report)
        train = self.data_dir / "train"
        return PreparedDataset(self.data_dir, train, train / "metadata.csv", self.report, digest,
                               [(train / i["file_name"], i["text"]) for i in items], report_path, reused=False,
                               names=[i["source"] for i in items])


def check_data_settings(dataset: DatasetSettings, recipe: FilterSettings) -> None:
    """Every data-stage key that can be checked without reading a file (train.py calls it before any
    work; prepare_dataset again): the recipe, the curation, the captioner, the executor, the workers."""
    recipe_ops(list(recipe.process))
    curation.check_curation(recipe)
    captioning.check_captioning(dataset)
    check_executor(str(recipe.executor))
    if int(dataset.workers) < 1:
        raise DataError(f"dataset.workers={dataset.workers}: use 1 (this process) or more processes", step="preflight")


def prepare_dataset(dataset: DatasetSettings, recipe: FilterSettings, data_dir: str | Path, *,
                    progress: bool = True, scorer: ScorerSettings | None = None) -> PreparedDataset:
    """Build (or reuse) the processed dataset of ``dataset`` filtered by ``recipe`` in ``data_dir``
    (``scorer``: the predictor for ``filter.min_aesthetic``).
    Raises DataError with what to do when a step fails or removes every image; the report of a
    failed run goes to report.failed.json."""
    data_dir = Path(str(data_dir)).expanduser().resolve()
    check_data_settings(dataset, recipe)  # a malformed recipe or key fails before any work
    run = _Run(dataset, recipe, data_dir)
    with _locked(data_dir):
        recover_dir(data_dir / "train")
        try:
            listing = list_source(dataset)
        except DataError as exc:
            raise run.fail(exc) from exc
        if captioning.enabled(dataset):
            captioning.allow_uncaptioned(listing.candidates)
        run.listed(listing)
        fingerprint = _fingerprint(listing, dataset, recipe, scorer, data_dir)
        run.report["fingerprint"] = fingerprint
        previous = None if dataset.rebuild else _reusable(data_dir, fingerprint)
        if previous is not None:
            return previous
        stage_dir = data_dir / "work" / "preflight"
        shutil.rmtree(stage_dir, ignore_errors=True)
        pre = run.preflight(listing, stage_dir, progress)
        kept = run.caption(run.curate(pre.kept, scorer, progress), progress)
        # captions.csv was (re)written: the fingerprint of this result is the one with it as it is now
        run.report["fingerprint"] = _fingerprint(listing, dataset, recipe, scorer, data_dir)
        prepared = run.finish(run.filter(kept, stage_dir, progress))
        shutil.rmtree(stage_dir, ignore_errors=True)  # kept images were moved into train/
    return prepared


def _reusable(data_dir: Path, fingerprint: str) -> PreparedDataset | None:
    """The earlier result when its fingerprint matches and its files are intact, else None."""
    path = data_dir / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if report.get("status") != "ok" or report.get("fingerprint") != fingerprint:
        return None
    try:
        return load_prepared(data_dir, verify=True)
    except (DataError, OSError, ValueError, KeyError):
        return None


def run_data_stage(dataset: DatasetSettings, recipe: FilterSettings, data_dir: str | Path,
                   scorer: ScorerSettings | None = None) -> PreparedDataset:
    """``python train.py stage=data``: prepare the dataset and say where everything is."""
    start = time.monotonic()
    prepared = prepare_dataset(dataset, recipe, data_dir, scorer=scorer)
    r = prepared.report
    counts = r.get("counts", {})
    pre, filt = counts.get("preflight", {}), counts.get("filter", {})
    state = "reused (sources, captions and recipe unchanged)" if prepared.reused else f"built in {time.monotonic() - start:.1f} s"
    print(f"Dataset {r['dataset']['name']} ({r['dataset']['source']}): {len(prepared.items)} training images, {state}")
    print(f"  source      {counts.get('source', '?')} candidates from {r['dataset'].get('root', r['dataset'].get('path'))}")
    if pre:
        print(f"  preflight   kept {pre.get('kept')}, dropped {pre.get('dropped')}")
    cur = counts.get("curation")
    if cur:
        pictures = ", ".join(r.get("curation", {}).get("pictures", []))
        print(f"  curation    kept {cur.get('kept')}, dropped {cur.get('dropped')}"
              + (f"  (see {pictures} in {prepared.data_dir})" if pictures else ""))
    caps = counts.get("captions")
    if caps:
        print(f"  captions    {caps.get('generated')} written by {r['captions']['captioner']}, {caps.get('reused')} "
              f"reused, {r['captions']['edited']} edited by you  (review: {r['captions']['file']})")
    ops = filt.get("ops") or []
    if ops:
        print(f"  filter      {r['filter']['name']}: kept {filt.get('kept')} of {filt.get('in')}  ("
              + ", ".join(f"{o['op']} -{o['dropped']}" for o in ops) + ")")
    else:
        print(f"  filter      {r['filter']['name']}: not run (no ops)")
    print(f"  train/      {prepared.train_dir}  (metadata.csv: {prepared.metadata_csv})")
    print(f"  report      {prepared.report_path}  (dropped files with reasons)")
    print(f"  hash        {prepared.dataset_hash}")
    return prepared
