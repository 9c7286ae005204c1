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
from kolors_story.lora import FILE_NAMES, save_lora
from kolors_story.records import (
    CHECKPOINTS,
    LAST_FILE,
    TRAINER_STATE,
    CheckpointLine,
    EmaNumbers,
    RunMetrics,
    checkpoint_name,
    last_checkpoint,
)
from kolors_story.train.held_out import held_out_loss
from kolors_story.train.logger import RunLogger
from kolors_story.train.stopping import StopRequest
from kolors_story.train.validation import CheckpointStory, StoryValidator


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
    keep_last_n: int | None = None  # trainer.keep_last_n: older checkpoints are removed (the best one stays)
    save_dtype: str = "float32"  # trainer.save_dtype of the LoRA files
    save_formats: tuple[str, ...] = tuple(FILE_NAMES)  # trainer.save_formats (the run's last checkpoint: all)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


STORY_FIELDS = ("scores", "mean", "min", "passed", "coherence", "outlier", "clip_t", "copy_paste", "story_objective")


def story_numbers(story: CheckpointStory, folder: str) -> dict:
    """A validation story's numbers and files for a checkpoint line (paths under ``folder``)."""
    numbers = {k: getattr(story.scores, k) for k in STORY_FIELDS}
    return {**numbers, "panel": f"{folder}/{story.panel}", "images": [f"{folder}/{p}" for p in story.images]}


@dataclass
class EmaSaved:
    """What a checkpoint saved of its EMA weights (``trainer.ema``)."""

    files: dict
    val_loss: float | None = None
    story: CheckpointStory | None = None
    validation_error: str | None = None


def ema_record(rel: str, ema: EmaSaved) -> EmaNumbers:
    """The ``ema`` part of a checkpoint line: the same fields as the raw weights' (paths under the run)."""
    out = EmaNumbers(files={fmt: f"{rel}/{Path(p).name}" for fmt, p in ema.files.items()})
    if ema.val_loss is not None:
        out.val_loss = ema.val_loss
    if ema.validation_error:
        out.validation_error = ema.validation_error
    if ema.story is not None:
        for key, value in story_numbers(ema.story, f"{rel}/ema").items():
            setattr(out, key, value)
    return out


def checkpoint_record(step: int, epoch: int, rel: str, files: dict, story: CheckpointStory | None, *,
                      interrupted: bool, validation_error: str | None) -> CheckpointLine:
    """The ``checkpoint`` line of metrics.jsonl (paths relative to the run folder)."""
    unscored = {k: None for k in STORY_FIELDS if k != "outlier"} | {"panel": None, "images": []}
    record = CheckpointLine(step=step, epoch=epoch, dir=rel,
                            **(story_numbers(story, rel) if story is not None else unscored),
                            files={fmt: f"{rel}/{Path(p).name}" for fmt, p in files.items()},
                            trainer_state=f"{rel}/{TRAINER_STATE}")
    if getattr(files, "skipped", None):
        record.skipped = dict(files.skipped)
    if interrupted:
        record.interrupted = True
    if validation_error:
        record.validation_error = validation_error
    return record


def refresh_pictures(run_dir: Path) -> None:
    """``curves.png`` and ``progress.png`` redrawn at each checkpoint; a drawing problem never costs the run."""
    from kolors_story.evaluate.plots import refresh_run_pictures

    try:
        refresh_run_pictures(run_dir)
    except Exception as exc:  # noqa: BLE001 - the pictures are a view of metrics.jsonl, which is complete
        print(f"WARNING: could not redraw curves.png/progress.png ({type(exc).__name__}: {exc})")


def prune_checkpoints(run_dir: Path, keep_last_n: int | None) -> list[str]:
    """``trainer.keep_last_n``: remove the run's checkpoint folders but the last N, the best one by the
    leaderboard's objective (mean aesthetic score, passing the gate first) and the one ``last`` names.
    Their metrics.jsonl lines stay. Returns the folders removed."""
    if not keep_last_n:
        return []
    import shutil

    from kolors_story.evaluate.leaderboard import rows_for_run, sort_key

    root = Path(run_dir) / CHECKPOINTS
    folders = sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: p.name)
    keep = {p.name for p in folders[-int(keep_last_n):]}
    scored = [r for r in rows_for_run(Path(run_dir)) if r.mean is not None and r.checkpoint]
    if scored:
        keep.add(Path(max(scored, key=sort_key).checkpoint.split(":")[0]).name)
    last = last_checkpoint(run_dir)
    keep |= {last.name} if last is not None else set()
    removed = [p.name for p in folders if p.name not in keep]
    for name in removed:
        shutil.rmtree(root / name)
    if removed:
        print(f"trainer.keep_last_n={keep_last_n}: removed {', '.join(removed)} (kept {', '.join(sorted(keep))})")
    return removed


class CheckpointCallback(L.Callback):
    """Writes the train lines, saves + validates checkpoints, and saves one when the run is stopped
    (SIGTERM/SIGINT at a step boundary, or Ctrl-C seen as an exception)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.seen_step = -1
        self.last_saved = -1
        self.interrupted = False
        self.exception: BaseException | None = None
        self.saved: list[Path] = []
        self.best_reward, self.stale = float("-inf"), 0  # reward.patience: the held-out reward so far
        self.stop = StopRequest()  # SIGTERM / SIGINT: stop at the next step boundary, with a checkpoint
        self.stopped_at: int | None = None

    @property
    def ckpt_root(self) -> Path:
        return self.ctx.run_dir / CHECKPOINTS

    def on_train_start(self, trainer, pl_module):
        self.stop.install()  # after Lightning's SIGTERM handler, which it replaces for the fit
        self.seen_step = trainer.global_step
        if trainer.global_step > 0:  # resumed: that step's checkpoint exists already
            self.last_saved = trainer.global_step
            if trainer.is_global_zero:
                # train lines after this step from before the resume are superseded by the new ones
                self.ctx.logger.event({"type": "resume", "step": trainer.global_step, "epoch": trainer.current_epoch})
                self._render_skipped_validation(trainer.global_step, trainer.max_steps)

    def _render_skipped_validation(self, step: int, max_steps: int | None) -> None:
        """A checkpoint saved on a stop skipped its story render; if it was a validation step, render
        it now into the same folder and log the scored line (readers keep a checkpoint's last line)."""
        folder = self.ckpt_root / checkpoint_name(step)
        line = next((c for c in RunMetrics.read(self.ctx.run_dir).checkpoints
                     if Path(c.dir).name == folder.name), None)
        due = step % max(1, self.ctx.every_n_steps) == 0 or step == max_steps
        if self.ctx.validator is None or line is None or not line.stopped or line.scored or not due:
            return
        story, error = self._validate(folder, step)
        line = line.model_copy(update={**story_numbers(story, line.dir)} if story else {"validation_error": error})
        self.ctx.logger.checkpoint(line, self.ctx.scenes)
        if story is not None:
            _print_story(line.dir, story)

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
        stop = self.stop.requested(trainer)
        if stop or step % max(1, self.ctx.every_n_steps) == 0 or self._stopping(trainer):
            self.save(trainer, pl_module, stopped=(self.stop.signal or "SIGTERM") if stop else None)
        if stop or self.stop.requested(trainer):  # also a signal that arrived during that save
            if step > self.last_saved:
                self.save(trainer, pl_module, stopped=self.stop.signal or "SIGTERM")
            self.stopped_at = step
            trainer.should_stop = True
            self.stop.after_checkpoint()

    def on_train_end(self, trainer, pl_module):
        self.stop.restore()
        if self.stopped_at is None and trainer.global_step > max(self.last_saved, 0):
            self.save(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception):
        self.stop.restore()
        self.exception = exception
        if isinstance(exception, KeyboardInterrupt):
            self.interrupted = True
            if trainer.is_global_zero and trainer.global_step > max(self.last_saved, 0):
                print(f"\nCtrl-C: saving a checkpoint at step {trainer.global_step} before stopping ...")
                self.save(trainer, pl_module, interrupted=True)

    def _save_ema(self, pl_module, folder: Path, step: int, epoch: int, interrupted: bool) -> EmaSaved:
        """The EMA weights as ``*_ema.*`` files, their validation loss and story (in ``<checkpoint>/ema/``)."""
        with self.ctx.ema.applied(pl_module):
            out = EmaSaved(save_lora(pl_module.unet, folder, {**self.ctx.metadata, "step": step, "epoch": epoch,
                                                              "ema": True}, suffix="_ema", dtype=self.ctx.save_dtype))
            if self.ctx.held_out and not interrupted:
                out.val_loss = self._val_loss(pl_module)
            if self.ctx.validator is not None and not interrupted:
                out.story, out.validation_error = self._validate(folder / "ema", step)
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

    def _validate(self, folder: Path, step: int) -> tuple[CheckpointStory | None, str | None]:
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

    def save(self, trainer, pl_module, interrupted: bool = False, stopped: str | None = None) -> None:
        """A checkpoint at this step, swapped in whole. ``interrupted`` (Ctrl-C seen as an exception:
        other ranks may be gone) and ``stopped`` (a stop signal, at a step boundary) skip the renders."""
        step, epoch = trainer.global_step, trainer.current_epoch
        name = checkpoint_name(step)
        final = self.ckpt_root / name
        tmp = self.ckpt_root / f".{name}.tmp"  # fixed: every rank must know where rank 0 writes
        rank0, scored = trainer.is_global_zero, not interrupted and stopped is None
        saved = _Saved()
        formats = tuple(FILE_NAMES) if self._stopping(trainer) else self.ctx.save_formats
        with atomic_dir(final, tmp=tmp) if rank0 else nullcontext(tmp):
            if rank0:
                saved = self._write(pl_module, tmp, step, epoch, scored, formats)
            self._save_trainer_state(trainer, tmp / TRAINER_STATE, interrupted)
        if rank0:
            atomic_write_text(self.ckpt_root / LAST_FILE, name + "\n")
            self.saved.append(final)
            record = checkpoint_record(step, epoch, _rel(final, self.ctx.run_dir), saved.files, saved.story,
                                       interrupted=interrupted, validation_error=saved.validation_error)
            record.stopped = stopped
            self._log(trainer, pl_module, record, saved)
            prune_checkpoints(self.ctx.run_dir, self.ctx.keep_last_n)
            refresh_pictures(self.ctx.run_dir)
        self.last_saved = step
        if not interrupted and trainer.world_size > 1:
            trainer.strategy.barrier("kolors_story.checkpoint")
            if self.ctx.reward_patience:  # every rank stops together (rank 0 decided)
                trainer.should_stop = bool(trainer.strategy.broadcast(bool(trainer.should_stop), src=0))

    def _write(self, pl_module, folder: Path, step: int, epoch: int, scored: bool, formats: tuple) -> _Saved:
        """The LoRA files, and (``scored``) the validation loss, held-out reward, story and EMA renders."""
        files = save_lora(pl_module.unet, folder, {**self.ctx.metadata, "step": step, "epoch": epoch},
                          dtype=self.ctx.save_dtype, formats=formats)
        out = _Saved(files=files)
        if scored:
            out.val_loss = self._val_loss(pl_module) if self.ctx.held_out else None
            out.held_reward = self._held_out_reward(pl_module)
            if self.ctx.validator is not None:
                out.story, out.validation_error = self._validate(folder, step)
        if self.ctx.ema is not None:
            out.ema = self._save_ema(pl_module, folder, step, epoch, not scored)
        return out

    def _log(self, trainer, pl_module, record: CheckpointLine, saved: _Saved) -> None:
        """The checkpoint line (metrics.jsonl + W&B) and what the user reads about it."""
        rel = record.dir
        if saved.val_loss is not None:
            record.val_loss = saved.val_loss
            print(f"checkpoint {rel}: validation loss {saved.val_loss:.5f} ({len(self.ctx.held_out)} held-out items)")
        if saved.held_reward is not None:
            record.reward_held_out = saved.held_reward
            print(f"checkpoint {rel}: held-out reward {saved.held_reward:.4f} (aesthetic mean of "
                  f"{len(pl_module.reward.held_out_scenes)} scenes never rewarded)")
            self._early_stop(trainer, saved.held_reward)
        if saved.ema is not None:
            record.ema = ema_record(rel, saved.ema)
        self.ctx.logger.checkpoint(record, self.ctx.scenes)
        if saved.story is not None:
            _print_story(rel, saved.story)


def _print_story(rel: str, story: CheckpointStory) -> None:
    s = story.scores
    verdict = "PASS" if s.passed else "below the gate"
    print(f"checkpoint {rel}: aesthetic mean {s.mean:.3f} (min {s.min:.3f}, {verdict}), CLIP-I {s.coherence:.3f}"
          + ("" if s.clip_t is None else f", CLIP-T {s.clip_t:.3f}") + f", copy-paste {s.copy_paste:.2f}")


@dataclass
class _Saved:
    """What one checkpoint wrote besides its trainer state."""

    files: dict = field(default_factory=dict)
    story: CheckpointStory | None = None
    validation_error: str | None = None
    val_loss: float | None = None
    held_reward: float | None = None
    ema: EmaSaved | None = None


class VaeToDevice(L.Callback):
    """The VAE is not part of the trained module: rank 0 moves it to the training device for the
    story renders (other ranks never decode, so theirs stays on the CPU)."""

    def __init__(self, pipe):
        self.pipe = pipe

    def on_fit_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            self.pipe.vae.to(pl_module.device)
