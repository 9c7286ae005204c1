"""A run's pictures for people who do not open HTML, drawn with matplotlib beside ``metrics.jsonl``:
``curves.png`` (the loss raw and smoothed with the learning rate, the validation loss, the aesthetic
mean/min against the gate, CLIP-I/CLIP-T/copy-paste, per checkpoint) and ``progress.png`` (one row
per checkpoint, one column per scene, each row labelled with its step and mean score); and a
sweep's loss curves overlaid.

Figures use matplotlib's object API (``Figure``, no pyplot): no global state and no GUI backend, so
the trainer can redraw them at every checkpoint. The ``*_figure`` functions return the figure, so a
test can read back what was plotted; :func:`save_figure` writes it atomically.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from kolors_story.evaluate.run_folder import RunFolder
from kolors_story.files import atomic_path
from kolors_story.records import RunMetrics

CURVES_IMAGE = "curves.png"
PROGRESS_IMAGE = "progress.png"
SMOOTHING = 0.9  # weight of the loss curve's exponential moving average (TensorBoard's default slider)
TILE_INCHES = 1.1  # one scene in progress.png
DPI = 100
MISSING_COLOUR = "#eeeeee"


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average, debiased so the first points are not pulled toward zero."""
    out, avg = [], 0.0
    for n, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**n))
    return out


def _points(lines, value) -> tuple[list[int], list[float]]:
    """(steps, values) of the lines where ``value(line)`` is a number: gaps are left out, not zeroed."""
    pairs = [(line.step, value(line)) for line in lines]
    pairs = [(s, float(v)) for s, v in pairs if isinstance(v, (int, float))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _empty(ax, text: str) -> None:
    """An axes with nothing to plot says why, without meaningless 0..1 ticks."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey", wrap=True)


def wrapped(text: str, width: int = 110) -> str:
    """A title over several lines, broken after commas where it can: run folder names hold every
    override (``0_lora.rank=4,trainer.max_epochs=2``) and run long."""
    lines = [""]
    for part in text.replace(",", ",\0").split("\0"):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(piece for line in lines for piece in textwrap.wrap(line, width, break_long_words=True) or [""])


def _integer_steps(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _loss_axes(ax, metrics: RunMetrics) -> None:
    steps, loss = _points(metrics.train, lambda r: r.loss)
    ax.set_title("training loss")
    ax.set_xlabel("step")
    if not loss:
        _empty(ax, "no train steps in metrics.jsonl")
        return
    _integer_steps(ax)
    ax.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    ax.plot(steps, smooth(loss), color="tab:blue", linewidth=2, label=f"loss, smoothed ({SMOOTHING})")
    ax.set_ylabel("loss")
    handles = ax.get_lines()
    lr_steps, lr = _points(metrics.train, lambda r: r.lr)
    if lr:
        twin = ax.twinx()
        handles += twin.plot(lr_steps, lr, color="tab:orange", linewidth=1, label="lr (right axis)")
        twin.set_ylabel("learning rate", color="tab:orange")
        twin.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.legend(handles=handles, loc="upper right", fontsize="small")


def _checkpoint_axes(ax, metrics: RunMetrics, title: str, series: list[tuple[str, str, object]],
                     nothing: str, gate: float | None = None) -> None:
    """One value per checkpoint for each ``(label, colour, value(line))`` of ``series``."""
    ax.set_title(title)
    ax.set_xlabel("step")
    drawn = 0
    for label, colour, value in series:
        steps, ys = _points(metrics.checkpoints, value)
        if ys:
            ax.plot(steps, ys, marker="o", color=colour, label=label)
            drawn += 1
    if not drawn:
        _empty(ax, nothing)
        return
    _integer_steps(ax)
    if gate is not None:
        ax.axhline(gate, color="tab:red", linestyle="--", linewidth=1, label=f"gate {gate:g}")
    ax.legend(loc="best", fontsize="small")


def curves_figure(metrics: RunMetrics, gate: float = 6.0, title: str | None = None):
    """Four panels: loss (raw + smoothed, lr on a second axis), validation loss, aesthetic mean/min
    with the gate line, CLIP-I/CLIP-T/copy-paste; every value as read from ``metrics``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 7.5), dpi=DPI, layout="constrained")
    loss, val, aesthetic, clip = fig.subplots(2, 2).flat
    _loss_axes(loss, metrics)
    _checkpoint_axes(val, metrics, "validation loss", [("val loss", "tab:purple", lambda r: r.val_loss)],
                     "no validation loss (trainer.validation_split=0)")
    ema = [("mean (EMA)", "tab:cyan", lambda r: r.ema.mean if r.ema else None)]
    _checkpoint_axes(aesthetic, metrics, "aesthetic score per checkpoint",
                     [("mean", "tab:green", lambda r: r.mean), ("min", "tab:olive", lambda r: r.min), *ema],
                     "no scored checkpoint yet", gate=gate)
    _checkpoint_axes(clip, metrics, "story metrics per checkpoint",
                     [("CLIP-I (coherence)", "tab:brown", lambda r: r.coherence),
                      ("CLIP-T (prompt alignment)", "tab:pink", lambda r: r.clip_t),
                      ("copy-paste", "tab:gray", lambda r: r.copy_paste)],
                     "no CLIP numbers (no scored checkpoint, or scorer.alignment=false)")
    if title:
        fig.suptitle(wrapped(title), fontsize="medium")
    return fig


def _thumbnail(path: Path, size: int = 160):
    """The image scaled to fit a ``size`` square (up or down, aspect kept), as an RGB array."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return np.asarray(ImageOps.contain(im.convert("RGB"), (size, size), Image.Resampling.LANCZOS))


def show_image(ax, path: Path | None, missing: str = "missing", size: int = 160) -> None:
    """An image without axes decoration, or a grey tile saying what is missing."""
    ax.set_xticks([])
    ax.set_yticks([])
    if path is not None and Path(path).is_file():
        ax.imshow(_thumbnail(Path(path), size))
        return
    ax.set_facecolor(MISSING_COLOUR)
    _empty(ax, missing)


def _sheet(stories, cols: int, tile: int):
    """The scenes of every checkpoint as one picture: a row of ``cols`` square tiles per checkpoint
    (each image fitted into its tile), a white gap under each row for its scores; and the (row,
    column) of every missing image (its tile left grey)."""
    import numpy as np

    step_x, step_y = tile + tile // 16, tile + tile // 5
    sheet = np.full((len(stories) * step_y, cols * step_x, 3), 255, dtype=np.uint8)
    missing = []
    for r, story in enumerate(stories):
        for c in range(cols):
            path = story.images[c] if c < len(story.images) else None
            y, x = r * step_y, c * step_x
            if path is None or not Path(path).is_file():
                sheet[y:y + tile, x:x + tile] = 238
                missing.append((r, c))
                continue
            image = _thumbnail(Path(path), tile)
            h, w = image.shape[:2]
            sheet[y + (tile - h) // 2:y + (tile - h) // 2 + h, x + (tile - w) // 2:x + (tile - w) // 2 + w] = image
    return sheet, missing, step_x, step_y


def progress_figure(run: RunFolder, tile: int = 128):
    """Rows = checkpoints (labelled with the step and the mean score), columns = the story's scenes,
    each scene's score under it. Drawn as one image in one axes, so redrawing it at every checkpoint
    of a long run stays quick: the row labels are its y tick labels, the scene names its x ones."""
    from matplotlib.figure import Figure

    stories = run.checkpoints
    cols = max([len(s.images) for s in stories] or [1])
    fig = Figure(figsize=(1.4 + cols * TILE_INCHES, 0.8 + max(len(stories), 1) * TILE_INCHES * 1.2), dpi=DPI,
                 layout="constrained")
    ax = fig.add_subplot()
    if not stories:
        _empty(ax, "no checkpoint yet")
        return fig
    sheet, missing, step_x, step_y = _sheet(stories, cols, tile)
    ax.imshow(sheet)
    for r, c in missing:
        ax.text(c * step_x + tile / 2, r * step_y + tile / 2, "missing", ha="center", va="center", color="grey",
                fontsize="small")
    for r, story in enumerate(stories):
        for c, score in enumerate((story.line.scores or [])[:cols]):
            if score is not None:
                ax.text(c * step_x + tile / 2, r * step_y + tile + 2, f"{score:.3f}", ha="center", va="top",
                        fontsize="x-small")
    ax.set_yticks([r * step_y + tile / 2 for r in range(len(stories))],
                  [f"step {s.line.step}\n" + (f"mean {s.line.mean:.3f}" if s.line.mean is not None else "not scored")
                   for s in stories], fontsize="small")
    ax.xaxis.tick_top()
    ax.set_xticks([c * step_x + tile / 2 for c in range(cols)], [f"scene {c + 1}" for c in range(cols)],
                  fontsize="small")
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    note = f" ({run.note})" if run.note else ""
    fig.suptitle(wrapped(f"{run.name}: the story at each checkpoint{note}", width=int(cols * 14)), fontsize="medium")
    return fig


def overlay_figure(runs: list[tuple[str, RunMetrics]]):
    """Every run's loss (faint) and smoothed loss on one plot, one colour per run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title("training loss of every run (faint: raw, solid: smoothed)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    drawn = 0
    for i, (label, metrics) in enumerate(runs):
        steps, loss = _points(metrics.train, lambda r: r.loss)
        if not loss:
            continue
        colour = f"C{i % 10}"
        ax.plot(steps, loss, color=colour, alpha=0.25, linewidth=1)
        ax.plot(steps, smooth(loss), color=colour, linewidth=2, label=wrapped(label, 50))
        drawn += 1
    if drawn:
        _integer_steps(ax)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    else:
        _empty(ax, "no run has train steps")
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG atomically (a reader never sees a half-written picture)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight", pad_inches=0.15)  # nothing cut off at the edges
    return Path(path)


def refresh_run_pictures(run_dir: str | Path | RunFolder) -> dict[str, Path]:
    """(Re)write ``curves.png`` and ``progress.png`` beside the run's ``metrics.jsonl``; a run with
    missing files still gets both, saying what is missing. Returns {"curves": path, "progress": path}."""
    run = run_dir if isinstance(run_dir, RunFolder) else RunFolder.read(run_dir)
    title = run.name + (f" ({run.note})" if run.note else "")
    return {"curves": save_figure(curves_figure(run.metrics, gate=run.threshold, title=title), run.path / CURVES_IMAGE),
            "progress": save_figure(progress_figure(run), run.path / PROGRESS_IMAGE)}


__all__ = ["CURVES_IMAGE", "PROGRESS_IMAGE", "curves_figure", "overlay_figure", "progress_figure", "refresh_run_pictures",
           "save_figure", "show_image", "smooth"]
