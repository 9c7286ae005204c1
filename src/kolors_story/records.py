"""The records the project writes and reads back, defined once: their shapes and their files.

- a run folder (``train.py``): ``metrics.jsonl`` with :class:`TrainRecord`, :class:`CheckpointRecord`
  and :class:`StatusRecord` lines; ``checkpoints/step-XXXXXX/`` (LoRA files, story images,
  ``scores.json`` = :class:`CheckpointScores`, ``trainer_state.ckpt``) and ``checkpoints/last``.
- a story folder (``generate.py``): ``manifest.json`` = :class:`Manifest`, ``scores.json`` =
  :class:`StoryScores` + the image names.
Writers (training, generation, evaluation) and readers (leaderboard, W&B mirror, reproduce, model
card, submission) all use these names; the on-disk formats are the project's public interface.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, TypedDict

from kolors_story.errors import MissingFileError, SettingsError

# --------------------------------------------------------------------------- run folder layout

METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"  # <run>/checkpoints/step-XXXXXX/
LAST_FILE = "last"  # <run>/checkpoints/last: the name of the newest complete checkpoint
TRAINER_STATE = "trainer_state.ckpt"  # what resume= restores (optimizer, scheduler, data position, RNG)
SCORES_FILE = "scores.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "kolors-story-manifest/1"
PROMPTS_FILE = "prompts.csv"
PANEL_FILE = "panel.png"
CANDIDATES_FILE = "candidates.png"  # best-of: every candidate, the kept ones framed
EMA_SUFFIX = ":ema"  # a checkpoint's EMA weights (lora_ema.safetensors): checkpoint=step-XXXXXX:ema
WANDB_ID_FILE = "wandb_run.json"  # the run's W&B id, so a resumed run continues the same W&B run
TINY_NOTE = "tiny model: not a real result"


def checkpoint_name(step: int) -> str:
    return f"step-{int(step):06d}"


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder ``checkpoints/last`` names, or None before the first checkpoint."""
    f = Path(run_dir) / CHECKPOINTS / LAST_FILE
    if not f.exists():
        return None
    return Path(run_dir) / CHECKPOINTS / f.read_text(encoding="utf-8").strip()


# ------------------------------------------------------------------------------------ scores


class StoryScores(TypedDict):
    """The aesthetic verdict on a story (``evaluate.summary.story_scores``)."""

    scores: list[float]  # per image, in story order
    mean: float
    min: float
    max: float
    threshold: float  # the gate (6.0)
    passed: bool  # mean >= threshold
    coherence: float | None  # CLIP-I: mean pairwise cosine of the panels' CLIP image embeddings (None below 2)
    outlier: int | None  # 1-based index of the least similar image
    similarity_to_others: list[float | None]
    alignment: list[float | None] | None  # CLIP-T per panel: cosine with its own English prompt (None: no prompts)
    clip_t: float | None  # mean CLIP-T
    duplicate_pairs: list[dict]  # panel pairs that are copies: {"panels": [i, j], "why": [...], ...}
    copy_paste: float  # share of panel pairs that are copies (0..1)
    story_objective: float  # mean aesthetic + weighted CLIP-I + CLIP-T - copy-paste (evaluate.selection)


class SceneScore(TypedDict):
    index: int
    seed: int
    description: str
    prompt: str
    prompt_en: str  # what CLIP-T scored the image against
    score: float
    image: str


class CheckpointScores(StoryScores):
    """``checkpoints/step-XXXXXX/scores.json``."""

    step: int
    scenes: list[SceneScore]
    sampler: dict  # scheduler, steps, cfg, height, width of the validation render
    tiny_scorer: bool


# --------------------------------------------------------------------------- metrics.jsonl


class TrainRecord(TypedDict, total=False):
    type: str  # "train"
    step: int
    epoch: int
    loss: float
    lr: float
    time: float
    reward: float  # reward=aesthetic: mean aesthetic score of this step's reward renders


class CheckpointRecord(TypedDict, total=False):
    """A ``checkpoint`` line; the story fields are None when validation was off or failed."""

    type: str  # "checkpoint"
    step: int
    epoch: int
    dir: str  # checkpoint folder, relative to the run
    scores: list[float] | None
    mean: float | None
    min: float | None
    passed: bool | None
    coherence: float | None  # CLIP-I
    outlier: int | None
    clip_t: float | None  # mean prompt alignment (None: alignment off)
    copy_paste: float | None  # share of panel pairs that are copies
    story_objective: float | None  # evaluate.selection.Objective of the story
    panel: str | None  # relative to the run
    images: list[str]  # relative to the run
    files: dict[str, str]  # LoRA format -> file, relative to the run
    skipped: dict[str, str]  # LoRA format -> why it was not written (lora.type it cannot hold)
    trainer_state: str
    interrupted: bool  # saved on Ctrl-C
    validation_error: str  # the story render failed; the LoRA is saved without scores
    val_loss: float  # the held-out validation loss (trainer.validation_split > 0; train.held_out)
    ema: dict  # trainer.ema: the EMA weights' files, val_loss and story scores/panel (same keys as above)
    reward_held_out: float  # reward=aesthetic: mean score of the held-out scenes' renders (fixed seeds)


class StatusRecord(TypedDict):
    type: str  # "status"
    status: str  # finished | failed | interrupted
    error: str | None
    step: int


def _clean(value):
    """JSON cannot hold NaN/Inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsWriter:
    """Appends records to ``<run>/metrics.jsonl`` (appending: a resumed run continues the file).
    Each line is written and flushed whole, so a killed job leaves at most one torn last line."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> dict:
        line = json.dumps(_clean(record), ensure_ascii=False, default=str)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        return record


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl (or of a run folder's); a torn last line is skipped."""
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


def record_failure(run_dir: Path, exc: BaseException) -> None:
    """Append a failed status line unless the job already wrote its own."""
    records = read_metrics(run_dir)
    if records and records[-1].get("type") == "status" and records[-1].get("status") == "failed":
        return
    step = max((int(r.get("step", 0)) for r in records if isinstance(r.get("step"), int)), default=0)
    MetricsWriter(run_dir).write(StatusRecord(type="status", status="failed", step=step,
                                              error=f"{type(exc).__name__}: {exc}"))


# ------------------------------------------------------------------------------- manifest


class LoraRecord(TypedDict, total=False):
    path: str
    file: str
    scale: float
    sha256: str | None
    bundle_file: str  # its name inside a submission bundle


class SceneRecord(TypedDict, total=False):
    index: int
    description: str
    prompt: str
    negative: str
    seed: int  # seed of the kept image (best-of may pick another candidate than the scene's own)
    scene_seed: int
    caption_ascii: str
    image: str
    sha256: str
    score: float | None
    candidates: list[dict]  # best-of: [{candidate, seed, score[, clip_t]}]
    chosen_candidate: int


class Manifest(TypedDict, total=False):
    """``manifest.json`` of a story folder or bundle: enough to regenerate every image."""

    format: str  # MANIFEST_FORMAT
    created: str
    tiny_model: bool
    note: str | None
    model: dict  # name, path, path_resolved, vae_path, hash, dtype, device
    loras: list[LoraRecord]
    scheduler: dict  # class + full config
    sampler: dict
    hires: dict | None
    best_of: dict | None
    selection: dict | None  # best-of: objective, every candidate's scores, chosen per scene, why (generate.selection)
    candidates_panel: str | None  # best-of: CANDIDATES_FILE
    coherence: dict | None  # generate.coherence: sharing references + recorded bytes, reference image sha256, adapter
    memory: dict
    story: dict  # title, language, trigger
    scenes: list[SceneRecord]
    images: dict[str, str]  # file -> sha256
    panel: str
    scores: dict | None  # StoryScores (+ note) when scored
    source: dict | None  # the training checkpoint (run=) or the reproduced manifest
    config: dict  # the resolved generate config
    overrides: list[str]
    versions: dict[str, Any]
    seconds: float
    bundle: dict  # only inside a submission bundle


def story_files(folder: str | Path) -> list[Path]:
    """The files a rendered story consists of in ``folder`` (images ``<n>.png``, panel, candidates
    grid, prompts, scores, manifest); bundles and Hydra's own files beside them are not part of it."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    named = {MANIFEST_FILE, SCORES_FILE, PROMPTS_FILE, PANEL_FILE, CANDIDATES_FILE}
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and (p.name in named or (p.suffix == ".png" and p.stem.isdigit())))


def load_manifest(source: str | Path) -> tuple[Manifest, Path]:
    """The manifest and the folder holding its images (a bundle, output folder or the file itself)."""
    path = Path(str(source)).expanduser()
    if path.is_dir():
        manifest_path = path / MANIFEST_FILE
    elif path.is_file():
        manifest_path = path
    else:
        raise MissingFileError(f"reproduce={source}: no such file or folder")
    if not manifest_path.is_file():
        raise MissingFileError(
            f"reproduce={source}: {manifest_path} does not exist; give a generate.py output folder, a submission "
            "bundle or a manifest.json"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SettingsError(f"{manifest_path} is not valid JSON ({err}); it is not a kolors-story manifest") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or "config" not in manifest:
        raise SettingsError(f"{manifest_path} is not a kolors-story manifest (expected format {MANIFEST_FORMAT!r})")
    return manifest, manifest_path.parent
