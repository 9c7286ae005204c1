"""A run's log: every record goes to ``metrics.jsonl`` (the source of truth, ``records``) and to the
W&B mirror. Rank 0 only: other ranks get ``RunLogger(None)``, which does nothing."""

from __future__ import annotations

import time
from pathlib import Path

from kolors_story.records import (
    CheckpointRecord,
    MetricsWriter,
    StatusRecord,
    TrainRecord,
)
from kolors_story.train.wandb_mirror import WandbMirror


class RunLogger:
    """Writes each record to metrics.jsonl and mirrors it to W&B."""

    def __init__(self, run_dir: str | Path | None, wandb_mirror: WandbMirror | None = None):
        self.writer = MetricsWriter(run_dir) if run_dir is not None else None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.wandb = wandb_mirror
        self.checkpoints: list[dict] = []

    def train(self, step: int, epoch: int, loss: float, lr: float, reward: float | None = None) -> None:
        if self.writer is None:
            return
        rec = TrainRecord(type="train", step=int(step), epoch=int(epoch), loss=float(loss), lr=float(lr),
                          time=time.time())
        if reward is not None:
            rec["reward"] = float(reward)
        self.writer.write(rec)
        if self.wandb:
            self.wandb.log({"train/loss": rec["loss"], "train/lr": rec["lr"], "train/epoch": rec["epoch"],
                            **({"train/reward": rec["reward"]} if reward is not None else {})}, step=step)

    def checkpoint(self, record: CheckpointRecord, scenes: list | None = None) -> None:
        if self.writer is None:
            return
        rec = CheckpointRecord(type="checkpoint", **record)
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
        self.writer.write(StatusRecord(type="status", status=status, error=error, step=int(step)))

    def finish(self, exit_code: int = 0) -> None:
        if self.wandb:
            self.wandb.finish(exit_code)
