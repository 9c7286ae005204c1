"""Small shared types of the data stage: candidates, drops and the error that carries a report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kolors_story.errors import UserError

# Extensions a source folder is scanned for (case-insensitive). Anything else is listed as ignored.
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


class DataError(UserError, RuntimeError):
    """A data-stage failure the user has to act on. ``report`` holds the bad files found so far
    (the same dict that is written to ``report.failed.json``); ``step`` names the step that failed."""

    def __init__(self, message: str, *, step: str = "data", report: dict | None = None):
        super().__init__(message)
        self.step = step
        self.report = report or {}


@dataclass
class Candidate:
    """One image the source proposes, with its caption; problems found while listing are kept in
    ``problem`` and reported by preflight (so every bad file appears in one place)."""

    name: str  # what reports show: the path relative to the source folder (or a metadata row)
    path: Path | None  # the image file; None for a caption/row with no image
    caption: str | None  # already prefixed and whitespace-normalised; None = missing
    problem: str | None = None


@dataclass
class Dropped:
    file: str
    step: str  # source | preflight | filter
    reason: str
    op: str | None = None  # the data-juicer op, for step == "filter"

    def as_dict(self) -> dict:
        out = {"file": self.file, "step": self.step, "reason": self.reason}
        if self.op:
            out["op"] = self.op
        return out


@dataclass
class SourceListing:
    """What a source produced: the candidates in a stable order, plus dataset-level notes."""

    root: Path
    candidates: list[Candidate]
    captions_from: str  # "metadata.csv", "metadata.jsonl" or ".txt files"
    ignored: list[str] = field(default_factory=list)  # files that are neither images nor captions
