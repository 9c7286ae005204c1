"""Rank every (run, checkpoint) of a sweep by its story scores and point at the best one.

``objective=story`` ranks by the story objective that ``sampler.best_of.select=story`` maximises
(``evaluate.objective.Objective``: its gate first, then the weighted aesthetic mean, CLIP-I,
CLIP-T and copy-paste), recomputed from each checkpoint's recorded numbers with this job's
``scorer.threshold``/``scorer.objective``, so runs trained with other weights compare fairly.

Reads only the run folders (each job's ``metrics.jsonl`` and ``.hydra/``), so it needs no W&B
server: ``python evaluate.py sweep=multirun/2026-11-21/10-00-00``.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kolors_story.config import EvaluateSettings, LoggerSettings
from kolors_story.errors import MissingFileError, SettingsError
from kolors_story.evaluate.objective import Objective
from kolors_story.files import atomic_write_text
from kolors_story.records import BEST_FILE, EMA_SUFFIX, METRICS_FILE, BestPick, CheckpointLine, RunMetrics

OBJECTIVES = ("mean", "min", "coherence", "story")


@dataclass
class Row:
    """One checkpoint of one run, or one run that produced no checkpoint (failed)."""

    run: Path
    overrides: list[str]
    status: str  # finished | failed | interrupted | running | unknown
    error: str | None = None
    step: int | None = None
    checkpoint: str | None = None  # folder relative to the run
    mean: float | None = None
    min: float | None = None
    coherence: float | None = None  # CLIP-I
    clip_t: float | None = None
    copy_paste: float | None = None
    story_objective: float | None = None  # recomputed with the leaderboard's Objective
    val_loss: float | None = None  # held-out validation loss (trainer.validation_split)
    reward_held_out: float | None = None  # reward=aesthetic: the held-out scenes' mean score
    passed: bool | None = None
    story_gate: bool | None = None  # the Objective's gate (threshold and min_floor)
    panel: str | None = None
    scores: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return ",".join(self.overrides) or self.run.name


def _overrides(run: Path) -> list[str]:
    f = run / ".hydra" / "overrides.yaml"
    if f.exists():
        return [str(o) for o in (yaml.safe_load(f.read_text()) or [])]
    return []


def find_runs(sweep_dir: Path) -> list[Path]:
    """Job folders of a multirun: every folder holding a .hydra/ or a metrics.jsonl."""
    runs = {p.parent.parent for p in sweep_dir.glob("*/.hydra/config.yaml")}
    runs |= {p.parent for p in sweep_dir.glob(f"*/{METRICS_FILE}")}
    return sorted(runs, key=lambda p: (_job_num(p), p.name))


def _job_num(run: Path) -> int:
    head = run.name.split("_", 1)[0]
    return int(head) if head.isdigit() else 1 << 30


def _row(run: Path, overrides: list[str], status: str, error: str | None, r: CheckpointLine,
         ema: bool = False) -> Row:
    """One ranked row: a checkpoint, or its EMA weights as "<dir>:ema" (only the EMA's own numbers)."""
    n = r.ema if ema else r
    return Row(run=run, overrides=overrides, status=status, error=error, step=r.step,
               checkpoint=f"{r.dir}{EMA_SUFFIX}" if ema else r.dir, mean=n.mean, min=n.min, coherence=n.coherence,
               clip_t=n.clip_t, copy_paste=n.copy_paste, passed=n.passed, panel=n.panel, scores=list(n.scores or []),
               val_loss=n.val_loss, reward_held_out=None if ema else r.reward_held_out)


def rows_for_run(run: Path, story: Objective | None = None) -> list[Row]:
    metrics = RunMetrics.read(run)
    overrides = _overrides(run)
    if metrics.status is not None:
        status, error = metrics.status.status, metrics.status.error
    elif metrics.lines:
        status, error = "unknown", None
    else:
        status, error = "failed", "no metrics.jsonl: the job died before training started"
    # the EMA weights of a checkpoint rank beside its raw weights, as "<dir>:ema"
    rows = [_row(run, overrides, status, error, r, ema) for r in metrics.checkpoints
            for ema in ([False, True] if r.ema else [False])]
    story = story or Objective()
    for row in rows:
        if row.mean is not None:
            row.story_objective = float(story.value(row.mean, row.coherence, row.clip_t, row.copy_paste or 0.0))
            row.story_gate = bool(story.gate(row.mean, row.min if row.min is not None else row.mean))
    if not rows:
        rows.append(Row(run=run, overrides=overrides, status=status, error=error))
    return rows


def _num(x) -> float:
    return float(x) if isinstance(x, (int, float)) and not math.isnan(float(x)) else -math.inf


def sort_key(row: Row, objective: str = "mean", require_pass: bool = True):
    """Higher is better. Checkpoints that pass the gate come first (when required; for ``story``
    the Objective's gate), then the objective, then coherence, then the minimum score (the
    competition's weakest image)."""
    if objective not in OBJECTIVES:
        raise SettingsError(f"leaderboard.objective={objective!r}: choose one of {OBJECTIVES}")
    scored = row.mean is not None
    gate = (bool(row.story_gate) if objective == "story" else bool(row.passed)) if require_pass else True
    value = row.story_objective if objective == "story" else getattr(row, objective)
    return (scored, gate, _num(value), _num(row.coherence), _num(row.min))


def build_leaderboard(sweep_dir: str | Path, objective: str = "mean", require_pass: bool = True,
                      story: Objective | None = None) -> list[Row]:
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise MissingFileError(f"sweep folder {sweep_dir} does not exist (give the multirun/<date>/<time> folder)")
    runs = find_runs(sweep_dir)
    if not runs:
        raise MissingFileError(
            f"{sweep_dir} holds no job folders (no */.hydra/config.yaml or */metrics.jsonl); "
            "give the folder `python train.py -m ...` printed"
        )
    rows = [row for run in runs for row in rows_for_run(run, story)]
    rows.sort(key=lambda r: sort_key(r, objective, require_pass), reverse=True)
    return rows


def _fmt(x, nd=3) -> str:
    return "" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


COLUMNS = ("rank", "run", "overrides", "checkpoint", "step", "mean", "min", "coherence", "clip_t", "copy_paste",
           "story_objective", "val_loss", "reward_held_out", "passed", "status", "error")


def _table(rows: list[Row], sweep_dir: Path) -> list[list[str]]:
    out = []
    for i, r in enumerate(rows, 1):
        out.append([
            str(i), str(r.run.relative_to(sweep_dir)), " ".join(r.overrides), r.checkpoint or "", _fmt(r.step),
            _fmt(r.mean), _fmt(r.min), _fmt(r.coherence), _fmt(r.clip_t), _fmt(r.copy_paste), _fmt(r.story_objective),
            _fmt(r.val_loss, 5), _fmt(r.reward_held_out, 4), _fmt(r.passed), r.status, (r.error or "").splitlines()[0] if r.error else "",
        ])
    return out


def to_csv(rows: list[Row], sweep_dir: Path) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    w.writerows(_table(rows, sweep_dir))
    return buf.getvalue()


def to_markdown(rows: list[Row], sweep_dir: Path, thumbnails: int = 5) -> str:
    lines = [f"# Leaderboard: {sweep_dir}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in _table(rows, sweep_dir)]
    shown = [r for r in rows if r.panel][:thumbnails]
    if shown:
        lines += ["", "## Panels of the top checkpoints", ""]
        for i, r in enumerate(shown, 1):
            rel = (r.run / r.panel).relative_to(sweep_dir)
            lines += [f"**{i}. {r.name} @ {r.checkpoint}** (mean {_fmt(r.mean)})", "", f'<img src="{rel}" width="256">', ""]
    return "\n".join(lines) + "\n"


def best_record(rows: list[Row], ranking: dict | None = None) -> BestPick | None:
    """What `generate.py` needs to render the winner: run, checkpoint, scores, exact config, and
    ``ranked_by`` (the objective that picked it)."""
    top = next((r for r in rows if r.mean is not None), None)
    if top is None:
        return None
    config_file = top.run / ".hydra" / "config.yaml"
    return BestPick(
        run=str(top.run.resolve()), checkpoint=top.checkpoint,
        checkpoint_dir=str((top.run / top.checkpoint).resolve()) if top.checkpoint else None,
        step=top.step, mean=top.mean, min=top.min, coherence=top.coherence, clip_t=top.clip_t,
        copy_paste=top.copy_paste, story_objective=top.story_objective, val_loss=top.val_loss,
        reward_held_out=top.reward_held_out, passed=top.passed, ranked_by=ranking, overrides=top.overrides,
        config=yaml.safe_load(config_file.read_text()) if config_file.exists() else None,
    )


def write_leaderboard(sweep_dir: str | Path, objective: str = "mean", require_pass: bool = True,
                      out_dir: str | Path | None = None, story: Objective | None = None) -> dict:
    """Write leaderboard.csv, leaderboard.md and best.yaml (into the sweep folder by default)."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir else sweep_dir
    story = story or Objective()
    rows = build_leaderboard(sweep_dir, objective, require_pass, story)
    paths = {
        "csv": atomic_write_text(out_dir / "leaderboard.csv", to_csv(rows, sweep_dir)),
        "md": atomic_write_text(out_dir / "leaderboard.md", to_markdown(rows, sweep_dir)),
    }
    ranking = {"objective": objective, "require_pass": require_pass}
    if objective == "story":
        ranking["story"] = story.as_dict()
    best = best_record(rows, ranking)
    if best is not None:
        paths["best"] = best.write_yaml(out_dir / BEST_FILE)
    return {"rows": rows, "best": best, "paths": paths}


def print_leaderboard(rows: list[Row], sweep_dir: Path, top: int = 10) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Leaderboard {sweep_dir} (top {min(top, len(rows))} of {len(rows)})")
    numbers = ("mean", "min", "CLIP-I", "CLIP-T", "copy", "objective")
    for col in ("rank", "run", "checkpoint", *numbers, "passed", "status"):
        table.add_column(col, justify="right" if col in ("rank", *numbers) else "left")
    for cells in _table(rows[:top], sweep_dir):
        rank, run, _, ckpt, _, mean, mn, coh, clip_t, copy, value, _val_loss, _reward, passed, status, error = cells
        table.add_row(rank, run, ckpt, mean, mn, coh, clip_t, copy, value, passed,
                      status if not error else f"{status}: {error[:60]}")
    console = Console()
    if not console.is_terminal:  # logs and pipes: don't squeeze run names into an 80-column box
        console = Console(width=200)
    console.print(table)


def sweep_group(rows: list[Row], sweep_dir: Path) -> str:
    """The W&B group the training jobs used: their ``hydra.sweep.dir`` as recorded in each job."""
    for row in rows:
        f = row.run / ".hydra" / "hydra.yaml"
        if f.exists():
            try:
                return str(yaml.safe_load(f.read_text())["hydra"]["sweep"]["dir"])
            except (KeyError, TypeError, yaml.YAMLError):
                continue
    return str(sweep_dir)


def log_leaderboard_to_wandb(rows: list[Row], sweep_dir: Path, logger: LoggerSettings) -> bool:
    """Mirror the leaderboard as a W&B table + summary in the sweep's group; never raises."""
    if logger.mode == "disabled":
        return False
    try:
        import wandb

        run = wandb.init(
            project=logger.project, entity=logger.entity, mode=logger.mode,
            group=logger.group or sweep_group(rows, sweep_dir), name=f"leaderboard-{sweep_dir.name}",
            job_type="leaderboard", dir=str(sweep_dir), reinit="finish_previous",
        )
        table = wandb.Table(columns=list(COLUMNS), data=_table(rows, sweep_dir))
        run.log({"leaderboard": table})
        best = next((r for r in rows if r.mean is not None), None)
        if best is not None:
            run.summary.update({"best_mean": best.mean, "best_min": best.min, "best_coherence": best.coherence,
                                "best_run": best.name, "best_checkpoint": best.checkpoint})
        run.finish()
        return True
    except Exception as exc:  # noqa: BLE001 - the dashboard is a mirror: files on disk are the result
        print(f"warning: W&B logging of the leaderboard failed ({type(exc).__name__}: {exc}); files are written")
        return False


def run_leaderboard(job: EvaluateSettings) -> dict:
    """The `evaluate.py sweep=<dir>` job: leaderboard.csv/.md, best.yaml, grid.png (``grid.x=``) and
    report.html (with the runs' own reports where missing)."""
    from kolors_story.evaluate.grid import check_grid, write_grid
    from kolors_story.evaluate.sweep_report import write_sweep_report

    lb = job.leaderboard
    sweep_dir = Path(str(job.sweep))
    # a grid key that was not swept fails before anything is written
    swept = {run: _overrides(run) for run in find_runs(sweep_dir)} if job.grid.x and sweep_dir.is_dir() else {}
    check_grid(job.grid, swept, sweep_dir)
    result = write_leaderboard(sweep_dir, objective=lb.objective, require_pass=lb.require_pass, out_dir=job.output_dir,
                               story=Objective.from_settings(job.scorer))
    if job.grid.x:
        result["paths"]["grid"] = write_grid(result["rows"], job.grid, sweep_dir, job.output_dir)
    result["paths"]["report"] = write_sweep_report(sweep_dir, result, job.output_dir)
    print_leaderboard(result["rows"], sweep_dir, top=lb.top)
    for kind, path in result["paths"].items():
        print(f"{kind}: {path}")
    if result["best"] is None:
        print("No run produced a scored checkpoint: see the status/error columns.")
    else:
        print(f"Render the winner: python generate.py run={result['paths']['best']}")
    log_leaderboard_to_wandb(result["rows"], sweep_dir, job.logger)
    return result
