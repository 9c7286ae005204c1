"""The sampler settings checked against what the sampler can do, and the image sizes they give."""

from __future__ import annotations

from PIL import Image

from kolors_story.generate.schedulers import check_scheduler_name
from kolors_story.settings import SamplerSettings

UPSCALERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def check_sampler(s: SamplerSettings) -> SamplerSettings:
    """``s`` with the scheduler name normalised; a value no sampler accepts raises ValueError
    naming the ``sampler.*`` key and what to use instead."""
    s.scheduler = check_scheduler_name(s.scheduler)
    if s.steps < 1:
        raise ValueError(f"sampler.steps={s.steps} must be >= 1")
    if s.batch_size < 1:
        raise ValueError(f"sampler.batch_size={s.batch_size} must be >= 1")
    if s.best_of.n < 1:
        raise ValueError(f"sampler.best_of.n={s.best_of.n} must be >= 1")
    h = s.hires
    if h.enabled:
        h.upscaler = str(h.upscaler).lower()
        if h.upscaler not in UPSCALERS:
            raise ValueError(f"sampler.hires.upscaler={h.upscaler!r}; use one of {', '.join(UPSCALERS)}")
        if not 0.0 < h.strength <= 1.0:
            raise ValueError(f"sampler.hires.strength={h.strength} must be in (0, 1]")
        if int(h.steps * h.strength) < 1:
            raise ValueError(
                f"sampler.hires.steps={h.steps} x sampler.hires.strength={h.strength} runs no refine step "
                f"(diffusers runs int(steps x strength) steps); raise one of them"
            )
        if h.scale <= 0:
            raise ValueError(f"sampler.hires.scale={h.scale} must be > 0")
    return s


def size_multiple(pipe) -> int:
    """Image sizes must divide into whole latents at the UNet's deepest level."""
    return int(pipe.vae_scale_factor) * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def final_size(pipe, s: SamplerSettings) -> tuple[int, int]:
    """(height, width) of the images: the sampler size, or the hires size when hires is on."""
    if not s.hires.enabled:
        return s.height, s.width
    m = size_multiple(pipe)
    return (max(m, int(round(s.height * s.hires.scale / m)) * m), max(m, int(round(s.width * s.hires.scale / m)) * m))


def check_size(pipe, s: SamplerSettings) -> None:
    m = size_multiple(pipe)
    for key in ("height", "width"):
        value = getattr(s, key)
        if value < m or value % m:
            raise ValueError(f"sampler.{key}={value} must be a positive multiple of {m} for this model")


def sampler_settings(**values) -> SamplerSettings:
    """A checked :class:`SamplerSettings` from keyword values (height/width required: their
    config defaults follow ``model.resolution``), for callers outside a config."""
    return check_sampler(SamplerSettings(**values))
