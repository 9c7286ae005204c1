"""Rendering a story: the scenes denoised in batches from precomputed prompt embeddings, each
from its own seed, optionally refined (two-stage hires), best-of-N candidates chosen by a picker.

Each scene draws its noise from its own CPU generator, so the images do not depend on how the
scenes are batched, and a reproduction re-renders the same batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from PIL import Image
from tqdm import tqdm

from kolors_story.config import SamplerSettings
from kolors_story.errors import UserError
from kolors_story.generate.sampler import (
    UPSCALERS,
    check_size,
    final_size,
    sampler_settings,
)
from kolors_story.models.loading import run_device
from kolors_story.models.prompt_projections import drop_kept, kept_across_steps
from kolors_story.story import Scene


class OutOfMemoryError(UserError, RuntimeError):
    """Even one image at a time with model offload does not fit the GPU."""


@dataclass(frozen=True)
class Job:
    """One image to render: which scene's embeddings, which seed, which best-of candidate."""

    scene: int  # position in the scenes/embeds list (0-based)
    seed: int
    candidate: int = 0


def _initial_noise(pipe, seed: int, height: int, width: int) -> tuple[torch.Tensor, torch.Generator]:
    """Stage-1 latents from the scene's own CPU generator; the generator then keeps feeding this
    scene's later random draws (ancestral steps, the img2img noise), so batching never mixes seeds."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    shape = (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    return torch.randn(shape, generator=g, dtype=torch.float32), g


def _img2img_class():
    from diffusers import KolorsImg2ImgPipeline

    class StoryImg2ImgPipeline(KolorsImg2ImgPipeline):
        """``KolorsImg2ImgPipeline`` that accepts precomputed embeddings.

        diffusers 0.39's ``__call__`` forwards prompt_embeds/negative_prompt_embeds to
        ``encode_prompt`` but drops the pooled ones, so with the text encoder released it fails on
        ``None.shape`` (diffusers issue #13612). The pooled embeddings are carried over here.
        """

        _pooled = None

        def __call__(self, *args, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, **kwargs):
            self._pooled = (pooled_prompt_embeds, negative_pooled_prompt_embeds)
            try:
                return super().__call__(*args, pooled_prompt_embeds=pooled_prompt_embeds,
                                        negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, **kwargs)
            finally:
                self._pooled = None

        def encode_prompt(self, *args, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, **kwargs):
            if pooled_prompt_embeds is None and self._pooled is not None:
                pooled_prompt_embeds, negative_pooled_prompt_embeds = self._pooled
            return super().encode_prompt(*args, pooled_prompt_embeds=pooled_prompt_embeds,
                                         negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, **kwargs)

    return StoryImg2ImgPipeline


def img2img_pipeline(pipe):
    """A ``KolorsImg2ImgPipeline`` sharing every weight of ``pipe`` (nothing is loaded again).

    It gets its own scheduler object of the same kind and config, so the two pipelines never
    share step state.
    """
    refiner = _img2img_class()(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config),
        force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", False)),
    )
    refiner.set_progress_bar_config(disable=True)
    return refiner


def _step_callback(bar):
    def callback(pipe, i, _t, kwargs):
        if bar is not None:
            bar.update(1)
        if i + 1 >= pipe.num_timesteps:  # the last step: nothing kept while the VAE decodes
            drop_kept(pipe.unet)
        return kwargs

    return callback


def _embeds_of(embeds: dict[str, torch.Tensor], batch: list[Job]) -> dict[str, torch.Tensor]:
    idx = torch.tensor([j.scene for j in batch], dtype=torch.long)
    return {k: v[idx.to(v.device)] for k, v in embeds.items()}


def _render_batch(pipe, refiner, batch: list[Job], embeds: dict[str, torch.Tensor], s: SamplerSettings,
                  step_bar, coherence=None) -> list[Image.Image]:
    """Stage 1 for one batch from the jobs' own seeds, then the hires refine when enabled (with the
    coherence state of this batch: which scenes record or read shared attention, the IP-Adapter input)."""
    device = run_device(pipe)
    noise, gens = zip(*(_initial_noise(pipe, j.seed, s.height, s.width) for j in batch))
    latents = torch.cat(noise).to(device=device, dtype=pipe.unet.dtype)
    e = _embeds_of(embeds, batch)
    extra = (lambda cfg: {}) if coherence is None else coherence.call_kwargs
    if coherence is not None:
        coherence.begin_batch(batch)
    with kept_across_steps(pipe.unet):  # the prompt's projections once, not every step (memory.keep_prompt_projections)
        return _denoise(pipe, refiner, e, latents, gens, s, step_bar, extra)


def _denoise(pipe, refiner, e, latents, gens, s: SamplerSettings, step_bar, extra) -> list[Image.Image]:
    images = pipe(**e, num_inference_steps=s.steps, guidance_scale=s.cfg, height=s.height, width=s.width,
                  latents=latents, generator=list(gens), callback_on_step_end=_step_callback(step_bar),
                  **extra(s.cfg > 1)).images
    if not s.hires.enabled:
        return images
    h = s.hires
    final_h, final_w = final_size(pipe, s)
    refine_cfg = s.cfg if h.cfg is None else h.cfg
    upscaled = [im.resize((final_w, final_h), UPSCALERS[h.upscaler]) for im in images]
    return refiner(image=upscaled, strength=h.strength, **e, num_inference_steps=h.steps,
                   guidance_scale=refine_cfg, height=final_h, width=final_w,
                   generator=list(gens), callback_on_step_end=_step_callback(step_bar), **extra(refine_cfg > 1)).images


def _free_device_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _offload_after_oom(pipe) -> bool:
    """Last resort after an out-of-memory at batch 1: one model on the device at a time."""
    if hasattr(pipe.unet, "_hf_hook") or getattr(pipe, "_all_hooks", None):
        return False  # already offloaded
    pipe.enable_model_cpu_offload(device=run_device(pipe))
    return True


def _render_or_split(pipe, refiner, positions: list[int], batch: list[Job], embeds, s: SamplerSettings, step_bar,
                     retries: list[dict], coherence=None) -> list[Image.Image]:
    """Render a batch; on an out-of-memory, render its halves (down to 1 image, then with model
    offload), recording each retry. Each image keeps its own seed, so the pictures are those of a
    run at the smaller batch size."""
    try:
        return _render_batch(pipe, refiner, batch, embeds, s, step_bar, coherence)
    except torch.OutOfMemoryError as exc:
        _free_device_memory()
        if len(batch) == 1:
            if not _offload_after_oom(pipe):
                raise OutOfMemoryError(
                    f"out of GPU memory rendering one image at {s.width}x{s.height} even with model offload "
                    f"({exc}); lower sampler.height/width or use memory.offload=sequential") from None
            retries.append({"jobs": positions, "batch_size": 1, "then": "model offload"})
            return _render_batch(pipe, refiner, batch, embeds, s, step_bar, coherence)
        half = (len(batch) + 1) // 2
        retries.append({"jobs": positions, "batch_size": len(batch), "then": [half, len(batch) - half]})
        return (_render_or_split(pipe, refiner, positions[:half], batch[:half], embeds, s, step_bar, retries, coherence)
                + _render_or_split(pipe, refiner, positions[half:], batch[half:], embeds, s, step_bar, retries,
                                   coherence))


def _batches(jobs: list[Job], size: int, keep: list[bool] | None, coherence) -> list[tuple[int, list[int]]]:
    """``(pass, job indices)`` per batch, in render order: the jobs in order (with coherence: its
    groups), ``size`` at a time; batches with no kept job are left out, except the first pass of
    a coherent render, which the others read."""
    groups = [(1, list(range(len(jobs))))] if coherence is None else list(coherence.groups(jobs))
    out = []
    for pass_no, idx in groups:
        for start in range(0, len(idx), size):
            chunk = idx[start : start + size]
            if keep is None or pass_no == 0 or any(keep[i] for i in chunk):
                out.append((pass_no, chunk))
    return out


@torch.no_grad()
def render_jobs(pipe, jobs: list[Job], embeds: dict[str, torch.Tensor], settings: SamplerSettings, *,
                labels: list | None = None, keep: list[bool] | None = None, refiner=None,
                progress: bool = True, retries: list[dict] | None = None, coherence=None) -> list[Image.Image | None]:
    """Render ``jobs`` ``settings.batch_size`` at a time (stage 1, then the hires refine if set).

    ``keep[i] = False`` marks a job whose image is not needed; batches with no kept job are
    skipped (their slot is None). Batches that are rendered always hold the same jobs as the
    original run, so a reproduction sees the same batch composition. A batch that runs out of
    memory is rendered in halves; each retry is appended to ``retries``. ``coherence``
    (generate.coherence.StoryCoherence) renders the scenes the others depend on first.
    """
    s = settings
    retries = [] if retries is None else retries
    if s.hires.enabled and refiner is None:
        refiner = img2img_pipeline(pipe)
    per_image_steps = s.steps + (int(s.hires.steps * s.hires.strength) if s.hires.enabled else 0)
    wanted = _batches(jobs, s.batch_size, keep, coherence)
    out: list[Image.Image | None] = [None] * len(jobs)
    previous_pass = 0
    with tqdm(total=sum(len(b) for _, b in wanted), desc="scenes", unit="img", disable=not progress,
              position=0) as scene_bar:
        for pass_no, idx in wanted:
            if coherence is not None:
                if pass_no != previous_pass:
                    coherence.after_first_pass(jobs, out)
                    previous_pass = pass_no
                coherence.begin_group(pass_no, jobs[idx[0]].scene)
            batch = [jobs[i] for i in idx]
            names = [str(labels[i]) if labels else str(i + 1) for i in idx]
            with tqdm(total=per_image_steps, desc=f"scene {','.join(names)}", unit="step", leave=False,
                      disable=not progress, position=1) as step_bar:
                images = _render_or_split(pipe, refiner, idx, batch, embeds, s, step_bar, retries, coherence)
            for i, image in zip(idx, images):
                out[i] = image
            scene_bar.update(len(batch))
    return out


def render_scenes(pipe, scenes: list[Scene], embeds: dict[str, torch.Tensor], *, steps: int, cfg: float,
                  height: int, width: int, batch_size: int = 8, progress: bool = False,
                  retries: list[dict] | None = None, coherence=None) -> list[Image.Image]:
    """Denoise the scenes ``batch_size`` at a time, each from its own seed (plain sampler settings)."""
    settings = sampler_settings(steps=int(steps), cfg=float(cfg), height=int(height), width=int(width),
                                batch_size=int(batch_size), seeds=None)
    jobs = [Job(pos, s.seed) for pos, s in enumerate(scenes)]
    return render_jobs(pipe, jobs, embeds, settings, labels=[s.index for s in scenes], progress=progress,
                       retries=retries, coherence=coherence)


@dataclass
class StoryRender:
    """What one story render produced, with the record of how."""

    images: list[Image.Image]
    seeds: list[int]  # seed of the kept image of each scene
    candidates: list[list[dict]] | None = None  # best-of: per scene [{candidate, seed, score[, clip_t]}]
    chosen: list[int] | None = None  # best-of: kept candidate index per scene
    scores: list[float] | None = None  # aesthetic score of each kept image, when computed
    size: tuple[int, int] = (0, 0)  # final (height, width)
    seconds: float = 0.0
    retries: list[dict] = field(default_factory=list)  # batches rendered in halves after running out of memory
    candidate_images: list[list[Image.Image]] | None = None  # best-of: every candidate, [scene][candidate]
    selection: dict | None = None  # best-of: how the candidates were chosen (generate.best_of)
    coherence: dict | None = None  # what generate.coherence did (references, recorded bytes, reference image)


def generate_story(pipe, scenes: list[Scene], embeds: dict[str, torch.Tensor], settings: SamplerSettings, *,
                   picker=None, choices: list[int] | None = None, progress: bool = True,
                   coherence=None) -> StoryRender:
    """Render every scene; with ``settings.best_of.n > 1`` render N candidates per scene and keep the
    ones ``picker`` chooses (``generate.best_of``), or the recorded ``choices`` when reproducing:
    then only the batches holding a kept candidate are rendered, and no picker is needed."""
    t0 = time.perf_counter()
    check_size(pipe, settings)
    n, stride = settings.best_of.n, settings.best_of.seed_stride
    jobs = [Job(pos, s.seed + k * stride, k) for k in range(n) for pos, s in enumerate(scenes)]
    labels = [f"{scenes[j.scene].index}" + (f"/{j.candidate + 1}" if n > 1 else "") for j in jobs]
    keep = None
    if n > 1 and choices is not None:
        if len(choices) != len(scenes) or any(not 0 <= int(c) < n for c in choices):
            raise ValueError(f"recorded best-of choices {choices} do not fit {len(scenes)} scenes x {n} candidates")
        keep = [int(choices[j.scene]) == j.candidate for j in jobs]
    elif n > 1 and picker is None:
        raise ValueError("sampler.best_of.n > 1 needs the aesthetic scorer (scorer group) to pick the candidates")
    retries: list[dict] = []
    rendered = render_jobs(pipe, jobs, embeds, settings, labels=labels, keep=keep, progress=progress, retries=retries,
                           coherence=coherence)
    size = final_size(pipe, settings)
    if n == 1:
        return StoryRender(images=list(rendered), seeds=[s.seed for s in scenes], size=size,
                           seconds=time.perf_counter() - t0, retries=retries)
    grid = [[rendered[k * len(scenes) + pos] for k in range(n)] for pos in range(len(scenes))]
    seeds = [[s.seed + k * stride for k in range(n)] for s in scenes]
    if choices is None:
        picked = picker(grid, seeds)
        chosen, candidates, selection = picked.chosen, picked.candidates, picked.record
        scores = [candidates[pos][k]["score"] for pos, k in enumerate(chosen)]
    else:
        chosen, selection, scores = [int(c) for c in choices], None, None
        candidates = [[{"candidate": k, "seed": seed, "score": None} for k, seed in enumerate(row)] for row in seeds]
    return StoryRender(images=[grid[pos][k] for pos, k in enumerate(chosen)],
                       seeds=[seeds[pos][k] for pos, k in enumerate(chosen)], candidates=candidates, chosen=chosen,
                       scores=scores, size=size, seconds=time.perf_counter() - t0, retries=retries,
                       candidate_images=grid if choices is None else None, selection=selection)
