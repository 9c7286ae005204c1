"""``report.html`` of a training run, in its folder: what was changed from the defaults, the loss
and score curves, every checkpoint's numbers and story panel, before/after, the memory plan and
where the files are; plus what is missing when the run is broken or half-written. One file that
opens from the disk without W&B or a server (images are linked relative to it).

Written by ``python evaluate.py report=<run>`` and by the trainer at the end of a run; a sweep's
report writes the reports of its runs that lack one.
"""

from __future__ import annotations

from pathlib import Path

from kolors_story.errors import MissingFileError
from kolors_story.evaluate.html import REPORT_FILE, href, render
from kolors_story.evaluate.plots import refresh_run_pictures
from kolors_story.evaluate.run_folder import BEFORE_AFTER_IMAGE, CheckpointStory, RunFolder, split_override
from kolors_story.files import atomic_write_text
from kolors_story.records import CHECKPOINTS, LAST_FILE, METRICS_FILE, PLAN_FILE, WANDB_ID_FILE

SETTINGS_SOURCE = (
    "Read from the run's .hydra/overrides.yaml: the overrides Hydra recorded from the command line, so this is "
    "exactly what differed from the defaults when the run started (comparing config.yaml with today's defaults "
    "would also list every default changed in the code since). A config group option (lora=entity) sets several "
    "keys at once; every value the run used is in .hydra/config.yaml."
)


def _config_value(config: dict | None, key: str) -> str:
    """The value of a dotted key in the saved config, as saved ('' when the config lacks it)."""
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return ""
        node = node[part]
    return "(a group: see below)" if isinstance(node, dict) else str(node)


def _settings(run: RunFolder) -> list[dict]:
    out = []
    for override in run.overrides:
        key, value = split_override(override)
        group = key in run.choices
        out.append({"key": key, "value": value, "group": group,
                    "saved": f"option {run.choices[key]}" if group else _config_value(run.config, key)})
    return out


def _numbers(name: str, numbers, step: int) -> dict:
    return {"name": name, "step": step, "mean": numbers.mean, "min": numbers.min, "passed": numbers.passed,
            "coherence": numbers.coherence, "clip_t": numbers.clip_t, "copy_paste": numbers.copy_paste,
            "story_objective": numbers.story_objective, "val_loss": numbers.val_loss}


def _checkpoint(run: RunFolder, story: CheckpointStory) -> dict:
    line, page = story.line, run.path
    files = line.files or {}
    lora = files.get("diffusers") or next(iter(files.values()), None)
    scenes = story.scores.scenes if story.scores else []
    return {**_numbers(story.name, line, line.step), "folder": href(page / line.dir, page),
            "lora": href(page / lora, page) if lora else None, "lora_name": Path(lora).name if lora else None,
            "panel": href(story.panel, page), "panel_path": line.panel, "error": line.validation_error,
            "ema": _numbers(f"{story.name} (EMA)", line.ema, line.step) if line.ema else None,
            "scenes": [{"index": s.index, "score": s.score, "text": s.prompt_en or s.description} for s in scenes]}


def _files(run: RunFolder) -> list[dict]:
    """Where things are: each file or folder the run wrote, with a link, when it exists."""
    page = run.path
    last = page / CHECKPOINTS / LAST_FILE
    last_name = last.read_text(encoding="utf-8").strip() if last.is_file() else None
    wanted = [
        ("metrics, one JSON line per step / checkpoint / status", page / METRICS_FILE),
        ("settings the run used (Hydra)", page / ".hydra" / "config.yaml"),
        ("command-line overrides", page / ".hydra" / "overrides.yaml"),
        ("checkpoints (LoRA files in three formats, story images, scores.json)", page / CHECKPOINTS),
        (f"last complete checkpoint: {last_name}", page / CHECKPOINTS / last_name if last_name else None),
        ("curves (loss, lr, val loss, scores)", page / "curves.png"),
        ("the story at each checkpoint", page / "progress.png"),
        ("before/after: the story at LoRA scale 0 and 1", page / BEFORE_AFTER_IMAGE),
        ("memory plan", page / PLAN_FILE),
        ("the run's log", page / "train.log"),
        ("W&B files (offline: wandb sync <folder>)", page / "wandb"),
        ("W&B run id", page / WANDB_ID_FILE),
    ]
    return [{"what": what, "name": str(path.relative_to(page)), "href": href(path, page)}
            for what, path in wanted if path is not None and path.exists()]


def _before_after(run: RunFolder) -> dict | None:
    image = run.path / BEFORE_AFTER_IMAGE
    if run.before_after is None and not image.is_file():
        return None
    shift = run.before_after or {}
    rows = [(label, shift.get(key) or {}, shift.get(distance)) for label, key, distance in (
        ("LoRA scale 0 (base model)", "before", "distance_before"), ("LoRA scale 1 (trained)", "after", "distance_after"),
        ("style set (training images)", "style", None))] if shift else []
    return {"image": href(image, run.path) if image.is_file() else None, "rows": rows, "moved": shift.get("moved")}


def run_context(run: RunFolder, pictures: dict[str, Path]) -> dict:
    """Everything the run page shows, as plain values (the template only lays them out)."""
    status = run.metrics.status
    return {
        "run": run, "status": run.status, "error": status.error if status else None,
        "step": run.metrics.last_step, "missing": run.missing, "note": run.note, "threshold": run.threshold,
        "settings": _settings(run), "settings_source": SETTINGS_SOURCE, "choices": run.choices,
        "curves": href(pictures["curves"], run.path), "progress": href(pictures["progress"], run.path),
        "checkpoints": [_checkpoint(run, s) for s in run.checkpoints], "before_after": _before_after(run),
        "plan": run.plan, "files": _files(run), "folder": str(run.path.resolve()),
    }


def write_run_report(run_dir: str | Path) -> Path:
    """(Re)write ``<run>/report.html`` with ``curves.png`` and ``progress.png`` beside it; a run
    with missing or damaged files still gets one, listing what is missing. Returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingFileError(f"report={run_dir}: no such folder (give a train.py run folder)")
    if not (run_dir / METRICS_FILE).exists() and not (run_dir / ".hydra").is_dir():
        hint = " (it holds job folders: for a sweep use sweep=<folder>)" if any(run_dir.glob("*/.hydra")) else ""
        raise MissingFileError(f"report={run_dir} is not a train.py run folder: no {METRICS_FILE} or .hydra/{hint}")
    run = RunFolder.read(run_dir)
    pictures = refresh_run_pictures(run)
    html = render("run_report.html.j2", **run_context(run, pictures))
    return atomic_write_text(run_dir / REPORT_FILE, html)


__all__ = ["SETTINGS_SOURCE", "run_context", "write_run_report"]
