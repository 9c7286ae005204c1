"""A training run's folder, read once for its pictures and report: the metrics lines, the settings
Hydra recorded (``.hydra/``), each checkpoint's story files, ``before_after.json`` and ``plan.json``,
and, in words, what is missing or damaged (a torn ``metrics.jsonl``, a panel that was never
written), so that a report of a half-finished or broken run says so instead of failing."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kolors_story import tiny
from kolors_story.records import (
    EMA_SUFFIX,
    METRICS_FILE,
    PLAN_FILE,
    SCORES_FILE,
    CheckpointLine,
    CheckpointScores,
    PlanRecord,
    RecordError,
    RunMetrics,
    StatusLine,
    TrainLine,
    read_metrics,
)
from kolors_story.story import STORY_LENGTH

BEFORE_AFTER_IMAGE = "before_after.png"  # written by the trainer when a validated run finishes
BEFORE_AFTER_FILE = "before_after.json"
DEFAULT_GATE = 6.0  # the competition's gate on the mean aesthetic score, when the run recorded none


@dataclass
class CheckpointStory:
    """One checkpoint's story as the report shows it: its metrics line, its images (None: missing)."""

    line: CheckpointLine
    panel: Path | None  # None: no panel file
    images: list[Path | None]  # scene i -> its image, None where the file is missing
    scores: CheckpointScores | None = None  # the checkpoint's scores.json (scene texts, the gate)

    @property
    def name(self) -> str:
        return Path(self.line.dir).name


@dataclass
class RunFolder:
    path: Path
    metrics: RunMetrics
    missing: list[str] = field(default_factory=list)  # what is missing or damaged, one sentence each
    overrides: list[str] = field(default_factory=list)  # .hydra/overrides.yaml: the command line's overrides
    choices: dict[str, str] = field(default_factory=dict)  # config group -> option (.hydra/hydra.yaml)
    config: dict | None = None  # .hydra/config.yaml, as saved (interpolations unresolved)
    checkpoints: list[CheckpointStory] = field(default_factory=list)
    before_after: dict | None = None
    plan: PlanRecord | None = None
    threshold: float = DEFAULT_GATE
    note: str | None = None  # the tiny model's "not a real result" when a stand-in scored the stories

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def status(self) -> str:
        return self.metrics.status.status if self.metrics.status else ("running or killed" if self.metrics.lines else "no metrics")

    @classmethod
    def read(cls, run_dir: str | Path) -> RunFolder:
        run = Path(run_dir)
        metrics, missing = read_run_metrics(run)
        folder = cls(path=run, metrics=metrics, missing=missing)
        folder._read_settings()
        folder.checkpoints = [_story(run, line, folder.missing) for line in metrics.checkpoints]
        recorded = [c.scores for c in folder.checkpoints if c.scores is not None]
        if recorded:
            folder.threshold = float(recorded[-1].threshold)
            folder.note = tiny.NOTE if recorded[-1].tiny_scorer else None
        folder._read_extras()
        return folder

    def _read_settings(self) -> None:
        hydra_dir = self.path / ".hydra"
        if not (hydra_dir / "config.yaml").is_file():
            self.missing.append(f"no {hydra_dir / 'config.yaml'}: the run's settings are unknown")
            return
        self.config = _yaml(hydra_dir / "config.yaml", self.missing) or {}
        self.overrides = [str(o) for o in (_yaml(hydra_dir / "overrides.yaml", self.missing) or [])]
        hydra = _yaml(hydra_dir / "hydra.yaml", self.missing) or {}
        choices = ((hydra.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
        # the groups a user picks (model=tiny); not Hydra's own or the auto-selected per-model ones
        self.choices = {k: str(v) for k, v in choices.items() if "/" not in k and not k.startswith("hydra")}
        threshold = (self.config.get("scorer") or {}).get("threshold")
        if isinstance(threshold, (int, float)):
            self.threshold = float(threshold)

    def _read_extras(self) -> None:
        f = self.path / BEFORE_AFTER_FILE
        if f.is_file():
            try:
                self.before_after = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as err:
                self.missing.append(f"{f} cannot be read ({err})")
        if (self.path / PLAN_FILE).is_file():
            try:
                self.plan = PlanRecord.read(self.path / PLAN_FILE)
            except RecordError as err:
                self.missing.append(str(err))


def read_run_metrics(run: Path) -> tuple[RunMetrics, list[str]]:
    """The run's metrics and what is wrong with them: no file, torn or damaged lines, no end."""
    path = run / METRICS_FILE
    if not path.is_file():
        return RunMetrics(path=path), [f"no {METRICS_FILE}: the job died before training started, or {run} is "
                                       "not a train.py run folder"]
    written = sum(1 for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip())
    missing, damaged = [], 0
    try:
        metrics = RunMetrics.read(path)
    except RecordError as err:  # a damaged line: keep every line that still reads
        metrics, damaged = _read_leniently(path)
        missing.append(f"{err} ({damaged} such line(s) left out)")
    torn = written - metrics.lines - damaged
    if torn:
        missing.append(f"{METRICS_FILE}: {torn} unreadable line(s) left out (a torn last line: the job was "
                       "killed while writing it)")
    if metrics.lines and metrics.status is None:
        missing.append(f"{METRICS_FILE} has no status line: the run is still going, or it was killed")
    if metrics.lines and not metrics.train:
        missing.append(f"{METRICS_FILE} has no train steps: no loss curve")
    if metrics.lines and not metrics.checkpoints:
        missing.append("no checkpoint yet: no scores and no story panels")
    return metrics, missing


def _read_leniently(path: Path) -> tuple[RunMetrics, int]:
    """``RunMetrics.read`` that skips the lines it cannot type instead of refusing the file; and
    how many it skipped."""
    out, damaged = RunMetrics(path=path), 0
    kinds = {"train": TrainLine, "checkpoint": CheckpointLine, "status": StatusLine}
    for raw in read_metrics(path):
        kind = kinds.get(raw.get("type")) if isinstance(raw, dict) else None
        try:
            record = kind.from_json(raw) if kind else None
        except RecordError:
            damaged += 1
            continue
        out.lines += 1
        if isinstance(record, TrainLine):
            out.train.append(record)
        elif isinstance(record, CheckpointLine):
            out.checkpoints.append(record)
        elif isinstance(record, StatusLine):
            out.status = record
    return out, damaged


def _story(run: Path, line: CheckpointLine, missing: list[str]) -> CheckpointStory:
    folder = run / line.dir
    names = line.images or [f"{line.dir}/{i}.png" for i in range(1, STORY_LENGTH + 1)]
    images = [(run / n) if (run / n).is_file() else None for n in names]
    panel = run / line.panel if line.panel else None
    if line.validation_error:
        missing.append(f"{folder.name}: the story render failed ({line.validation_error.splitlines()[0]}); "
                       "no panel or scores")
    elif panel is None:
        missing.append(f"{folder.name}: no story panel recorded (validation was off)")
    elif not panel.is_file():
        missing.append(f"{folder.name}: the panel {panel} is missing")
        panel = None
    lost = sum(1 for i in images if i is None)
    if lost and line.images:
        missing.append(f"{folder.name}: {lost} of {len(images)} scene images are missing")
    scores = None
    if (folder / SCORES_FILE).is_file():
        try:
            scores = CheckpointScores.read(folder / SCORES_FILE)
        except RecordError as err:
            missing.append(str(err))
    return CheckpointStory(line=line, panel=panel, images=images, scores=scores)


def _yaml(path: Path, missing: list[str]):
    if not path.is_file():
        missing.append(f"no {path}")
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        missing.append(f"{path} cannot be read ({type(err).__name__})")
        return None


def stand_in_note(run: Path, checkpoint: str | None) -> str | None:
    """The tiny model's note when a checkpoint's story was scored by the tiny stand-in scorer
    (its ``scores.json`` says so), else None."""
    if not checkpoint:
        return None
    f = Path(run) / checkpoint.removesuffix(EMA_SUFFIX) / SCORES_FILE
    try:
        return tiny.NOTE if f.is_file() and CheckpointScores.read(f).tiny_scorer else None
    except RecordError:
        return None


def split_override(override: str) -> tuple[str, str]:
    """``lora.rank=4`` -> (``lora.rank``, ``4``); ``+a.b=1`` -> (``a.b``, ``1``); ``~a`` -> (``a``, ``(deleted)``)."""
    key, eq, value = str(override).partition("=")
    return key.lstrip("+~"), value if eq else "(deleted)"


__all__ = ["BEFORE_AFTER_FILE", "BEFORE_AFTER_IMAGE", "CheckpointStory", "RunFolder", "read_run_metrics",
           "split_override", "stand_in_note"]
