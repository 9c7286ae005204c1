"""What a story's scores add up to: the competition gate on the mean aesthetic score, and how well
the panels hang together (coherence: mean pairwise cosine of the scorer's CLIP embeddings).

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


def story_scores(scores: list[float], embeddings, threshold: float = 6.0) -> StoryScores:
    """The gate (mean/min/max, passed) and, with 2+ images, coherence + outlier of a story."""
    summary = summarize_scores(scores, threshold)
    if len(summary["scores"]) >= 2:
        coh = coherence(embeddings)
    else:
        coh = {"coherence": None, "outlier": None, "similarity_to_others": [None] * len(summary["scores"])}
    return StoryScores(**summary, coherence=coh["coherence"], outlier=coh["outlier"],
                       similarity_to_others=coh["similarity_to_others"])
