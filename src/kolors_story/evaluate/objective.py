"""Judging a story as a whole, and choosing its 8 panels together.

The story objective of a set of panels: the gate first (mean aesthetic >= threshold, and the
weakest panel >= ``min_floor`` when set), then

    mean aesthetic + coherence_weight x CLIP-I + alignment_weight x CLIP-T - copy_paste_weight x copy-paste

where CLIP-I is the mean pairwise cosine of the panels' CLIP image embeddings (style and identity
kept across panels), CLIP-T the mean cosine of each panel with its own prompt, and copy-paste the
share of panel pairs that are copies (so eight identical panels cannot win on CLIP-I).

With N candidates per scene there are N^8 stories: up to ``EXHAUSTIVE_LIMIT`` they are all
scored; beyond, coordinate ascent (one scene at a time, the best candidate with the others fixed,
until nothing improves) from the per-scene best and from seeded random starts.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np

EXHAUSTIVE_LIMIT = 100_000


@dataclass(frozen=True)
class Objective:
    threshold: float = 6.0  # the competition's gate on the mean aesthetic score
    min_floor: float | None = None  # every panel's aesthetic score at least this (None: no floor)
    coherence_weight: float = 2.0
    alignment_weight: float = 2.0
    copy_paste_weight: float = 5.0

    @classmethod
    def from_settings(cls, scorer) -> "Objective":
        """From the ``scorer`` settings: its ``threshold`` and ``objective`` weights."""
        o = scorer.objective
        return cls(threshold=float(scorer.threshold), min_floor=None if o.min_floor is None else float(o.min_floor),
                   coherence_weight=float(o.coherence_weight), alignment_weight=float(o.alignment_weight),
                   copy_paste_weight=float(o.copy_paste_weight))

    def as_dict(self) -> dict:
        return {**self.__dict__, "formula": FORMULA}

    def gate(self, mean, minimum):
        """Mean >= threshold and min >= min_floor (numbers or numpy arrays of them)."""
        return (np.asarray(mean) >= self.threshold) & (self.min_floor is None or np.asarray(minimum) >= self.min_floor)

    def value(self, mean, coherence, clip_t, copy_paste):
        """The objective from a story's summary numbers (numbers or arrays; unknown CLIP-I/CLIP-T count as 0)."""
        coherence, clip_t = (0.0 if v is None else v for v in (coherence, clip_t))
        return (mean + self.coherence_weight * coherence + self.alignment_weight * clip_t
                - self.copy_paste_weight * copy_paste)


FORMULA = ("gate (mean >= threshold, min >= min_floor) first, then mean + coherence_weight*CLIP-I "
           "+ alignment_weight*CLIP-T - copy_paste_weight*copy_paste")


@dataclass
class Candidates:
    """Per scene s and candidate k: ``aesthetic[s, k]``, ``clip_t[s, k]`` (0 when unknown); per
    pair of candidates of two scenes: CLIP-I cosine and whether they are copies."""

    aesthetic: np.ndarray  # [S, N]
    clip_t: np.ndarray  # [S, N]
    cos: np.ndarray  # [S, N, S, N]
    copy: np.ndarray  # [S, N, S, N] bool

    @property
    def shape(self) -> tuple[int, int]:
        return self.aesthetic.shape


def story_terms(cands: Candidates, choice, objective: Objective) -> dict:
    """The summary numbers of one choice of a candidate per scene: gate, objective and its terms."""
    a = np.array([cands.aesthetic[s, k] for s, k in enumerate(choice)])
    t = np.array([cands.clip_t[s, k] for s, k in enumerate(choice)])
    pairs = list(itertools.combinations(range(len(choice)), 2))
    coh = float(np.mean([cands.cos[i, choice[i], j, choice[j]] for i, j in pairs])) if pairs else 0.0
    copy = float(np.mean([cands.copy[i, choice[i], j, choice[j]] for i, j in pairs])) if pairs else 0.0
    mean, clip_t = float(a.mean()), float(t.mean())
    return {"gate": bool(objective.gate(mean, float(a.min()))), "objective": float(objective.value(mean, coh, clip_t, copy)),
            "mean": mean, "min": float(a.min()), "coherence": coh, "clip_t": clip_t, "copy_paste": copy}


def story_value(cands: Candidates, choice, objective: Objective) -> tuple[bool, float]:
    """(gate passed, objective) of one choice: compared as a tuple, the gate decides first."""
    terms = story_terms(cands, choice, objective)
    return terms["gate"], terms["objective"]


def _values_of_all(cands: Candidates, objective: Objective) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every choice (as rows), its gate and its objective, computed together."""
    s_count, n = cands.shape
    choices = np.array(list(itertools.product(range(n), repeat=s_count)), dtype=np.int64)
    rows = np.arange(s_count)
    a, t = cands.aesthetic[rows, choices], cands.clip_t[rows, choices]
    pairs = list(itertools.combinations(range(s_count), 2))
    coh = sum(cands.cos[i, choices[:, i], j, choices[:, j]] for i, j in pairs) / max(1, len(pairs))
    copy = sum(cands.copy[i, choices[:, i], j, choices[:, j]].astype(float) for i, j in pairs) / max(1, len(pairs))
    return choices, objective.gate(a.mean(1), a.min(1)), objective.value(a.mean(1), coh, t.mean(1), copy)


def exhaustive(cands: Candidates, objective: Objective) -> list[int]:
    """The best of all N^S choices (gate first, then the objective; ties: the lowest candidates)."""
    choices, gate, value = _values_of_all(cands, objective)
    best = np.lexsort((-value, -gate.astype(int)))[0]  # lexsort: last key primary
    return [int(k) for k in choices[best]]


def coordinate_ascent(cands: Candidates, objective: Objective, restarts: int = 8, seed: int = 0) -> list[int]:
    """Improve one scene at a time (all its candidates, the others fixed) until nothing changes;
    from the per-scene best and ``restarts`` seeded random starts; the best end point wins."""
    s_count, n = cands.shape
    rng = random.Random(seed)
    starts = [[int(np.argmax(cands.aesthetic[s])) for s in range(s_count)]]
    starts += [[rng.randrange(n) for _ in range(s_count)] for _ in range(restarts)]
    best, best_key = None, None
    for choice in starts:
        key = story_value(cands, choice, objective)
        improved = True
        while improved:
            improved = False
            for s in range(s_count):
                for k in range(n):
                    trial = choice[:s] + [k] + choice[s + 1:]
                    trial_key = story_value(cands, trial, objective)
                    if trial_key > key:
                        choice, key, improved = trial, trial_key, True
        if best_key is None or key > best_key:
            best, best_key = choice, key
    return best


def choose_story(cands: Candidates, objective: Objective, restarts: int = 8) -> tuple[list[int], str]:
    """The chosen candidate per scene and how it was found."""
    s_count, n = cands.shape
    if n ** s_count <= EXHAUSTIVE_LIMIT:
        return exhaustive(cands, objective), f"exhaustive ({n}^{s_count} stories)"
    return coordinate_ascent(cands, objective, restarts), f"coordinate ascent ({restarts} restarts + per-scene start)"


def candidates_of(scores, alignment, embeddings, thumbs, *, max_pixel_distance: float,
                  min_cosine: float) -> Candidates:
    """``Candidates`` from per-candidate arrays shaped ``[S, N, ...]`` (alignment may be None)."""
    from kolors_story.evaluate.duplicates import cosine_matrix, pixel_distances

    a = np.asarray(scores, dtype=np.float64)
    s_count, n = a.shape
    t = np.zeros_like(a) if alignment is None else np.asarray(
        [[0.0 if v is None else v for v in row] for row in alignment], dtype=np.float64)
    flat_e = np.asarray(embeddings, dtype=np.float64).reshape(s_count * n, -1)
    cos = cosine_matrix(flat_e).reshape(s_count, n, s_count, n)
    dist = pixel_distances(np.asarray(thumbs).reshape(s_count * n, *np.asarray(thumbs).shape[2:]))
    copy = (dist.reshape(s_count, n, s_count, n) <= max_pixel_distance) | (cos >= min_cosine)
    return Candidates(aesthetic=a, clip_t=t, cos=cos, copy=copy)
