"""The sampler settings checked against what the sampler can do, and the image sizes they give."""

from __future__ import annotations

import warnings

from PIL import Image

from kolors_story.config import SamplerSettings
from kolors_story.errors import SettingsError
from kolors_story.generate.schedulers import check_scheduler_name

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
        raise SettingsError(f"sampler.steps={s.steps} must be >= 1")
    if s.batch_size < 1:
        raise SettingsError(f"sampler.batch_size={s.batch_size} must be >= 1")
    if s.best_of.n < 1:
        raise SettingsError(f"sampler.best_of.n={s.best_of.n} must be >= 1")
    h = s.hires
    if h.enabled:
        h.upscaler = str(h.upscaler).lower()
        if h.upscaler not in UPSCALERS:
            raise SettingsError(f"sampler.hires.upscaler={h.upscaler!r}; use one of {', '.join(UPSCALERS)}")
        if not 0.0 < h.strength <= 1.0:
            raise SettingsError(f"sampler.hires.strength={h.strength} must be in (0, 1]")
        if int(h.steps * h.strength) < 1:
            raise SettingsError(
                f"sampler.hires.steps={h.steps} x sampler.hires.strength={h.strength} runs no refine step "
                f"(diffusers runs int(steps x strength) steps); raise one of them"
            )
        if h.scale <= 0:
            raise SettingsError(f"sampler.hires.scale={h.scale} must be > 0")
    return s


def multiple_of(unet_config, vae_config) -> int:
    """Image sizes must divide into whole latents at the UNet's deepest level."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1) * 2 ** (len(unet_config["block_out_channels"]) - 1)


def size_multiple(pipe) -> int:
    return multiple_of(pipe.unet.config, pipe.vae.config)


def final_size(pipe, s: SamplerSettings) -> tuple[int, int]:
    """(height, width) of the images: the sampler size, or the hires size when hires is on."""
    if not s.hires.enabled:
        return s.height, s.width
    m = size_multiple(pipe)
    return (max(m, int(round(s.height * s.hires.scale / m)) * m), max(m, int(round(s.width * s.hires.scale / m)) * m))


def check_size(pipe, s: SamplerSettings) -> None:
    check_size_for(pipe.unet.config, pipe.vae.config, s)


def check_size_for(unet_config, vae_config, s: SamplerSettings) -> None:
    """``sampler.height/width`` fit the model (checked from its config files, before loading it)."""
    m = multiple_of(unet_config, vae_config)
    for key in ("height", "width"):
        value = getattr(s, key)
        if value < m or value % m:
            raise SettingsError(f"sampler.{key}={value} must be a positive multiple of {m} for this model")


def warn_if_guidance_off(s: SamplerSettings) -> bool:
    """Say so loudly when ``sampler.cfg <= 1``: diffusers then skips classifier-free guidance and
    the negative prompts are silently ignored. Returns whether it warned."""
    if s.cfg > 1:
        return False
    message = (f"sampler.cfg={s.cfg} <= 1 turns classifier-free guidance off: the negative prompts are ignored "
               "and images follow the prompt weakly (the baseline uses 4.0)")
    warnings.warn(message, UserWarning, stacklevel=2)
    print(f"WARNING: {message}")
    return True


def sampler_settings(**values) -> SamplerSettings:
    """A checked :class:`SamplerSettings` from keyword values (height/width required: their
    config defaults follow ``model.resolution``), for callers outside a config."""
    return check_sampler(SamplerSettings(**values))
