"""The X/Y grid of a sweep: ``evaluate.py sweep=<dir> grid.x=lora.rank grid.y=lora.alpha`` ->
``grid.png``, one cell per swept combination with its story panel (or one scene, ``grid.scene``)
and its score under it, as the leaderboard ranked it.

The swept values are read from each run's ``.hydra/overrides.yaml`` (what Hydra recorded for that
job), so the grid needs no config of its own. A combination no run covers says "no run", a run
that died says "failed", and the grid still renders. When other keys were swept too, a cell shows
the best-ranked of the runs that share its combination and says how many there were.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from kolors_story.config import GridSettings
from kolors_story.errors import SettingsError
from kolors_story.evaluate.plots import DPI, save_figure, show_image, wrapped
from kolors_story.evaluate.run_folder import split_override, stand_in_note
from kolors_story.records import EMA_SUFFIX, RunMetrics, checkpoint_name
from kolors_story.story import STORY_LENGTH

GRID_IMAGE = "grid.png"
CELL_INCHES = 2.4  # the width of one cell


@dataclass
class Cell:
    x: str
    y: str | None
    label: str  # the score under the image, or why there is none ("failed", "no run")
    image: Path | None = None
    run: Path | None = None
    checkpoint: str | None = None


@dataclass
class Grid:
    x_key: str
    y_key: str | None
    x_values: list[str]
    y_values: list[str | None]
    cells: list[Cell] = field(default_factory=list)  # row by row
    title: str = ""

    def cell(self, x: str, y: str | None = None) -> Cell:
        return next(c for c in self.cells if c.x == x and c.y == y)


def swept_values(overrides: dict[Path, list[str]]) -> dict[str, dict[Path, str]]:
    """key -> {run folder: its value}, from each run's overrides ({run folder: .hydra/overrides.yaml})."""
    values: dict[str, dict[Path, str]] = {}
    for run, items in overrides.items():
        for override in items:
            key, value = split_override(override)
            values.setdefault(key, {})[run] = value
    return values


def run_overrides(rows) -> dict[Path, list[str]]:
    """{run folder: its overrides} of the leaderboard's rows, runs in the rows' order."""
    return {row.run: row.overrides for row in rows}


def swept_keys(values: dict[str, dict[Path, str]], runs: set[Path]) -> list[str]:
    """The keys that differ between runs (a value that changes, or is set in only some runs)."""
    return sorted(k for k, by_run in values.items() if len(set(by_run.values())) > 1 or set(by_run) != runs)


def check_grid(settings: GridSettings, overrides: dict[Path, list[str]], sweep_dir: Path) -> None:
    """A one-line :class:`SettingsError` for a grid that cannot be drawn (``overrides``: each run's),
    checked before anything is written."""
    if settings.x is None:
        given = [f"grid.{k}={v}" for k, v in (("y", settings.y), ("scene", settings.scene)) if v is not None]
        given += [f"grid.checkpoint={settings.checkpoint}"] if settings.checkpoint != "best" else []
        if given:
            raise SettingsError(f"{given[0]} needs grid.x: give grid.x=<swept key> (one column per value)")
        return
    if settings.x == settings.y:
        raise SettingsError(f"grid.x and grid.y are both {settings.x}: give two different swept keys")
    if settings.scene is not None and not 1 <= settings.scene <= STORY_LENGTH:
        raise SettingsError(f"grid.scene={settings.scene}: choose a scene 1..{STORY_LENGTH}, or null for the whole panel")
    if not re.fullmatch(r"best|last|step-\d+|\d+", str(settings.checkpoint)):
        raise SettingsError(f"grid.checkpoint={settings.checkpoint}: choose best, last or step-XXXXXX")
    if not overrides:
        return  # no runs at all: the leaderboard says so, naming the folder
    values = swept_values(overrides)
    swept = swept_keys(values, set(overrides))
    for axis, key in (("grid.x", settings.x), ("grid.y", settings.y)):
        if key is not None and key not in values:
            raise SettingsError(f"{axis}={key} was not swept in {sweep_dir}: the swept keys are "
                                f"{', '.join(swept) or 'none (every run has the same overrides)'}")


def _ordered(values) -> list[str]:
    """Numbers in numeric order (2, 4, 16), anything else alphabetically."""
    def key(v: str):
        try:
            return (0, float(v), v)
        except ValueError:
            return (1, 0.0, v)
    return sorted(set(values), key=key)


def _pick(rows, checkpoint: str):
    """The row of one run that ``grid.checkpoint`` names (rows in leaderboard order), or None."""
    saved = [r for r in rows if r.checkpoint]
    if checkpoint == "best":
        return next((r for r in saved if r.mean is not None), saved[0] if saved else None)
    raw = [r for r in saved if not r.checkpoint.endswith(EMA_SUFFIX)]
    if checkpoint == "last":
        return max(raw, key=lambda r: r.step or 0) if raw else None
    name = checkpoint_name(int(checkpoint)) if checkpoint.isdigit() else checkpoint
    return next((r for r in saved if Path(r.checkpoint).name == name), None)


def _scene_image(row, scene: int) -> Path:
    """Scene ``scene``'s image of the row's checkpoint (its EMA weights' own images for ":ema")."""
    folder = row.checkpoint.removesuffix(EMA_SUFFIX)
    line = next((c for c in RunMetrics.read(row.run).checkpoints if c.dir == folder), None)
    numbers = (line.ema if row.checkpoint.endswith(EMA_SUFFIX) else line) if line else None
    images = (numbers.images if numbers else None) or []
    return row.run / (images[scene - 1] if scene <= len(images) else f"{folder}/{scene}.png")


def _num(x) -> str:
    return "-" if x is None else f"{x:.3f}"  # as leaderboard.csv writes scores


def _cell(x: str, y: str | None, rows: list, settings: GridSettings) -> Cell:
    """The cell of the runs whose overrides give (x, y); ``rows``: theirs, in leaderboard order."""
    if not rows:
        return Cell(x, y, "no run")
    runs = {r.run for r in rows}
    picks = [p for p in (_pick([r for r in rows if r.run == run], settings.checkpoint) for run in runs) if p]
    if not picks:
        failed = all(r.status == "failed" for r in rows)
        return Cell(x, y, "failed" if failed else f"no {settings.checkpoint} checkpoint", run=rows[0].run)
    row = min(picks, key=rows.index)  # the best-ranked of the runs sharing this combination
    if row.mean is None:
        label = "not scored"
    elif settings.scene is not None:
        score = row.scores[settings.scene - 1] if settings.scene <= len(row.scores) else None
        label = f"scene {settings.scene}: {_num(score)}  (mean {_num(row.mean)})"
    else:
        label = f"mean {_num(row.mean)}  min {_num(row.min)}"
    label += f"\n{Path(row.checkpoint).name}" + (f", best of {len(runs)} runs" if len(runs) > 1 else "")
    image = _scene_image(row, settings.scene) if settings.scene is not None else (row.run / row.panel if row.panel else None)
    return Cell(x, y, label, image=image, run=row.run, checkpoint=row.checkpoint)


def build_grid(rows, settings: GridSettings, sweep_dir: Path) -> Grid:
    """The grid's cells from the leaderboard's rows (sorted best first)."""
    check_grid(settings, run_overrides(rows), sweep_dir)
    values = swept_values(run_overrides(rows))
    xs = _ordered(values[settings.x].values())
    ys = _ordered(values[settings.y].values()) if settings.y else [None]
    grid = Grid(settings.x, settings.y, xs, ys)
    for y in ys:
        for x in xs:
            mine = [r for r in rows if values[settings.x].get(r.run) == x
                    and (y is None or values[settings.y].get(r.run) == y)]
            grid.cells.append(_cell(x, y, mine, settings))
    shown = f"scene {settings.scene}" if settings.scene is not None else "the story panel"
    grid.title = f"{sweep_dir.name}: {shown} of each run's {settings.checkpoint} checkpoint"
    scored = next((r for r in rows if r.mean is not None), None)
    note = stand_in_note(scored.run, scored.checkpoint) if scored else None
    grid.title += f" ({note})" if note else ""
    return grid


def _aspect(grid: Grid) -> float:
    """Height / width of the first image the grid shows (panels are tall, scenes square)."""
    from PIL import Image

    for cell in grid.cells:
        if cell.image is not None and cell.image.is_file():
            with Image.open(cell.image) as im:
                return min(max(im.height / im.width, 0.5), 3.0)
    return 1.0


def grid_figure(grid: Grid):
    """One axes per cell: column headers ``x_key=value``, row headers ``y_key=value``, the score
    under each image; each axes' label is ``"<x>|<y>"`` so a reader (or test) finds its cell."""
    from matplotlib.figure import Figure

    rows, cols = len(grid.y_values), len(grid.x_values)
    height = CELL_INCHES * _aspect(grid) + 0.6
    fig = Figure(figsize=(0.8 + cols * CELL_INCHES, 0.8 + rows * height), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, y in enumerate(grid.y_values):
        for c, x in enumerate(grid.x_values):
            ax, cell = axes[r][c], grid.cell(x, y)
            missing = cell.label.split("\n")[0] if cell.checkpoint is None else "image missing"
            show_image(ax, cell.image, missing=missing, size=512)
            ax.set_label(f"{x}|{y if y is not None else ''}")
            ax.set_xlabel(cell.label, fontsize="small")
            if r == 0:
                ax.set_title(f"{grid.x_key}={x}", fontsize="medium", fontweight="bold")
            if c == 0 and y is not None:
                ax.set_ylabel(f"{grid.y_key}={y}", fontsize="medium", fontweight="bold")
    fig.suptitle(wrapped(grid.title, width=max(40, cols * 30)), fontsize="medium")
    return fig


def write_grid(rows, settings: GridSettings, sweep_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """``grid.png`` in ``out_dir`` (the sweep folder by default), written atomically."""
    sweep_dir = Path(sweep_dir)
    return save_figure(grid_figure(build_grid(rows, settings, sweep_dir)), Path(out_dir or sweep_dir) / GRID_IMAGE)


__all__ = ["GRID_IMAGE", "Cell", "Grid", "build_grid", "check_grid", "grid_figure", "run_overrides", "swept_keys",
           "swept_values", "write_grid"]
