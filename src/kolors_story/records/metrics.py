"""A run's ``metrics.jsonl``: one JSON line per train step, checkpoint and status, appended as
training goes. :class:`RunMetrics` reads a run's lines back as typed records (leaderboard, W&B
mirror, the end-of-run summary, resume)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from kolors_story.records.base import Record, finite
from kolors_story.records.layout import METRICS_FILE


class TrainLine(Record):
    """A ``train`` line: one optimizer step."""

    ALWAYS = ("type",)
    type: str = "train"
    step: int
    epoch: int | None = None
    loss: float | None = None
    lr: float | None = None
    time: float | None = None
    reward: float | None = None  # reward=aesthetic: mean aesthetic score of this step's reward renders


class StoryNumbers(Record):
    """The validation story's numbers at a checkpoint (None when validation was off or failed)."""

    scores: list[float] | None = None
    mean: float | None = None
    min: float | None = None
    passed: bool | None = None
    coherence: float | None = None  # CLIP-I
    outlier: int | None = None
    clip_t: float | None = None  # mean prompt alignment (None: alignment off)
    copy_paste: float | None = None  # share of panel pairs that are copies
    story_objective: float | None = None  # evaluate.objective.Objective of the story
    panel: str | None = None  # relative to the run
    images: list[str] | None = None  # relative to the run
    val_loss: float | None = None  # the held-out validation loss (trainer.validation_split > 0; train.held_out)
    validation_error: str | None = None  # the story render failed; the LoRA is saved without scores


class EmaNumbers(StoryNumbers):
    """A checkpoint's EMA weights (``trainer.ema``): their files and their own story numbers."""

    files: dict[str, str] = {}


class CheckpointLine(StoryNumbers):
    """A ``checkpoint`` line."""

    ALWAYS = ("type",)
    type: str = "checkpoint"
    step: int
    epoch: int | None = None
    dir: str  # checkpoint folder, relative to the run
    files: dict[str, str] = {}  # LoRA format -> file, relative to the run
    skipped: dict[str, str] | None = None  # LoRA format -> why it was not written (lora.type it cannot hold)
    trainer_state: str | None = None
    interrupted: bool | None = None  # saved on Ctrl-C seen as an exception (no renders)
    stopped: str | None = None  # saved on a stop signal (SIGTERM, SIGINT) at a step boundary: no renders
    ema: EmaNumbers | None = None
    reward_held_out: float | None = None  # reward=aesthetic: mean score of the held-out scenes' renders (fixed seeds)

    @property
    def scored(self) -> bool:
        return self.mean is not None


class StatusLine(Record):
    """The ``status`` line a run ends with: finished | stopped | failed | interrupted."""

    ALWAYS = ("type",)
    type: str = "status"
    status: str
    error: str | None = None  # failed: the cause; stopped: what stopped it
    step: int = 0
    signal: str | None = None  # stopped: SIGTERM or SIGINT


class CharacterLine(Record):
    """A ``character`` line: one round of the character LoRA loop (``character=auto``, train.character)."""

    ALWAYS = ("type",)
    type: str = "character"
    round: int
    candidates: int  # renders of this round
    phrasings: int  # prompts they were rendered from
    clusters: int  # clusters the renders were split into
    cluster_size: int  # renders in the chosen cluster
    cluster_similarity: float  # its mean pairwise CLIP cosine (pairs of different phrasings): what the rounds raise
    cluster_excess: float | None = None  # that cosine above the mean of all renders of the same phrasings: what the choice maximises (~0 at random)
    candidates_similarity: float  # the same over all renders: how consistently the model draws the character
    chosen: list[int] = []  # the chosen renders (0-based, in render order)
    choice: str = "tightest"  # how: the tightest cluster, or random renders as many (character.cluster=random, a control)
    trained: bool = False  # an entity LoRA was trained on them in this round
    steps: int | None = None  # its optimizer steps
    loss: float | None = None  # its last training loss
    lora: str | None = None  # its file, relative to the run
    stopped: str | None = None  # why the loop ended after this round (rounds done, no gain)
    sheets: dict[str, str] = {}  # candidates / cluster sheet PNGs, relative to the run
    seconds: float | None = None


class CharacterMade(Record):
    """How a character LoRA was made: the ``character`` key of its files' metadata (train.character),
    read back by the bundle's model card."""

    prompt: str  # the character as the phrasings named it
    method: str = ""
    phrasings: list[str] = []  # the candidates' prompts, the character put in
    candidates: int  # renders per round
    min_cluster: int
    cluster: str = "tightest"  # character.cluster: tightest, or random (a control run)
    rank: int
    steps: int  # LoRA steps per round
    lr: float
    rounds: list[CharacterLine] = []


class MetricsWriter:
    """Appends records to ``<run>/metrics.jsonl`` (appending: a resumed run continues the file).
    Each line is written and flushed whole, so a killed job leaves at most one torn last line."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: Record | dict) -> Record | dict:
        data = record.to_json() if isinstance(record, Record) else finite(record)
        line = json.dumps(data, ensure_ascii=False, default=str)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        return record


def read_metrics(path: str | Path) -> list[dict]:
    """All lines of a metrics.jsonl (or of a run folder's) as plain JSON; a torn last line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    out = []
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


@dataclass
class RunMetrics:
    """A run's metrics.jsonl, parsed: its train steps, checkpoints and last status (None while running)."""

    path: Path
    train: list[TrainLine] = field(default_factory=list)
    checkpoints: list[CheckpointLine] = field(default_factory=list)
    status: StatusLine | None = None  # the last status line
    ended: bool = False  # the file's last line is that status line
    lines: int = 0  # every line read, of any type
    other_steps: list[int] = field(default_factory=list)  # steps named by other events (resume, ...)
    character: list[CharacterLine] = field(default_factory=list)  # the character LoRA's rounds (character=auto)

    @classmethod
    def read(cls, run_dir: str | Path) -> RunMetrics:
        path = Path(run_dir)
        path = path / METRICS_FILE if path.is_dir() or path.suffix != ".jsonl" else path
        out = cls(path=path)
        kinds = {"train": TrainLine, "checkpoint": CheckpointLine, "status": StatusLine, "character": CharacterLine}
        for n, raw in enumerate(read_metrics(path), 1):
            out.lines += 1
            kind = kinds.get(raw.get("type")) if isinstance(raw, dict) else None
            out.ended = kind is StatusLine
            if kind is None:  # other events (resume, ...) and lines of a newer version
                if isinstance(raw, dict) and isinstance(raw.get("step"), int):
                    out.other_steps.append(raw["step"])
                continue
            record = kind.from_json(raw, source=f"{path} line {n}")
            if isinstance(record, TrainLine):
                out.train.append(record)
            elif isinstance(record, CheckpointLine):
                out._add_checkpoint(record)
            elif isinstance(record, CharacterLine):
                out.character.append(record)
            else:
                out.status = record
        return out

    def _add_checkpoint(self, record: CheckpointLine) -> None:
        """A later line for the same checkpoint (its story rendered on resume) replaces the earlier one."""
        same = [i for i, c in enumerate(self.checkpoints) if c.dir == record.dir]
        if same:
            self.checkpoints[same[-1]] = record
        else:
            self.checkpoints.append(record)

    @property
    def last_step(self) -> int:
        steps = [r.step for r in (*self.train, *self.checkpoints)] + ([self.status.step] if self.status else [])
        steps += self.other_steps
        return max(steps, default=0)


def record_failure(run_dir: Path, exc: BaseException) -> None:
    """Append a failed status line unless the job already wrote its own."""
    metrics = RunMetrics.read(run_dir)
    if metrics.ended and metrics.status.status == "failed":
        return
    MetricsWriter(run_dir).write(StatusLine(status="failed", step=metrics.last_step,
                                            error=f"{type(exc).__name__}: {exc}"))


__all__ = ["CharacterLine", "CharacterMade", "CheckpointLine", "EmaNumbers", "MetricsWriter", "RunMetrics", "StatusLine", "StoryNumbers", "TrainLine",
           "read_metrics", "record_failure"]
