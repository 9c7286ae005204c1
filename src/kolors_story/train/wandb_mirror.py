"""The W&B mirror of a run's metrics.jsonl: loss/lr, the story panel per checkpoint and a per-scene
score table. It only mirrors: any W&B failure (init or a later call) prints a warning and turns the
mirror off; training goes on with metrics.jsonl alone."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from kolors_story.records import CheckpointRecord


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

    def log_checkpoint(self, record: CheckpointRecord, run_dir: Path, scenes: list | None = None) -> None:
        """Scores as scalars, the panel as an image and a per-scene table (with each image); the
        validation loss (when there is a held-out split)."""
        if self.run is not None and record.get("val_loss") is not None:
            self.log({"val/loss": float(record["val_loss"])}, step=int(record["step"]))
        if self.run is not None and record.get("reward_held_out") is not None:
            self.log({"val/reward_held_out": float(record["reward_held_out"])}, step=int(record["step"]))
        ema = record.get("ema") or {}
        numbers = {f"val_ema/{'loss' if k == 'val_loss' else k}": float(ema[k]) for k in
                   ("mean", "min", "coherence", "clip_t", "story_objective", "val_loss") if ema.get(k) is not None}
        if self.run is not None and numbers:
            self.log(numbers, step=int(record["step"]))
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
            for key in ("coherence", "clip_t", "copy_paste", "story_objective"):
                if record.get(key) is not None:
                    data[f"val/{key}"] = record[key]
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
