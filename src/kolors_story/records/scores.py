"""What a story's scores add up to, as written to ``scores.json`` (a story folder's or a checkpoint's)."""

from __future__ import annotations

from kolors_story.records.base import Record


class StoryScores(Record):
    """The aesthetic verdict on a story (``evaluate.summary.story_scores``)."""

    scores: list[float]  # per image, in story order
    mean: float
    min: float
    max: float
    threshold: float  # the gate (6.0)
    passed: bool  # mean >= threshold
    coherence: float | None = None  # CLIP-I: mean pairwise cosine of the panels' CLIP image embeddings (None below 2)
    outlier: int | None = None  # 1-based index of the least similar image
    similarity_to_others: list[float | None] = []
    alignment: list[float | None] | None = None  # CLIP-T per panel: cosine with its own English prompt (None: no prompts)
    clip_t: float | None = None  # mean CLIP-T
    duplicate_pairs: list[dict] = []  # panel pairs that are copies: {"panels": [i, j], "why": [...], ...}
    copy_paste: float = 0.0  # share of panel pairs that are copies (0..1)
    story_objective: float | None = None  # mean aesthetic + weighted CLIP-I + CLIP-T - copy-paste (evaluate.objective)
    note: str | None = None  # e.g. scored by a stand-in predictor
    images: list[str] | None = None  # the image files, in story order (a story folder's scores.json)


class SceneScore(Record):
    index: int
    seed: int
    description: str = ""
    prompt: str = ""
    prompt_en: str = ""  # what CLIP-T scored the image against
    score: float
    image: str


class CheckpointScores(StoryScores):
    """``checkpoints/step-XXXXXX/scores.json``."""

    step: int
    scenes: list[SceneScore] = []
    sampler: dict = {}  # scheduler, steps, cfg, height, width of the validation render
    tiny_scorer: bool = False


__all__ = ["CheckpointScores", "SceneScore", "StoryScores"]
