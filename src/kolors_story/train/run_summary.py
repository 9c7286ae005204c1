"""What ``train.py`` prints at the end: where everything is, the checkpoints' scores, the next
commands. Logs and pipes get full paths on one line (rich would wrap them at 80 columns)."""

from __future__ import annotations

import sys
from pathlib import Path

from kolors_story import tiny
from kolors_story.config import TrainSettings
from kolors_story.records import last_checkpoint


def _console():
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


def print_data_summary(prepared, cache) -> None:
    from rich.table import Table

    t = Table(title="Data stage done (stage=data)", show_header=False)
    t.add_row("processed dataset", f"{prepared.train_dir} ({len(prepared.items)} images)")
    t.add_row("report", str(Path(prepared.data_dir) / "report.json"))
    t.add_row("cache", f"{cache.cache_dir} ({len(cache.items)} items)")
    t.add_row("story embeddings", str(cache.story))
    t.add_row("next", "the same command with stage=train (or without stage=) trains on it")
    _console().print(t)


def _checkpoint_table(result):
    from rich.table import Table

    c = Table(title=f"Checkpoints in {result.run_dir} (story panel + aesthetic scores)")
    reward = any(r.reward_held_out is not None for r in result.checkpoints)
    for col in ("step", "mean", "min", "pass", "CLIP-I", "CLIP-T", "copy", "objective", "val loss",
                *(["held-out reward"] if reward else []), "panel"):
        c.add_column(col)
    rows = [row for r in result.checkpoints for row in [(str(r.step), r, r.reward_held_out)]
            + ([(f"{r.step} ema", r.ema, None)] if r.ema else [])]
    def fmt(v) -> str:
        return f"{v:.3f}" if isinstance(v, (int, float)) else "-"

    for step, r, held_reward in rows:
        c.add_row(step, fmt(r.mean), fmt(r.min), {True: "yes", False: "no", None: "-"}[r.passed], fmt(r.coherence),
                  fmt(r.clip_t), fmt(r.copy_paste), fmt(r.story_objective),
                  "-" if r.val_loss is None else f"{r.val_loss:.5f}", *([fmt(held_reward)] if reward else []),
                  str(r.panel) if r.panel else "-")
    return c


def _before_after_table(shift: dict):
    from rich.table import Table

    t = Table(title=f"Before / after: the story at LoRA scale 0 and 1 vs the {shift['style_images']} training "
                    f"images ({shift['image']})")
    for col in ("", "saturation", "brightness", "contrast", "distance to the style set"):
        t.add_column(col)
    for label, key, distance in (("LoRA scale 0 (base model)", "before", f"{shift['distance_before']:.3f}"),
                                 ("LoRA scale 1 (trained)", "after", f"{shift['distance_after']:.3f}"),
                                 ("style set (training images)", "style", "")):
        s = shift[key]
        t.add_row(label, f"{s['saturation']:.3f}", f"{s['brightness']:.3f}", f"{s['contrast']:.3f}", distance)
    verdict = "closer to" if shift["moved"] > 0 else "not closer to"
    t.caption = (f"With the LoRA the story is {verdict} the style set's colours (distance {shift['distance_before']:.3f} "
                 f"-> {shift['distance_after']:.3f}).")
    return t


def print_summary(job: TrainSettings, result, cache=None) -> None:
    """The run table (folders, W&B, error, next commands) and the checkpoints' scores."""
    from rich.table import Table

    console = _console()
    colour = {"finished": "green", "failed": "red", "interrupted": "yellow", "stopped": "yellow"}[result.status]
    t = Table(title=f"Training {result.status} at step {result.step}", title_style=colour, show_header=False)
    t.add_row("run folder", str(result.run_dir))
    t.add_row("metrics", str(result.run_dir / "metrics.jsonl"))
    t.add_row("config", str(result.run_dir / ".hydra" / "config.yaml"))
    if getattr(result, "report", None):
        t.add_row("report", f"{result.report}  (curves.png, progress.png beside it)")
    if cache is not None:
        t.add_row("cache", str(cache.cache_dir))
    last = last_checkpoint(result.run_dir)
    t.add_row("last checkpoint", str(last) if last else "-")
    if result.wandb_dir:
        hint = f"  (wandb sync {result.wandb_dir})" if job.logger.mode == "offline" else ""
        t.add_row("W&B", f"{job.logger.mode}: {result.wandb_dir}{hint}")
    elif result.wandb_error:
        t.add_row("W&B", f"off ({result.wandb_error}); metrics.jsonl is complete")
    if result.error:
        t.add_row("error", result.error)
    if last is not None:
        t.add_row("resume", f"python train.py resume={result.run_dir}")
        t.add_row("generate", f"python generate.py run={result.run_dir}")
    console.print(t)
    if result.checkpoints:
        console.print(_checkpoint_table(result))
    if getattr(result, "before_after", None):
        console.print(_before_after_table(result.before_after))
    if tiny.note(job.model):
        console.print(f"[bold yellow]{tiny.SUMMARY_NOTE}[/]")
