"""Section ``generate``: the 8-scene story, prompts encoded once and scenes batched vs one pipeline
call per scene (the seeds' loop); the images must be identical."""

from __future__ import annotations

import numpy as np
import torch

from kolors_story.bench.timing import (
    PIXEL_TOLERANCE,
    BenchContext,
    BenchError,
    Comparison,
    alternate,
    compose_settings,
    median,
)


def _story_scenes(name: str = "idol_diary"):
    """The configured story's 8 scenes, composed from conf/ exactly as generate.py does."""
    from kolors_story.story import story_scenes

    job = compose_settings("generate", [f"story={name}", "model=tiny"])
    return story_scenes(job.story, job.sampler)


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.int16) for im in images])


def section_generate(ctx: BenchContext) -> dict:
    from kolors_story.generate.render import render_scenes
    from kolors_story.models.loading import load_pipeline
    from kolors_story.models.prompts import encode_scenes

    scenes = _story_scenes()
    pipe = load_pipeline(ctx.model_dir())
    size = ctx.resolution
    steps, cfg_scale = (1, 5.0) if ctx.quick else (4, 5.0)
    results = {}

    def batched():
        embeds = encode_scenes(pipe, scenes)
        results["batched"] = render_scenes(pipe, scenes, embeds, steps=steps, cfg=cfg_scale, height=size,
                                           width=size, batch_size=len(scenes))

    def per_scene():
        # The seeds' loop: one full pipeline call (prompt encoding included) per scene, seeded.
        out = []
        for s in scenes:
            out += pipe(prompt=s.prompt, negative_prompt=s.negative, num_inference_steps=steps,
                        guidance_scale=cfg_scale, height=size, width=size,
                        generator=torch.Generator("cpu").manual_seed(s.seed)).images
        results["per_scene"] = out

    ctx.log(f"generate: {len(scenes)} scenes batched vs one pipeline call per scene ...")
    ta, tb = alternate(batched, per_scene, ctx.repeats, warmup=not ctx.quick)
    diff = int(np.abs(_pixels(results["batched"]) - _pixels(results["per_scene"])).max())
    if diff > PIXEL_TOLERANCE:
        raise BenchError(f"generate: batched and per-scene images differ by up to {diff} levels (tolerance {PIXEL_TOLERANCE})")
    comp = Comparison("generate", f"story of {len(scenes)}: batched vs per-scene calls", "batched (encode once)",
                      "per-scene pipeline calls", ta, tb, per="story", extra={"max_pixel_diff": diff})
    return {"model": ctx.model_name, "scenes": len(scenes), "size": size, "steps": steps, "cfg": cfg_scale,
            "max_pixel_diff": diff, "seconds_per_scene": {"batched": median(ta) / len(scenes),
                                                          "per_scene": median(tb) / len(scenes)},
            "comparisons": [comp.as_dict()]}
