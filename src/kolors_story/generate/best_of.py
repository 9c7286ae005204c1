"""Which candidate of each scene a best-of render keeps (``sampler.best_of.select``).

``scene``: each scene's highest aesthetic score (ties: the lower candidate), one scene at a time.
``story``: the 8 panels chosen together, maximising the story objective
(:mod:`kolors_story.evaluate.objective`) over the aesthetic scores, CLIP image embeddings,
prompt alignment and copy flags of all N x 8 candidates.

Both return the manifest's ``selection`` record: the objective, every candidate's scores, the
candidate chosen per scene and why it won.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from kolors_story.config import BestOfSettings, ScorerSettings
from kolors_story.errors import SettingsError
from kolors_story.evaluate.duplicates import thumbnails
from kolors_story.evaluate.objective import (
    Objective,
    candidates_of,
    choose_story,
    story_terms,
)

SELECT_MODES = ("scene", "story")
SCENE_OBJECTIVE = "each scene's highest aesthetic score (ties: the lower candidate)"


@dataclass
class Selection:
    chosen: list[int]  # kept candidate per scene
    candidates: list[list[dict]]  # per scene, per candidate: {"candidate", "seed", "score"[, "clip_t"]}
    record: dict  # the manifest's ``selection``


Picker = Callable[[list[list[Image.Image]], list[list[int]]], Selection]


def check_select(best_of: BestOfSettings) -> None:
    if best_of.select not in SELECT_MODES:
        raise SettingsError(f"sampler.best_of.select={best_of.select!r}: use one of {', '.join(SELECT_MODES)}")
    if int(best_of.restarts) < 0:
        raise SettingsError(f"sampler.best_of.restarts={best_of.restarts}: use 0 or more random starts")


def _render_order(grid: list[list[Image.Image]]) -> list[Image.Image]:
    """Candidate-major, the order the images were rendered in (candidate 0 of every scene first)."""
    return [grid[s][k] for k in range(len(grid[0])) for s in range(len(grid))]


def _by_scene(values: list, s_count: int, n: int) -> np.ndarray:
    """Render-order values back to ``[scene, candidate, ...]``."""
    return np.asarray(values).reshape(n, s_count, *np.asarray(values).shape[1:]).swapaxes(0, 1)


def _records(seeds: list[list[int]], scores: np.ndarray, clip_t: np.ndarray | None) -> list[list[dict]]:
    return [[{"candidate": k, "seed": int(seed), "score": float(scores[s, k]),
              **({} if clip_t is None else {"clip_t": float(clip_t[s, k])})}
             for k, seed in enumerate(scene_seeds)] for s, scene_seeds in enumerate(seeds)]


def per_scene_best(scores: np.ndarray) -> list[int]:
    """Each scene's highest score; ``argmax`` keeps the lower candidate on ties."""
    return [int(np.argmax(row)) for row in scores]


class ScenePicker:
    """select=scene: the aesthetic scorer alone."""

    def __init__(self, scorer):
        self.scorer = scorer

    def __call__(self, grid: list[list[Image.Image]], seeds: list[list[int]]) -> Selection:
        s_count, n = len(grid), len(grid[0])
        scores = _by_scene([float(v) for v in self.scorer.score(_render_order(grid))], s_count, n)
        chosen = per_scene_best(scores)
        candidates = _records(seeds, scores, None)
        return Selection(chosen, candidates, {"select": "scene", "objective": SCENE_OBJECTIVE, "chosen": chosen,
                                              "candidates": candidates, "why": "highest aesthetic score per scene"})


class StoryPicker:
    """select=story: aesthetic scores + CLIP image embeddings from the scorer, CLIP-T from the
    aligner (when on), copy flags from thumbnails and embeddings; the story objective decides."""

    def __init__(self, scorer, aligner, texts: list[str], settings: ScorerSettings, restarts: int = 8):
        self.scorer, self.aligner, self.texts = scorer, aligner, list(texts)
        self.settings, self.restarts = settings, int(restarts)
        self.objective = Objective.from_settings(settings)

    def __call__(self, grid: list[list[Image.Image]], seeds: list[list[int]]) -> Selection:
        s_count, n = len(grid), len(grid[0])
        flat = _render_order(grid)
        scores, embeddings = self.scorer.score_and_embed(flat)
        clip_t = None
        if self.aligner is not None and any(self.texts):
            aligned = self.aligner.alignment(flat, self.texts * n)  # None where a scene has no English prompt
            clip_t = _by_scene([0.0 if v is None else float(v) for v in aligned], s_count, n)
        a = _by_scene([float(v) for v in scores], s_count, n)
        cands = candidates_of(a, clip_t, _by_scene(embeddings.numpy(), s_count, n),
                              _by_scene(thumbnails(flat), s_count, n),
                              max_pixel_distance=self.settings.duplicate_pixels, min_cosine=self.settings.duplicate_cosine)
        chosen, method = choose_story(cands, self.objective, self.restarts)
        baseline = per_scene_best(a)
        won, base = story_terms(cands, chosen, self.objective), story_terms(cands, baseline, self.objective)
        candidates = _records(seeds, a, clip_t)
        record = {"select": "story", "objective": self.objective.as_dict(), "method": method, "chosen": chosen,
                  "chosen_story": won, "per_scene_best": baseline, "per_scene_best_story": base,
                  "candidates": candidates, "why": _why(won, base, chosen == baseline)}
        return Selection(chosen, candidates, record)


def _why(won: dict, base: dict, same: bool) -> str:
    def terms(t: dict) -> str:
        return (f"gate {'pass' if t['gate'] else 'FAIL'}, objective {t['objective']:.3f} (aesthetic mean "
                f"{t['mean']:.3f}, CLIP-I {t['coherence']:.3f}, CLIP-T {t['clip_t']:.3f}, copy-paste {t['copy_paste']:.2f})")

    if same:
        return f"each scene's best aesthetic candidate is also the best story: {terms(won)}"
    return f"chosen story: {terms(won)}; each scene's best aesthetic candidate would give: {terms(base)}"


def picker_for(best_of: BestOfSettings, scorer, aligner, texts: list[str], settings: ScorerSettings) -> Picker:
    check_select(best_of)
    if best_of.select == "scene":
        return ScenePicker(scorer)
    return StoryPicker(scorer, aligner, texts, settings, best_of.restarts)
