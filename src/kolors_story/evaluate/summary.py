"""What a story's scores add up to: the competition gate on the mean aesthetic score, how well the
panels hang together (CLIP-I coherence: mean pairwise cosine of the scorer's CLIP embeddings), how
well each shows its prompt (CLIP-T), which pairs are copies, and the story objective of them all.

:func:`story_scores` is the one summary written by training checkpoints, generation and
``evaluate.py`` (``records.StoryScores``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kolors_story.records import StoryScores

if TYPE_CHECKING:
    import torch


def summarize_scores(scores: list[float], threshold: float = 6.0) -> dict:
    """Mean/min/max of the scores and the competition gate: ``passed`` = mean >= threshold."""
    scores = [float(s) for s in scores]
    if not scores:
        raise ValueError("summarize_scores needs at least one score")
    mean = sum(scores) / len(scores)
    return {
        "scores": scores,
        "mean": mean,
        "min": min(scores),
        "max": max(scores),
        "threshold": float(threshold),
        "passed": bool(mean >= float(threshold)),
    }


def coherence(embeddings: torch.Tensor) -> dict:
    """Style consistency of a story: mean pairwise cosine similarity of the images' embeddings.

    Returns ``coherence`` (mean over all pairs i < j), ``outlier`` (1-based index of the image
    whose mean similarity to the others is lowest: the most out-of-style scene) and
    ``similarity_to_others`` (that mean, per image). Needs at least 2 images.
    """
    import torch

    e = torch.as_tensor(embeddings).detach().to("cpu", torch.float64)
    if e.dim() != 2 or e.shape[0] < 2:
        raise ValueError(f"coherence needs embeddings [N>=2, E], got shape {tuple(e.shape)}")
    e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = e @ e.T
    n = e.shape[0]
    off = sim.sum() - sim.diagonal().sum()
    to_others = (sim.sum(dim=1) - sim.diagonal()) / (n - 1)
    return {
        "coherence": float(off / (n * (n - 1))),
        "outlier": int(torch.argmin(to_others)) + 1,
        "similarity_to_others": [float(v) for v in to_others],
    }


def story_scores(scores: list[float], embeddings, threshold: float = 6.0, *, images=None,
                 alignment: list[float | None] | None = None, max_pixel_distance: float = 0.02,
                 min_cosine: float = 0.97, objective=None) -> StoryScores:
    """The gate (mean/min/max, passed), CLIP-I coherence + outlier (2+ images), CLIP-T prompt
    alignment (when given), copy-paste pairs (when the images are given) and the story objective."""
    from kolors_story.evaluate.duplicates import (
        copy_paste_share,
        cosine_matrix,
        duplicate_pairs,
        thumbnails,
    )
    from kolors_story.evaluate.objective import Objective

    summary = summarize_scores(scores, threshold)
    n = len(summary["scores"])
    if n >= 2:
        coh = coherence(embeddings)
    else:
        coh = {"coherence": None, "outlier": None, "similarity_to_others": [None] * n}
    pairs = []
    if images is not None and n >= 2:
        pairs = duplicate_pairs(thumbnails(images), cosine_matrix(embeddings), max_pixel_distance=max_pixel_distance,
                                min_cosine=min_cosine)
    known = [v for v in (alignment or []) if v is not None]
    clip_t = sum(known) / len(known) if known else None
    copy = copy_paste_share(n, pairs)
    value = float((objective or Objective(threshold=threshold)).value(summary["mean"], coh["coherence"], clip_t, copy))
    return StoryScores(**summary, coherence=coh["coherence"], outlier=coh["outlier"],
                       similarity_to_others=coh["similarity_to_others"], alignment=alignment, clip_t=clip_t,
                       duplicate_pairs=pairs, copy_paste=copy, story_objective=value)


def score_story(scorer, aligner, images: list, texts: list[str] | None, settings) -> StoryScores:
    """Score a story's panels with the aesthetic predictor (and CLIP-T when an aligner and the
    prompts are given): the one summary every stage writes. ``settings``: the scorer settings."""
    from kolors_story.evaluate.objective import Objective

    scores, embeddings = scorer.score_and_embed(images)
    alignment = aligner.alignment(images, texts) if (aligner is not None and texts) else None
    return story_scores(scores, embeddings, settings.threshold, images=images, alignment=alignment,
                        max_pixel_distance=settings.duplicate_pixels, min_cosine=settings.duplicate_cosine,
                        objective=Objective.from_settings(settings))
