"""metrics.jsonl (the run's source of truth) and its W&B mirror.

``metrics.jsonl`` has one JSON object per line (see contracts): ``train`` lines (step, epoch,
loss, lr, time), ``checkpoint`` lines (scores and file paths) and a final ``status`` line. Each
line is written and flushed whole, so a killed job leaves at most one torn last line.

W&B only mirrors it. Any W&B failure (init or a later call) prints a warning and turns the
mirror off; training goes on with metrics.jsonl alone.
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterator

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run.json"


def _clean(value):
    """JSON cannot hold NaN/Inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsWriter:
    """Appends records to ``<run>/metrics.jsonl`` (appending: a resumed run continues the file)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> dict:
        line = json.dumps(_clean(record), ensure_ascii=False, default=str)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        return record


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl; a torn last line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    out = []
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class WandbMirror:
    """A W&B run fed from the same records as metrics.jsonl. ``active`` is False when W&B is off
    (mode disabled) or failed; every method is then a no-op."""

    def __init__(self, *, project: str, mode: str, run_dir: str | Path, config: dict | None = None,
                 entity: str | None = None, group: str | None = None, name: str | None = None,
                 tags: list[str] | None = None, wandb_dir: str | Path | None = None, resume_id: str | None = None):
        self.run = None
        self.mode = str(mode)
        self.error: str | None = None
        self.run_dir = Path(run_dir)
        if self.mode == "disabled":
            return
        try:
            import wandb

            folder = Path(wandb_dir) if wandb_dir else self.run_dir
            folder.mkdir(parents=True, exist_ok=True)
            kwargs: dict[str, Any] = dict(
                project=project, entity=entity, mode=self.mode, dir=str(folder), group=group, name=name,
                tags=list(tags or []), config=config or {}, reinit="finish_previous",
            )
            if resume_id:
                kwargs.update(id=resume_id, resume="allow")
            # mode= is passed explicitly: Lightning's WandbLogger(offline=True) would set
            # WANDB_MODE=dryrun for the whole process (and every later job of a multirun).
            self.run = wandb.init(**kwargs)
            self._wandb = wandb
        except Exception as exc:  # noqa: BLE001 - a dashboard problem must never stop training
            self._fail("init", exc)

    @property
    def active(self) -> bool:
        return self.run is not None

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    @property
    def files_dir(self) -> Path | None:
        """The folder of this W&B run (offline: ``wandb/offline-run-*``)."""
        if self.run is None:
            return None
        return Path(self.run.dir).parent

    def _fail(self, what: str, exc: BaseException) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"W&B {what} failed ({self.error}); training continues, metrics.jsonl stays complete. "
            "Set logger=none (or WANDB_MODE=disabled) to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        print(f"WARNING: W&B {what} failed ({self.error}); continuing with metrics.jsonl only")
        if self.run is not None:
            try:
                self.run.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                pass
        self.run = None

    def log(self, data: dict, step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(data, step=int(step))
        except Exception as exc:  # noqa: BLE001
            self._fail("log", exc)

    def log_checkpoint(self, record: dict, run_dir: Path, scenes: list | None = None) -> None:
        """Scores as scalars, the panel as an image and a per-scene table (with each image)."""
        if self.run is None or record.get("scores") is None:
            return
        try:
            wandb = self._wandb
            step = int(record["step"])
            data: dict[str, Any] = {
                "val/mean": record["mean"],
                "val/min": record["min"],
                "val/passed": int(bool(record["passed"])),
            }
            if record.get("coherence") is not None:
                data["val/coherence"] = record["coherence"]
            if record.get("panel"):
                data["val/panel"] = wandb.Image(str(run_dir / record["panel"]),
                                                caption=f"step {step}: mean {record['mean']:.3f}")
            columns = ["step", "scene", "description", "seed", "score", "image"]
            rows = []
            for i, score in enumerate(record["scores"]):
                scene = scenes[i] if scenes and i < len(scenes) else None
                image = record.get("images", [None] * len(record["scores"]))[i]
                rows.append([
                    step, i + 1, getattr(scene, "description", ""), getattr(scene, "seed", None), float(score),
                    wandb.Image(str(run_dir / image)) if image else None,
                ])
            data["val/scores"] = wandb.Table(columns=columns, data=rows)
            self.run.log(data, step=step)
            self._best = max(getattr(self, "_best", -math.inf), float(record["mean"]))
            self.run.summary["val/best_mean"] = self._best
        except Exception as exc:  # noqa: BLE001
            self._fail("log", exc)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"W&B finish failed ({exc}); metrics.jsonl is complete", RuntimeWarning, stacklevel=2)
        self.run = None


class RunLogger:
    """Writes each record to metrics.jsonl and mirrors it to W&B (rank 0 only: other ranks get
    ``RunLogger(None)``, which does nothing)."""

    def __init__(self, run_dir: str | Path | None, wandb_mirror: WandbMirror | None = None):
        self.writer = MetricsWriter(run_dir) if run_dir is not None else None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.wandb = wandb_mirror
        self.checkpoints: list[dict] = []

    def train(self, step: int, epoch: int, loss: float, lr: float) -> None:
        if self.writer is None:
            return
        rec = {"type": "train", "step": int(step), "epoch": int(epoch), "loss": float(loss), "lr": float(lr),
               "time": time.time()}
        self.writer.write(rec)
        if self.wandb:
            self.wandb.log({"train/loss": rec["loss"], "train/lr": rec["lr"], "train/epoch": rec["epoch"]}, step=step)

    def checkpoint(self, record: dict, scenes: list | None = None) -> None:
        if self.writer is None:
            return
        rec = {"type": "checkpoint", **record}
        self.writer.write(rec)
        self.checkpoints.append(rec)
        if self.wandb:
            self.wandb.log_checkpoint(rec, self.run_dir, scenes)

    def event(self, record: dict) -> None:
        """Any other record (e.g. ``{"type": "resume", "step": ...}``); readers skip unknown types."""
        if self.writer is not None:
            self.writer.write(record)

    def status(self, status: str, step: int, error: str | None = None) -> None:
        if self.writer is None:
            return
        self.writer.write({"type": "status", "status": status, "error": error, "step": int(step)})

    def finish(self, exit_code: int = 0) -> None:
        if self.wandb:
            self.wandb.finish(exit_code)


# ------------------------------------------------------------------------------------------------
# Reading an offline W&B run back (no sync, no server): the .wandb file is a LevelDB-style log of
# protobuf ``Record`` messages. Used by the tests and handy to check what a run holds.

_HEADER = b":W&B"
_BLOCK = 32768
_REC_HEADER = 7  # crc32 (4) + length (2) + type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_wandb_records(path: str | Path) -> Iterator:
    """Yield the ``wandb_internal_pb2.Record`` messages of a ``run-<id>.wandb`` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if not data.startswith(_HEADER):
        raise ValueError(f"{path} is not a W&B run file (no :W&B header)")
    pos, pending = 7, b""
    while pos + _REC_HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _REC_HEADER:  # block trailer padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _REC_HEADER])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + _REC_HEADER : pos + _REC_HEADER + length]
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: checksum mismatch at byte {pos} (file truncated or corrupt)")
        pos += _REC_HEADER + length
        if kind == _FULL:
            payload = chunk
        elif kind == _FIRST:
            pending = chunk
            continue
        elif kind == _MIDDLE:
            pending += chunk
            continue
        else:
            payload, pending = pending + chunk, b""
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def read_wandb_run(path: str | Path) -> dict:
    """History rows (``{key: value}`` with ``_step``), config and logged file paths of an offline run.

    ``path``: the ``run-<id>.wandb`` file or its ``offline-run-*`` folder.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("run-*.wandb"))
        if not found:
            raise FileNotFoundError(f"no run-*.wandb file in {path}")
        path = found[0]
    history, config, files, run = [], {}, [], {}
    for rec in iter_wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row: dict[str, Any] = {}
            for item in rec.history.item:
                keys = list(item.nested_key) or [item.key]
                target = row
                for k in keys[:-1]:
                    target = target.setdefault(k, {})
                target[keys[-1]] = json.loads(item.value_json)
            history.append(row)
        elif kind == "run":
            run = {"id": rec.run.run_id, "project": rec.run.project, "group": rec.run.run_group,
                   "name": rec.run.display_name}
            for item in rec.run.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "files":
            files.extend(f.path for f in rec.files.files)
    return {"file": path, "history": history, "config": config, "files": files, "run": run}
