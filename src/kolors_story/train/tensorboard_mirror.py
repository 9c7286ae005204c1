"""A TensorBoard mirror of a run's metrics.jsonl (``logger=tensorboard``, or ``logger.tensorboard=true``
beside W&B): Lightning's ``TensorBoardLogger`` writes ``<run>/tensorboard/`` event files with the same
scalars as W&B (train/loss, train/lr, val/mean ...) and each checkpoint's story panel as an image.
It only mirrors: a failure prints a warning and turns it off; metrics.jsonl stays complete."""

from __future__ import annotations

import warnings
from pathlib import Path

TENSORBOARD_DIR = "tensorboard"  # <run>/tensorboard/: `tensorboard --logdir <run>/tensorboard`


class TensorBoardMirror:
    """The same calls as ``WandbMirror`` (log, log_checkpoint, log_character, finish), into TensorBoard event files."""

    def __init__(self, run_dir: str | Path):
        self.error: str | None = None
        self.logger = None
        try:
            from lightning.pytorch.loggers import TensorBoardLogger

            self.logger = TensorBoardLogger(save_dir=str(run_dir), name=TENSORBOARD_DIR, version="",
                                            default_hp_metric=False)
        except Exception as exc:  # noqa: BLE001 - a missing tensorboard package must not stop training
            self._fail("start", exc)

    @property
    def folder(self) -> Path | None:
        return Path(self.logger.log_dir) if self.logger is not None else None

    def _fail(self, what: str, exc: BaseException) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"TensorBoard {what} failed ({self.error}); metrics.jsonl is complete", RuntimeWarning,
                      stacklevel=3)
        self.logger = None

    def log(self, data: dict, step: int) -> None:
        if self.logger is None:
            return
        try:
            self.logger.log_metrics({k: float(v) for k, v in data.items()}, step=int(step))
        except Exception as exc:  # noqa: BLE001
            self._fail("log", exc)

    def log_character(self, record, run_dir: Path) -> None:
        """A character round's similarities, at the round's number as the step."""
        self.log({"character/cluster_similarity": record.cluster_similarity, "character/cluster_excess": record.cluster_excess,
                  "character/candidates_similarity": record.candidates_similarity,
                  "character/cluster_size": record.cluster_size}, record.round)

    def log_checkpoint(self, record, run_dir: Path, scenes: list | None = None) -> None:
        """The checkpoint's numbers as scalars and its panel as an image."""
        numbers = {f"val/{k}": getattr(record, k) for k in ("mean", "min", "coherence", "clip_t", "copy_paste",
                                                            "story_objective") if getattr(record, k) is not None}
        numbers |= {"val/loss": record.val_loss} if record.val_loss is not None else {}
        numbers |= {"val/reward_held_out": record.reward_held_out} if record.reward_held_out is not None else {}
        self.log(numbers, record.step)
        if self.logger is None or not record.panel:
            return
        try:
            import numpy as np
            from PIL import Image

            with Image.open(Path(run_dir) / record.panel) as im:
                panel = np.asarray(im.convert("RGB"))
            self.logger.experiment.add_image("val/panel", panel, global_step=int(record.step), dataformats="HWC")
        except Exception as exc:  # noqa: BLE001
            self._fail("image", exc)

    def finish(self, exit_code: int = 0, preempted: bool = False) -> None:
        if self.logger is not None:
            self.logger.finalize("success" if exit_code == 0 else "failed")
