"""The GPU check's measurements of the cache, generation and scoring (training: ``gpu_training``),
one function per group of ``gpu_plan``, each running the project's own code on the workbench's
models: the cache's batch encoders (``data.cache_batches``) and its text pipeline with a quantized
ChatGLM3, the batched renderer with the memory modes (``generate.render``, ``generate.memory``) and
the per-scene ``KolorsPipeline`` loop, and the aesthetic scorer. Each places on the device exactly
what its plan stage has resident, then measures inside the meter's phases (named as the rows of
``gpu_plan``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import torch

from kolors_story.bench.gpu_build import Check, Meter, Reading, Workbench, free_device_cache
from kolors_story.plan.stages import GB

STORY_MODELS = ("text_encoder", "unet", "vae")


@contextmanager
def card_budget(device: torch.device, budget_gb: float | None) -> Iterator[None]:
    """Only ``budget_gb`` of the card for the allocator in this block: memory=auto's budget enforced."""
    if device.type != "cuda" or budget_gb is None:
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    free_device_cache(device)
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gb * GB / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def _images(n: int, size: int) -> list:
    """Smooth colour fields with noise (the preprocessing and the VAE see real pictures' statistics)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        base = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size))
        noise = rng.integers(-12, 13, (size, size, 3))
        out.append(Image.fromarray(np.clip(np.asarray(base, dtype=np.int16) + noise, 0, 255).astype(np.uint8)))
    return out


def story_of(job):
    from kolors_story.story import story_scenes

    return story_scenes(job.story, job.sampler)


# ------------------------------------------------------------------------------------ cache


def measure_cache(c: Check, job) -> dict[str, Reading]:
    """The cache build of ``scale.cache_images`` images: VAE latents (the VAE alone on the device),
    then the captions' and the story's embeddings (the text encoder alone), batch by batch as
    ``data.cache`` cuts them."""
    from kolors_story.data.cache_batches import ImageJob, encode_latents, image_batches
    from kolors_story.files import file_sha256

    folder = c.workdir / "cache-images"
    folder.mkdir(parents=True, exist_ok=True)
    res = c.scale.resolution
    jobs = []
    for i, im in enumerate(_images(c.scale.cache_images, res)):
        path = folder / f"{i}.jpg"
        im.save(path, quality=95)
        jobs.append(ImageJob(path, (res, res), file_sha256(path), f"image-{i}"))
    c.wb.place("vae")
    vae = c.wb.get("vae")
    with c.meter.phases("cache: VAE latents"):
        for batch in image_batches(jobs, job.cache.batch_size):
            encode_latents(vae, float(vae.config.scaling_factor), batch, job.dataset.crop, 0, c.device)
    readings = dict(c.meter.readings)
    c.wb.place("text_encoder")
    return {**readings, **_encode_captions(c, c.wb.pipeline(unet=False), job)}


def _encode_captions(c: Check, pipe, job) -> dict[str, Reading]:
    """The cache's text part: the captions ``cache.batch_size`` at a time, then the story's scenes."""
    from kolors_story.data.cache_batches import encode_text_batch, text_batches
    from kolors_story.models.prompts import encode_scenes

    scenes = story_of(job)
    captions = [(f"text-{i}", f"{scenes[i % len(scenes)].prompt}, {i}") for i in range(c.scale.cache_images)]
    with c.meter.phases("cache: prompt embeddings"):
        for batch in text_batches(captions, job.cache.batch_size):
            encode_text_batch(pipe, batch, c.device, job.model.dtype)
        encode_scenes(pipe, scenes, c.device)  # the story's scenes in one call, as the cache writes them
    return dict(c.meter.readings)


def measure_quantized_text(c: Check, job) -> dict[str, Reading]:
    """The cache's prompt embeddings with ChatGLM3 quantized (``model.text_encoder_quant``), loaded by
    the cache build's own ``models.prompts.text_pipeline``: the workbench's random text encoder is
    written once to scratch space and read back, quantized on the way; it is alone on the device."""
    from kolors_story.models.loading import to_dtype
    from kolors_story.models.prompts import text_pipeline

    folder = c.workdir / "text-encoder"
    if not (folder / "config.json").exists():
        c.wb.get("text_encoder").save_pretrained(folder)
        c.wb.pipeline(unet=False).tokenizer.save_pretrained(folder)  # the release keeps it beside the weights
    c.wb.place()
    quant = job.model.text_encoder_quant
    pipe = text_pipeline(SimpleNamespace(text_encoder=folder, tokenizer=folder), to_dtype(job.model.dtype),
                         c.device, quant)
    key = f"text_encoder_{quant}"
    c.wb.models[key] = pipe.text_encoder.eval().requires_grad_(False)
    c.wb.on_device = {key}
    try:
        return _encode_captions(c, pipe, job)
    finally:
        pipe.text_encoder = None
        c.wb.drop(key)


# ------------------------------------------------------------------------------- generation


@contextmanager
def _decode_phase(vae, meter: Meter) -> Iterator[None]:
    """Every ``vae.decode`` call of the pipeline measured as the decode phase (offload hooks move the
    VAE inside it), the rest as denoise."""
    decode = vae.decode

    def measured(*args, **kwargs):
        meter.switch("decode")
        try:
            return decode(*args, **kwargs)
        finally:
            meter.switch("denoise")

    vae.decode = measured
    try:
        yield
    finally:
        del vae.decode  # the class's method again


def _story_reading(readings: dict[str, Reading]) -> Reading:
    parts = [readings[k] for k in ("encode prompts", "denoise", "decode") if k in readings]
    return Reading(peak=max(r.peak for r in parts), reserved=max((r.reserved or 0) for r in parts) or None,
                   resident=parts[0].resident, seconds=sum(r.seconds for r in parts))


def _reset(pipe, wb: Workbench) -> None:
    """Offload hooks, slicing and tiling off; the workbench told where the models are now."""
    if getattr(pipe, "_all_hooks", None) or hasattr(pipe.unet, "_hf_hook"):
        pipe.remove_all_hooks()
    pipe.vae.disable_slicing()
    pipe.vae.disable_tiling()
    wb.sync()


def measure_story(c: Check, job, budget_gb: float | None) -> dict[str, Reading]:
    """The story with memory=auto's settings at ``budget_gb`` (enforced on the card): prompts encoded
    once, the text encoder released if chosen, the scenes through the batched renderer."""
    from kolors_story.generate.memory import after_prompt_encoding, apply_memory_modes
    from kolors_story.generate.render import render_scenes
    from kolors_story.models.prompts import encode_scenes

    m, s = job.memory, job.sampler
    if getattr(job.model, "text_encoder_quant", "none") != "none":  # memory.allow_quantized_text_encoder
        raise NotImplementedError("the story with a quantized text encoder is not measured (the check's own "
                                  "rows measure each scheme on the cache's prompts)")
    c.wb.place(*STORY_MODELS)
    if m.offload != "none":
        c.wb.place()  # the pipeline starts in host memory; the hooks move each model on use
    pipe = c.wb.pipeline()
    scenes, retries = story_of(job), []
    with card_budget(c.device, budget_gb):
        apply_memory_modes(pipe, m, c.device)
        if m.offload == "none":  # first-call costs (kernel choice, library handles) out of the timing
            render_scenes(pipe, scenes[:1], encode_scenes(pipe, scenes[:1]), steps=1, cfg=s.cfg, height=s.height,
                          width=s.width, batch_size=1)
        with c.meter.phases("encode prompts") as meter:
            embeds = encode_scenes(pipe, scenes)
            after_prompt_encoding(pipe, m)
            if m.release_text_encoder:
                c.wb.drop("text_encoder")  # released as in a run; built again when a later group needs it
            meter.switch("denoise")
            with _decode_phase(pipe.vae, meter):
                render_scenes(pipe, scenes, embeds, steps=s.steps, cfg=s.cfg, height=s.height, width=s.width,
                              batch_size=s.batch_size, retries=retries)
    _reset(pipe, c.wb)
    if retries:
        c.problems[c.current] = f"ran out of memory at the budget: batches split {retries}"
    readings = dict(c.meter.readings)
    readings["story"] = _story_reading(readings)
    return readings


def measure_per_scene(c: Check, job, budget_gb: float | None) -> dict[str, Reading]:
    """The seeds' loop: one full ``KolorsPipeline`` call per scene (its prompt encoded each time) on the
    same weights, the text encoder resident."""
    from kolors_story.generate.memory import apply_memory_modes

    m, s = job.memory, job.sampler
    c.wb.place(*STORY_MODELS)
    pipe = c.wb.pipeline()
    scenes = story_of(job)

    def call(scene, steps: int) -> None:
        pipe(prompt=scene.prompt, negative_prompt=scene.negative, num_inference_steps=steps, guidance_scale=s.cfg,
             height=s.height, width=s.width, generator=torch.Generator("cpu").manual_seed(scene.seed))

    with card_budget(c.device, budget_gb):
        apply_memory_modes(pipe, m, c.device)
        call(scenes[0], 1)  # first-call costs out of the timing
        with c.meter.phases("story"):
            for scene in scenes:
                call(scene, s.steps)
    _reset(pipe, c.wb)
    return dict(c.meter.readings)


# ---------------------------------------------------------------------------------- scoring


def scorer_of(c: Check, batch_size: int):
    from kolors_story.evaluate.scorer import AestheticScorer
    from kolors_story.models.random_init import build_clip_processor

    return AestheticScorer(c.wb.get("predictor"), build_clip_processor(), device=c.device, batch_size=batch_size)


def measure_score(c: Check, job) -> dict[str, Reading]:
    """The aesthetic score of 8 story-size images with ``scorer.batch_size`` images per forward
    (the scorer and CLIP on the device, as the plan's score stage)."""
    c.wb.drop(*STORY_MODELS)
    if c.stepper is not None:
        c.stepper, c.wb.state[:] = None, []
    c.wb.place("predictor", "clip")
    scorer = scorer_of(c, int(job.scorer.batch_size))
    images = _images(8, c.scale.resolution)
    scorer.score(images[:1])  # first-call costs (kernels, allocator) out of the timing
    with c.meter.phases("score"):
        scorer.score(images)
    return dict(c.meter.readings)
