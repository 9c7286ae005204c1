"""Section ``select``: what choosing the 8 panels together costs and gains.

- The search: coordinate ascent vs brute force on random candidate sets (N = 2..4 candidates per
  scene, 8 scenes): time, how often the heuristic finds the brute-force story, and the objective
  gained over the per-scene choice; coordinate ascent alone at N = 8 (16.7 M stories).
- CLIP-T at the real CLIP ViT-L/14 size (random weights; ``--quick``: tiny): 8 story images scored
  with the aesthetic predictor alone vs predictor + prompt alignment.
"""

from __future__ import annotations

import time

import numpy as np

from kolors_story import tiny
from kolors_story.bench.score import _score_images
from kolors_story.bench.timing import BenchContext, Comparison, alternate, median
from kolors_story.evaluate.objective import (
    Candidates,
    Objective,
    coordinate_ascent,
    exhaustive,
    story_terms,
)

SCENES = 8


def random_candidates(seed: int, scenes: int = SCENES, n: int = 3, dim: int = 6) -> Candidates:
    """Aesthetic scores around the gate, CLIP-T, embeddings sharing a style and a few copies."""
    rng = np.random.default_rng(seed)
    a = rng.normal(6.0, 0.4, (scenes, n))
    t = rng.uniform(0.15, 0.35, (scenes, n))
    e = rng.normal(size=(scenes * n, dim)) + 1.5  # a shared direction: a style
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    cos = (e @ e.T).reshape(scenes, n, scenes, n)
    copy = np.zeros_like(cos, dtype=bool)
    for _ in range(3):
        i, j = rng.choice(scenes, 2, replace=False)
        k, m = rng.integers(n), rng.integers(n)
        copy[i, k, j, m] = copy[j, m, i, k] = True
    return Candidates(aesthetic=a, clip_t=t, cos=cos, copy=copy)


def _search(ctx: BenchContext) -> tuple[dict, list[dict]]:
    objective, sets = Objective(), 4 if ctx.quick else 20
    stats, comparisons = {}, []
    for n in (2, 3, 4):
        cands = [random_candidates(seed, n=n) for seed in range(sets)]
        found = [coordinate_ascent(c, objective) == exhaustive(c, objective) for c in cands]
        gain = [story_terms(c, exhaustive(c, objective), objective)["objective"]
                - story_terms(c, [int(np.argmax(r)) for r in c.aesthetic], objective)["objective"] for c in cands]
        ta, tb = alternate(lambda c=cands[0]: coordinate_ascent(c, objective), lambda c=cands[0]: exhaustive(c, objective),
                           ctx.repeats, warmup=False)
        stats[f"n{n}"] = {"stories": n ** SCENES, "sets": sets, "heuristic_finds_brute_force": float(np.mean(found)),
                          "objective_gain_over_per_scene": float(np.mean(gain))}
        comparisons.append(Comparison("select", f"story search N={n}: coordinate ascent / brute force ({n}^8)",
                                      "coordinate ascent", "brute force", ta, tb, per="story",
                                      extra=stats[f"n{n}"]).as_dict())
    big = random_candidates(0, n=8)
    t0 = time.perf_counter()
    choice = coordinate_ascent(big, objective)
    per_scene = [int(np.argmax(r)) for r in big.aesthetic]
    stats["n8"] = {"stories": 8 ** SCENES, "seconds": time.perf_counter() - t0,
                   "objective_gain_over_per_scene": story_terms(big, choice, objective)["objective"]
                   - story_terms(big, per_scene, objective)["objective"]}
    return stats, comparisons


def _alignment_cost(ctx: BenchContext) -> dict:
    from kolors_story.evaluate.alignment import PromptAligner
    from kolors_story.evaluate.scorer import AestheticScorer
    from kolors_story.models.architectures import REAL_CLIP_CONFIG, REAL_PREDICTOR_CONFIG
    from kolors_story.models.random_init import (
        build_clip,
        build_clip_processor,
        build_predictor,
    )

    ctx.log(f"select: building {'tiny' if ctx.quick else 'real-size'} predictor + CLIP with its text tower ...")
    predictor_cfg = tiny.architecture("predictor") if ctx.quick else dict(REAL_PREDICTOR_CONFIG)
    predictor = build_predictor({k: v for k, v in predictor_cfg.items() if k not in ("architectures", "model_type")})
    clip = build_clip(tiny.architecture("clip") if ctx.quick else REAL_CLIP_CONFIG)
    processor = build_clip_processor()
    scorer, aligner = AestheticScorer(predictor, processor, batch_size=8), PromptAligner(clip, processor, batch_size=8)
    images = _score_images(8, 256 if ctx.quick else 1024)
    texts = [f"anime, a little girl with short purple hair, scene {i}" for i in range(8)]
    ta, tb = alternate(lambda: scorer.score_and_embed(images), lambda: (scorer.score_and_embed(images),
                                                                      aligner.alignment(images, texts)),
                       ctx.repeats, warmup=not ctx.quick)
    return {"clip_params": sum(p.numel() for p in clip.parameters()), "real_size": not ctx.quick,
            "comparison": Comparison("select", "8 images: aesthetic / aesthetic + CLIP-T", "aesthetic",
                                     "aesthetic + CLIP-T", ta, tb, per="8 images",
                                     extra={"clip_t_seconds_per_image": (median(tb) - median(ta)) / 8}).as_dict()}


def section_select(ctx: BenchContext) -> dict:
    ctx.log("select: story search vs brute force ...")
    search, comparisons = _search(ctx)
    alignment = _alignment_cost(ctx)
    return {"search": search, "clip_params": alignment["clip_params"], "real_size": alignment["real_size"],
            "comparisons": comparisons + [alignment["comparison"]]}
