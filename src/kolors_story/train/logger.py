"""A run's log: every record goes to ``metrics.jsonl`` (the source of truth, ``records``) and to the
mirrors (W&B, TensorBoard). Rank 0 only: other ranks get ``RunLogger(None)``, which does nothing."""

from __future__ import annotations

import time
from pathlib import Path

from kolors_story.records import CharacterLine, CheckpointLine, MetricsWriter, StatusLine, TrainLine
from kolors_story.train.wandb_mirror import WandbMirror


class RunLogger:
    """Writes each record to metrics.jsonl and mirrors it to W&B and TensorBoard (each optional)."""

    def __init__(self, run_dir: str | Path | None, wandb_mirror: WandbMirror | None = None, tensorboard=None):
        self.writer = MetricsWriter(run_dir) if run_dir is not None else None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.mirrors = [m for m in (wandb_mirror, tensorboard) if m is not None]
        self.checkpoints: list[CheckpointLine] = []

    def train(self, step: int, epoch: int, loss: float, lr: float, reward: float | None = None) -> None:
        if self.writer is None:
            return
        rec = TrainLine(step=int(step), epoch=int(epoch), loss=float(loss), lr=float(lr), time=time.time())
        if reward is not None:
            rec.reward = float(reward)
        self.writer.write(rec)
        for mirror in self.mirrors:
            mirror.log({"train/loss": rec.loss, "train/lr": rec.lr, "train/epoch": rec.epoch,
                        **({"train/reward": rec.reward} if reward is not None else {})}, step=step)

    def checkpoint(self, record: CheckpointLine, scenes: list | None = None) -> None:
        if self.writer is None:
            return
        self.writer.write(record)
        self.checkpoints.append(record)
        for mirror in self.mirrors:
            mirror.log_checkpoint(record, self.run_dir, scenes)

    def character(self, record: CharacterLine) -> None:
        """A round of the character LoRA loop (train.character), logged before training's first step."""
        if self.writer is None:
            return
        self.writer.write(record)
        for mirror in self.mirrors:
            mirror.log_character(record, self.run_dir)

    def event(self, record: dict) -> None:
        """Any other record (e.g. ``{"type": "resume", "step": ...}``); readers skip unknown types."""
        if self.writer is not None:
            self.writer.write(record)

    def status(self, status: str, step: int, error: str | None = None, signal: str | None = None) -> None:
        if self.writer is None:
            return
        line = StatusLine(status=status, error=error, step=int(step))
        if signal is not None:
            line.signal = signal
        self.writer.write(line)

    def finish(self, exit_code: int = 0, preempted: bool = False) -> None:
        for mirror in self.mirrors:
            mirror.finish(exit_code, preempted=preempted)
