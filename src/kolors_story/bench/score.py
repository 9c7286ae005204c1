"""Section ``score``: the aesthetic score at the real CLIP ViT-L/14 size (random weights), batched vs
one image per call (the competition's loop); the scores must be identical."""

from __future__ import annotations

import numpy as np
import torch

from kolors_story import tiny
from kolors_story.bench.timing import (
    SCORE_TOLERANCE,
    BenchContext,
    BenchError,
    Comparison,
    alternate,
    median,
)


def _score_images(n: int, size: int) -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        # Smooth colour fields + noise at story-image size: the processor's resize + crop run for real.
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        im = Image.fromarray(base).resize((size, size), Image.Resampling.BICUBIC)
        noise = rng.integers(-12, 13, (size, size, 3))
        out.append(Image.fromarray(np.clip(np.asarray(im, dtype=np.int16) + noise, 0, 255).astype(np.uint8)))
    return out


def section_score(ctx: BenchContext) -> dict:
    from kolors_story.evaluate.scorer import AestheticScorer
    from kolors_story.models.architectures import REAL_PREDICTOR_CONFIG
    from kolors_story.models.random_init import build_clip_processor, build_predictor

    config = tiny.architecture("predictor") if ctx.quick else dict(REAL_PREDICTOR_CONFIG)
    config = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    ctx.log(f"score: building a {'tiny' if ctx.quick else 'real-size CLIP ViT-L/14'} predictor (random weights) ...")
    predictor = build_predictor(config, seed=0)
    processor = build_clip_processor()
    scorer = AestheticScorer(predictor, processor, device="cpu", batch_size=8)
    n_params = sum(p.numel() for p in predictor.parameters())
    images = _score_images(8, 256 if ctx.quick else 1024)
    results = {}

    def batched():
        results["batched"] = scorer.score(images)

    def competition_loop():
        # The competition's get_aesthetics_score, one image per call.
        scores = []
        for image in images:
            inputs = processor(images=image, return_tensors="pt")
            with torch.no_grad():
                scores.append(predictor(**inputs).logits.tolist()[0][0])
        results["loop"] = scores

    ctx.log("score: batched vs one image per call ...")
    ta, tb = alternate(batched, competition_loop, ctx.repeats, warmup=not ctx.quick)
    diff = max(abs(x - y) for x, y in zip(results["batched"], results["loop"]))
    if diff > SCORE_TOLERANCE:
        raise BenchError(f"score: batched and per-image scores differ by {diff:g} (tolerance {SCORE_TOLERANCE})")
    comp = Comparison("score", "8 images: batched vs per-image", "batched (8 per call)", "one image per call",
                      ta, tb, per="8 images", extra={"max_score_diff": diff})
    return {"predictor_params": n_params, "real_size": not ctx.quick, "images": len(images),
            "max_score_diff": diff, "seconds_per_image": {"batched": median(ta) / len(images),
                                                          "per_image": median(tb) / len(images)},
            "comparisons": [comp.as_dict()]}
