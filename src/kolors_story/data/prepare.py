"""The data stage end to end: source -> preflight -> data-juicer recipe -> processed dataset."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import OmegaConf

from kolors_story.data.filtering import recipe_ops, run_recipe
from kolors_story.data.preflight import load_rgb, preflight
from kolors_story.data.processed import (
    PreparedDataset,
    clean_leftovers,
    dataset_hash,
    load_prepared,
    write_failed_report,
    write_report,
    write_train_dir,
)
from kolors_story.data.records import DataError, Dropped, SourceListing
from kolors_story.data.sources import list_source, normalise_caption

REPORT_FORMAT = 1  # bump when the processed output changes for the same inputs (forces a rebuild)
DEFAULT_MAX_PIXELS = 100_000_000


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _fingerprint(listing: SourceListing, ds_cfg, filter_cfg) -> str:
    """Everything the processed output depends on: file identities (size + mtime), captions,
    preflight settings and the recipe. Equal fingerprint -> the previous result is reused."""
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
        "on_bad_file": ds_cfg.get("on_bad_file", "skip"),
        "max_pixels": ds_cfg.get("max_pixels", DEFAULT_MAX_PIXELS),
        "filter": {"name": filter_cfg.get("name"), "process": _plain(filter_cfg.get("process", []))},
    }
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


def prepare_dataset(cfg, *, progress: bool = True) -> PreparedDataset:
    """Build (or reuse) the processed dataset of ``cfg.dataset`` filtered by ``cfg.filter`` in
    ``cfg.data_dir``. ``cfg`` is the full train config. Raises DataError with what to do when a
    step fails or removes every image; the report of a failed run goes to report.failed.json."""
    ds_cfg, filter_cfg = cfg.dataset, cfg.filter
    data_dir = Path(str(cfg.data_dir)).expanduser().resolve()
    policy = str(ds_cfg.get("on_bad_file", "skip"))
    max_pixels = ds_cfg.get("max_pixels", DEFAULT_MAX_PIXELS)
    max_pixels = int(max_pixels) if max_pixels else None
    filter_name = str(filter_cfg.get("name", "recipe"))
    process = _plain(filter_cfg.get("process", [])) or []
    recipe_ops(process)  # a malformed recipe fails before any work

    report: dict = {
        "format": REPORT_FORMAT,
        "status": "running",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": {"name": str(ds_cfg.name), "source": str(ds_cfg.source), "path": str(ds_cfg.get("path", ""))},
        "preflight": {"on_bad_file": policy, "max_pixels": max_pixels},
        "filter": {"name": filter_name, "process": process, "ran": False},
        "counts": {},
        "dropped": [],
    }

    def fail(exc: DataError):
        report.update(status="failed", step=exc.step, error=str(exc))
        if exc.report.get("dropped"):
            report["dropped"] = report["dropped"] + [d for d in exc.report["dropped"] if d not in report["dropped"]]
        exc.report = report
        write_failed_report(data_dir, report)
        return exc

    with _locked(data_dir):
        clean_leftovers(data_dir)
        try:
            listing = list_source(ds_cfg)
        except DataError as exc:
            raise fail(exc) from exc
        report["dataset"]["root"] = str(listing.root)
        report["dataset"]["captions_from"] = listing.captions_from
        report["ignored"] = listing.ignored
        report["counts"]["source"] = len(listing.candidates)
        if not listing.candidates:
            raise fail(DataError(f"the source step found no images in {listing.root} (dataset.path): add images with "
                                 f"captions, or point dataset.path elsewhere", step="source"))

        fingerprint = _fingerprint(listing, ds_cfg, filter_cfg)
        report["fingerprint"] = fingerprint
        if not ds_cfg.get("rebuild", False):
            previous = _reusable(data_dir, fingerprint)
            if previous is not None:
                return previous

        work = data_dir / "work"
        stage_dir = work / "preflight"
        if stage_dir.exists():
            shutil.rmtree(stage_dir)
        try:
            pre = preflight(listing.candidates, stage_dir, policy=policy, max_pixels=max_pixels, progress=progress)
        except DataError as exc:
            raise fail(exc) from exc
        report["dropped"] = [d.as_dict() for d in pre.dropped]
        report["converted"] = pre.converted
        report["counts"]["preflight"] = {"in": len(listing.candidates), "kept": len(pre.kept), "dropped": len(pre.dropped)}
        if not pre.kept:
            raise fail(DataError(
                f"preflight removed every image ({len(pre.dropped)} of {len(listing.candidates)} bad):\n"
                f"{_summary(pre.dropped)}\nFull list: {data_dir / 'report.failed.json'}", step="preflight"))

        by_id = {s.id: s for s in pre.kept}
        final: list[tuple[Path, str, str, int, int]] = []  # (file, caption, source name, w, h)
        if process:
            rows = [{"id": s.id, "text": s.caption, "image": [str(s.staged.resolve())]} for s in pre.kept]
            try:
                result = run_recipe(rows, process, work / "data_juicer", name=filter_name,
                                    np_workers=int(filter_cfg.get("np", 1)), timeout=filter_cfg.get("timeout"),
                                    progress=progress)
            except DataError as exc:
                raise fail(exc) from exc
            for rid, (op, reason) in sorted(result.dropped.items()):
                report["dropped"].append(Dropped(by_id[rid].name, "filter", reason, op).as_dict())
            report["filter"].update(ran=True, export=str(result.export_path), log=str(result.log_path),
                                    seconds=round(result.seconds, 2), notes=result.notes)
            report["counts"]["filter"] = {"in": len(rows), "kept": len(result.kept), "dropped": len(rows) - len(result.kept),
                                          "ops": [c.as_dict() for c in result.ops]}
            if not result.kept:
                per_op = ", ".join(f"{c.op} dropped {c.dropped}" for c in result.ops)
                raise fail(DataError(
                    f"the data-juicer recipe filter={filter_name} removed every image ({len(rows)} in, 0 kept: {per_op}). "
                    "Use larger images, another recipe (e.g. filter=relaxed) or filter=none. "
                    "(Ops that need a model from the hub keep 0 samples when offline.)", step="filter"))
            for row in result.kept:
                s = by_id[int(row["id"])]
                image = Path(row["image"][0]) if row.get("image") else s.staged
                caption = normalise_caption(row.get("text", s.caption)) or s.caption
                if image.resolve() != s.staged.resolve():  # a mapper op wrote a new image
                    rgb, _ = load_rgb(image, max_pixels)
                    image = stage_dir / f"{s.id:06d}.mapped.jpg"
                    rgb.save(image, format="JPEG", quality=95)
                    s.width, s.height = rgb.size
                final.append((image, caption, s.name, s.width, s.height))
        else:
            report["counts"]["filter"] = {"in": len(pre.kept), "kept": len(pre.kept), "dropped": 0, "ops": []}
            final = [(s.staged, s.caption, s.name, s.width, s.height) for s in pre.kept]

        items = write_train_dir(data_dir, [(f, c) for f, c, *_ in final], move=True)
        for item, (_, _, name, w, h) in zip(items, final):
            item.update(source=name, width=w, height=h)
        digest = dataset_hash([(i["sha256"], i["text"]) for i in items])
        report["counts"]["final"] = len(items)
        report["items"] = items
        report["dataset_hash"] = digest
        report["status"] = "ok"
        report_path = write_report(data_dir, report)
        shutil.rmtree(stage_dir, ignore_errors=True)  # kept images were moved into train/

    train = data_dir / "train"
    return PreparedDataset(data_dir, train, train / "metadata.csv", report, digest,
                           [(train / i["file_name"], i["text"]) for i in items], report_path, reused=False,
                           names=[i["source"] for i in items])


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


def run_data_stage(cfg) -> PreparedDataset:
    """``python train.py stage=data``: prepare the dataset and say where everything is."""
    start = time.monotonic()
    prepared = prepare_dataset(cfg)
    r = prepared.report
    counts = r.get("counts", {})
    pre, filt = counts.get("preflight", {}), counts.get("filter", {})
    state = "reused (sources, captions and recipe unchanged)" if prepared.reused else f"built in {time.monotonic() - start:.1f} s"
    print(f"Dataset {r['dataset']['name']} ({r['dataset']['source']}): {len(prepared.items)} training images, {state}")
    print(f"  source      {counts.get('source', '?')} candidates from {r['dataset'].get('root', r['dataset'].get('path'))}")
    if pre:
        print(f"  preflight   kept {pre.get('kept')}, dropped {pre.get('dropped')}")
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
