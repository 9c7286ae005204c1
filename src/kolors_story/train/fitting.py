"""Running Lightning's fit for a run: the Trainer built from the ``trainer`` settings, and how the
fit ended (finished, failed, interrupted) with its exit code, instead of an exception."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from kolors_story.config import TrainSettings
from kolors_story.train.checkpoints import CheckpointCallback
from kolors_story.train.devices import resolve_strategy
from kolors_story.train.module import KolorsLoraModule, NonFiniteLossError
from kolors_story.train.stopping import EXIT_CODES

HANDOFF_ENV = "KOLORS_STORY_TRAIN_HANDOFF"  # parent -> DDP child processes: what to train on


def lightning_trainer(job: TrainSettings, run_dir: Path, loader, module: KolorsLoraModule, precision: str,
                       callbacks: list) -> L.Trainer:
    """A Lightning Trainer for the run; sets the module's schedule length (total optimizer steps)."""
    t = job.trainer
    max_steps = int(t.max_steps if t.max_steps is not None else -1)
    accumulate = int(t.accumulate_grad_batches or 1)
    max_epochs = t.max_epochs
    if max_epochs is None:  # until max_steps: enough epochs to reach it
        max_epochs = math.ceil(max_steps * accumulate / len(loader)) if max_steps > 0 else 1
    per_epoch = math.ceil(len(loader) / accumulate)
    # Passed in, not read from estimated_stepping_batches: that would set up the dataloader before a
    # checkpoint's loader state is restored.
    module.total_steps = min(max_steps, per_epoch * max_epochs) if max_steps > 0 else per_epoch * max(max_epochs, 1)
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=int(t.num_nodes or 1),
        strategy=resolve_strategy(t.strategy), precision=precision, max_epochs=int(max_epochs), max_steps=max_steps,
        accumulate_grad_batches=accumulate, gradient_clip_val=t.gradient_clip_val, logger=False,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=t.progress_bar,
        use_distributed_sampler=False,  # StreamBatchSampler shards by rank itself
        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(run_dir), callbacks=callbacks,
    )


def fit(trainer: L.Trainer, module, loader, callback: CheckpointCallback, resume_from, handoff: dict | None):
    """``trainer.fit``; returns (status, error, exit code): finished, stopped (SIGTERM/SIGINT: a
    checkpoint at the step it stopped), failed (a non-finite loss) or interrupted (Ctrl-C seen as an
    exception); other errors propagate. ``handoff``: what DDP child processes need (their environment)."""
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT after a Ctrl-C; restored below
    if handoff is not None:
        os.environ[HANDOFF_ENV] = json.dumps(handoff)
    try:
        trainer.fit(module, loader, ckpt_path=str(resume_from) if resume_from else None)
    except NonFiniteLossError as exc:
        return "failed", str(exc), 1
    except SIGTERMException:  # Lightning's own SIGTERM handler: the signal came before training started
        return "stopped", "stopped by SIGTERM before the first step", EXIT_CODES["SIGTERM"]
    except (KeyboardInterrupt, SystemExit) as exc:
        if callback.stopped_at is not None:  # submitit requeued the job after its stop checkpoint, and exits
            return "stopped", f"stopped by {callback.stop.signal or 'SIGTERM'}", callback.stop.exit_code
        if not callback.interrupted and isinstance(exc, SystemExit):
            # Lightning turns Ctrl-C into SystemExit(1); anything else is a real exit from inside the fit
            return "failed", f"the training loop exited with code {exc.code} (a callback or library called exit)", 1
        return "interrupted", "KeyboardInterrupt (Ctrl-C)", 130
    finally:
        if handoff is not None:
            os.environ.pop(HANDOFF_ENV, None)
        if threading.current_thread() is threading.main_thread() and sigint is not None:
            signal.signal(signal.SIGINT, sigint)
    if isinstance(callback.exception, NonFiniteLossError):
        return "failed", str(callback.exception), 1
    if callback.stopped_at is not None:
        return "stopped", f"stopped by {callback.stop.signal or 'SIGTERM'}", callback.stop.exit_code
    return "finished", None, 0
