"""Where a run's and a story's files live, by name: the run folder (``metrics.jsonl``,
``checkpoints/step-XXXXXX/`` with the LoRA files, ``checkpoints/last``) and the story folder
(``1.png``..``8.png``, ``panel.png``, ``prompts.csv``, ``scores.json``, ``manifest.json``)."""

from __future__ import annotations

from pathlib import Path

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
CHARACTER_DIR = "character"  # <run>/character/: the character LoRA (character=auto) and its round-N/ folders

# The three LoRA formats every checkpoint holds, by file name (lora.files writes them).
FILE_NAMES = {
    "diffusers": "lora.safetensors",
    "kohya": "lora_kohya.safetensors",
    "diffsynth": "lora_diffsynth.ckpt",
}


def checkpoint_name(step: int) -> str:
    return f"step-{int(step):06d}"


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder ``checkpoints/last`` names, or None before the first checkpoint."""
    f = Path(run_dir) / CHECKPOINTS / LAST_FILE
    if not f.exists():
        return None
    return Path(run_dir) / CHECKPOINTS / f.read_text(encoding="utf-8").strip()


def with_suffix(name: str, suffix: str) -> str:
    """``lora_kohya.safetensors`` + ``_ema`` -> ``lora_kohya_ema.safetensors``."""
    stem, dot, ext = name.partition(".")
    return f"{stem}{suffix}{dot}{ext}"


def checkpoint_lora_file(folder, suffix: str = "") -> Path:
    """The file that stands for a checkpoint folder's adapter: ``lora.safetensors``, or the kohya file
    for the types diffusers cannot hold (LoHa/LoKr). The path of the first when neither exists."""
    folder = Path(folder)
    candidates = [folder / with_suffix(FILE_NAMES[fmt], suffix) for fmt in ("diffusers", "kohya")]
    return next((c for c in candidates if c.is_file()), candidates[0])


def story_files(folder: str | Path) -> list[Path]:
    """The files a rendered story consists of in ``folder`` (images ``<n>.png``, panel, candidates
    grid, prompts, scores, manifest); bundles and Hydra's own files beside them are not part of it."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    named = {MANIFEST_FILE, SCORES_FILE, PROMPTS_FILE, PANEL_FILE, CANDIDATES_FILE}
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and (p.name in named or (p.suffix == ".png" and p.stem.isdigit())))


__all__ = ["CANDIDATES_FILE", "CHARACTER_DIR", "CHECKPOINTS", "EMA_SUFFIX", "FILE_NAMES", "LAST_FILE", "MANIFEST_FILE", "MANIFEST_FORMAT",
           "METRICS_FILE", "PANEL_FILE", "PROMPTS_FILE", "SCORES_FILE", "TRAINER_STATE", "WANDB_ID_FILE",
           "checkpoint_lora_file", "checkpoint_name", "last_checkpoint", "story_files", "with_suffix"]
