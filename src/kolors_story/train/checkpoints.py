"""The run's callback: a ``train`` line per optimizer step, a checkpoint every N steps and at the
end (LoRA in three formats, the validation story + scores, the trainer state for resume=), and
one more on Ctrl-C.

A checkpoint folder ``<run>/checkpoints/step-XXXXXX/`` is built beside its final name and swapped
in whole (``files.atomic_dir``), then ``checkpoints/last`` is pointed at it: a killed run never
leaves a half-written checkpoint in use. With DDP only rank 0 writes files and talks to W&B.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch

from kolors_story.files import atomic_dir, atomic_write_text
from kolors_story.lora import save_lora
from kolors_story.records import (
    CHECKPOINTS,
    LAST_FILE,
    TRAINER_STATE,
    CheckpointRecord,
    checkpoint_name,
)
from kolors_story.train.held_out import held_out_loss
from kolors_story.train.logger import RunLogger
from kolors_story.train.validation import StoryValidator


@dataclass
class RunContext:
    """What the checkpoint callback needs; only rank 0 has a logger and a validator."""

    run_dir: Path
    logger: RunLogger
    metadata: dict  # written into every LoRA file (base model/dataset hashes, resolved config)
    every_n_steps: int
    log_every_n_steps: int = 1
    validator: StoryValidator | None = None
    scenes: list | None = None
    held_out: list = field(default_factory=list)  # items scored for the validation loss (train.held_out)
    ema: object = None  # train.ema.EmaCallback when trainer.ema.enabled
    validation_timesteps: tuple[int, ...] = ()
    seed: int = 0
    reward_patience: int = 0  # reward.patience: checkpoints without a better held-out reward before stopping


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def ema_record(rel: str, ema: dict) -> dict:
    """The ``ema`` part of a checkpoint line: the same fields as the raw weights' (paths under the run)."""
    story = ema.get("story")
    out = {"files": {fmt: f"{rel}/{Path(p).name}" for fmt, p in ema["files"].items()}}
    if ema.get("val_loss") is not None:
        out["val_loss"] = ema["val_loss"]
    if ema.get("validation_error"):
        out["validation_error"] = ema["validation_error"]
    if story is not None:
        out.update({k: story[k] for k in ("scores", "mean", "min", "passed", "coherence", "outlier", "clip_t",
                                          "copy_paste", "story_objective")},
                   panel=f"{rel}/ema/{story['panel']}", images=[f"{rel}/ema/{p}" for p in story["images"]])
    return out


def checkpoint_record(step: int, epoch: int, rel: str, files: dict, story: dict | None, *, interrupted: bool,
                      validation_error: str | None) -> CheckpointRecord:
    """The ``checkpoint`` line of metrics.jsonl (paths relative to the run folder)."""
    record = CheckpointRecord(step=step, epoch=epoch, dir=rel, scores=None, mean=None, min=None, passed=None,
                              coherence=None, clip_t=None, copy_paste=None, story_objective=None, panel=None,
                              images=[],
                              files={fmt: f"{rel}/{Path(p).name}" for fmt, p in files.items()},
                              trainer_state=f"{rel}/{TRAINER_STATE}")
    if story is not None:
        record.update(scores=story["scores"], mean=story["mean"], min=story["min"], passed=story["passed"],
                      coherence=story["coherence"], outlier=story["outlier"], clip_t=story["clip_t"],
                      copy_paste=story["copy_paste"], story_objective=story["story_objective"],
                      panel=f"{rel}/{story['panel']}",
                      images=[f"{rel}/{p}" for p in story["images"]])
    if getattr(files, "skipped", None):
        record["skipped"] = dict(files.skipped)
    if interrupted:
        record["interrupted"] = True
    if validation_error:
        record["validation_error"] = validation_error
    return record


class CheckpointCallback(L.Callback):
    """Writes the train lines, saves + validates checkpoints, saves one on Ctrl-C."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.seen_step = -1
        self.last_saved = -1
        self.interrupted = False
        self.exception: BaseException | None = None
        self.saved: list[Path] = []
        self.best_reward, self.stale = float("-inf"), 0  # reward.patience: the held-out reward so far

    @property
    def ckpt_root(self) -> Path:
        return self.ctx.run_dir / CHECKPOINTS

    def on_train_start(self, trainer, pl_module):
        self.seen_step = trainer.global_step
        if trainer.global_step > 0:  # resumed: that step's checkpoint exists already
            self.last_saved = trainer.global_step
            if trainer.is_global_zero:
                # train lines after this step from before the resume are superseded by the new ones
                self.ctx.logger.event({"type": "resume", "step": trainer.global_step, "epoch": trainer.current_epoch})

    @staticmethod
    def _stopping(trainer) -> bool:
        if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            return True
        me = trainer.max_epochs
        return bool(me is not None and me >= 0 and trainer.is_last_batch and trainer.current_epoch + 1 >= me)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self.seen_step:  # still accumulating gradients
            return
        self.seen_step = step
        losses = pl_module.step_losses
        loss = torch.stack(losses).float().mean() if losses else torch.tensor(float("nan"))
        pl_module.step_losses = []
        rewards, pl_module.step_rewards = pl_module.step_rewards, []
        reward = torch.stack(rewards).float().mean() if rewards else None
        if trainer.world_size > 1:
            loss = trainer.strategy.reduce(loss.to(pl_module.device), reduce_op="mean")
            reward = trainer.strategy.reduce(reward.to(pl_module.device), reduce_op="mean") if rewards else None
        if trainer.is_global_zero and (step % max(1, self.ctx.log_every_n_steps) == 0 or self._stopping(trainer)):
            self.ctx.logger.train(step, trainer.current_epoch, float(loss), float(pl_module.current_lr or 0.0),
                                  None if reward is None else float(reward))
        if step % max(1, self.ctx.every_n_steps) == 0 or self._stopping(trainer):
            self.save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if trainer.global_step > max(self.last_saved, 0):
            self.save(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception):
        self.exception = exception
        if isinstance(exception, KeyboardInterrupt):
            self.interrupted = True
            if trainer.is_global_zero and trainer.global_step > max(self.last_saved, 0):
                print(f"\nCtrl-C: saving a checkpoint at step {trainer.global_step} before stopping ...")
                self.save(trainer, pl_module, interrupted=True)

    def _save_ema(self, pl_module, folder: Path, step: int, epoch: int, interrupted: bool) -> dict:
        """The EMA weights as ``*_ema.*`` files, their validation loss and story (in ``<checkpoint>/ema/``)."""
        out: dict = {}
        with self.ctx.ema.applied(pl_module):
            out["files"] = save_lora(pl_module.unet, folder, {**self.ctx.metadata, "step": step, "epoch": epoch,
                                                              "ema": True}, suffix="_ema")
            if self.ctx.held_out and not interrupted:
                out["val_loss"] = self._val_loss(pl_module)
            if self.ctx.validator is not None and not interrupted:
                out["story"], out["validation_error"] = self._validate(folder / "ema", step)
        return out

    def _held_out_reward(self, pl_module) -> float | None:
        if getattr(pl_module, "reward", None) is None:
            return None
        with torch.random.fork_rng(devices=[]):
            return pl_module.reward.held_out_score(pl_module.unet)

    def _early_stop(self, trainer, score: float) -> None:
        """reward.patience checkpoints without a better held-out score end the run."""
        if score > self.best_reward:
            self.best_reward, self.stale = score, 0
            return
        self.stale += 1
        patience = int(getattr(self.ctx, "reward_patience", 0) or 0)
        if patience and self.stale >= patience:
            print(f"early stop: the held-out reward has not improved for {self.stale} checkpoints "
                  f"(best {self.best_reward:.4f}; reward.patience={patience})")
            trainer.should_stop = True

    def _val_loss(self, pl_module) -> float:
        with torch.random.fork_rng(devices=[]):  # the training run's random streams stay untouched
            return held_out_loss(pl_module, self.ctx.held_out, self.ctx.validation_timesteps, self.ctx.seed)

    def _validate(self, folder: Path, step: int) -> tuple[dict | None, str | None]:
        """The story render + scores, or the reason it failed (a failed render must not cost the LoRA)."""
        try:
            return self.ctx.validator.run(folder, self.ctx.run_dir, step), None
        except Exception as exc:  # noqa: BLE001
            error = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"story validation at step {step} failed ({error}); the checkpoint is saved without "
                          "scores", RuntimeWarning, stacklevel=2)
            print(f"WARNING: story validation at step {step} failed: {error}")
            return None, error

    @staticmethod
    def _save_trainer_state(trainer, path: Path, interrupted: bool) -> None:
        if interrupted:  # no collective calls here: other ranks may already be gone
            ckpt = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            trainer.strategy.checkpoint_io.save_checkpoint(ckpt, path)
        else:  # every rank calls it (DDP: rank 0 writes, with a barrier)
            trainer.save_checkpoint(path, weights_only=False)

    def save(self, trainer, pl_module, interrupted: bool = False) -> None:
        step, epoch = trainer.global_step, trainer.current_epoch
        name = checkpoint_name(step)
        final = self.ckpt_root / name
        tmp = self.ckpt_root / f".{name}.tmp"  # fixed: every rank must know where rank 0 writes
        rank0 = trainer.is_global_zero
        files, story, validation_error = {}, None, None
        with atomic_dir(final, tmp=tmp) if rank0 else nullcontext(tmp):
            if rank0:
                files = save_lora(pl_module.unet, tmp, {**self.ctx.metadata, "step": step, "epoch": epoch})
                val_loss = self._val_loss(pl_module) if self.ctx.held_out and not interrupted else None
                held_reward = self._held_out_reward(pl_module) if not interrupted else None
                if self.ctx.validator is not None and not interrupted:
                    story, validation_error = self._validate(tmp, step)
                ema = self._save_ema(pl_module, tmp, step, epoch, interrupted) if self.ctx.ema is not None else None
            self._save_trainer_state(trainer, tmp / TRAINER_STATE, interrupted)
        if rank0:
            atomic_write_text(self.ckpt_root / LAST_FILE, name + "\n")
            self.saved.append(final)
            rel = _rel(final, self.ctx.run_dir)
            record = checkpoint_record(step, epoch, rel, files, story, interrupted=interrupted,
                                       validation_error=validation_error)
            if val_loss is not None:
                record["val_loss"] = val_loss
                print(f"checkpoint {rel}: validation loss {val_loss:.5f} ({len(self.ctx.held_out)} held-out items)")
            if held_reward is not None:
                record["reward_held_out"] = held_reward
                print(f"checkpoint {rel}: held-out reward {held_reward:.4f} (aesthetic mean of "
                      f"{len(pl_module.reward.held_out_scenes)} scenes never rewarded)")
                self._early_stop(trainer, held_reward)
            if ema is not None:
                record["ema"] = ema_record(rel, ema)
            self.ctx.logger.checkpoint(record, self.ctx.scenes)
            if story is not None:
                verdict = "PASS" if story["passed"] else "below the gate"
                print(f"checkpoint {rel}: aesthetic mean {story['mean']:.3f} (min {story['min']:.3f}, "
                      f"{verdict}), CLIP-I {story['coherence']:.3f}"
                      + ("" if story["clip_t"] is None else f", CLIP-T {story['clip_t']:.3f}")
                      + f", copy-paste {story['copy_paste']:.2f}")
        self.last_saved = step
        if not interrupted and trainer.world_size > 1:
            trainer.strategy.barrier("kolors_story.checkpoint")
            if self.ctx.reward_patience:  # every rank stops together (rank 0 decided)
                trainer.should_stop = bool(trainer.strategy.broadcast(bool(trainer.should_stop), src=0))


class VaeToDevice(L.Callback):
    """The VAE is not part of the trained module: rank 0 moves it to the training device for the
    story renders (other ranks never decode, so theirs stays on the CPU)."""

    def __init__(self, pipe):
        self.pipe = pipe

    def on_fit_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            self.pipe.vae.to(pl_module.device)
