"""Memory and speed modes for generation on small GPUs (the ``memory`` config group).

Every mode keeps the images the same as the default mode (within floating-point tolerance; VAE
tiling is exact whenever the image fits in one tile, which holds at Kolors' native 1024x1024):

- ``offload``: ``model`` keeps one whole model (text encoder, UNet, VAE) on the GPU at a time;
  ``sequential`` streams the weights layer by layer (least VRAM, slowest). Both use diffusers'
  accelerate hooks; the pipeline must be loaded on the CPU first (see :func:`load_device`), or it
  would be fully resident on the GPU before offloading starts.
- ``vae_tiling`` / ``vae_slicing``: decode in overlapping tiles / one image of the batch at a time.
- ``release_text_encoder``: drop ChatGLM3 (6.0 B parameters loaded, 12.0 GB in fp16) once the prompts are
  encoded (:func:`after_prompt_encoding`); generation then runs from the embeddings.
- ``attention``: ``sdpa`` (torch's scaled_dot_product_attention, the default), ``eager`` (plain
  matmul + softmax: the reference to compare against), ``sliced`` (attention slicing).
- ``keep_prompt_projections``: the prompt's text projection and cross-attention keys/values computed
  once a render batch and served at its later steps (``models.prompt_projections``): the same bits.
- ``channels_last``: convolutions in channels-last layout; ``compile``: ``torch.compile`` the UNet.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Mapping
from dataclasses import asdict

import torch

from kolors_story.config import MemorySettings
from kolors_story.errors import UserError
from kolors_story.models.prompt_projections import keep_across_steps
from kolors_story.models.quantization import stored_bytes

log = logging.getLogger(__name__)

OFFLOAD_MODES = ("none", "model", "sequential")
ATTENTION_MODES = ("sdpa", "eager", "sliced")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class MemoryConfigError(UserError, ValueError):
    """A ``memory.*`` key has a value this module cannot apply; the message names key and choices."""


def memory_modes(values: MemorySettings | Mapping | None) -> MemorySettings:
    """Checked memory modes from the ``memory`` settings or a plain mapping (None -> defaults);
    a key or value this module cannot apply raises :class:`MemoryConfigError` naming it."""
    if isinstance(values, MemorySettings):
        values = asdict(values)
    values = dict(values.items()) if values is not None else {}
    defaults = MemorySettings()
    known = set(asdict(defaults))
    unknown = sorted(set(values) - known)
    if unknown:
        raise MemoryConfigError(
            f"memory: unknown key(s) {unknown}; known keys: {sorted(known)} (see MemorySettings in kolors_story/config/story_settings.py)"
        )

    def choice(key, allowed):
        value = str(values.get(key, getattr(defaults, key))).lower()
        if value not in allowed:
            raise MemoryConfigError(f"memory.{key}={values.get(key)!r} is not one of {list(allowed)}")
        return value

    def flag(key):
        value = values.get(key, getattr(defaults, key))
        if not isinstance(value, bool):
            raise MemoryConfigError(f"memory.{key}={value!r} must be true or false")
        return value

    slice_size = values.get("attention_slice_size", "auto")
    if not (slice_size in ("auto", "max") or (isinstance(slice_size, int) and slice_size > 0)):
        raise MemoryConfigError(f"memory.attention_slice_size={slice_size!r}: use auto, max or a positive number of heads")
    device = values.get("offload_device")
    budget = values.get("budget_gb")
    if budget is not None and not (isinstance(budget, (int, float)) and budget > 0):
        raise MemoryConfigError(f"memory.budget_gb={budget!r}: GB of GPU memory to plan for, a number > 0 (or null)")
    return MemorySettings(
        auto=flag("auto"),
        budget_gb=None if budget is None else float(budget),
        offload=choice("offload", OFFLOAD_MODES),
        offload_device=None if device in (None, "") else str(device),
        vae_tiling=flag("vae_tiling"),
        vae_slicing=flag("vae_slicing"),
        release_text_encoder=flag("release_text_encoder"),
        allow_quantized_text_encoder=flag("allow_quantized_text_encoder"),
        attention=choice("attention", ATTENTION_MODES),
        attention_slice_size=slice_size,
        keep_prompt_projections=flag("keep_prompt_projections"),
        channels_last=flag("channels_last"),
        compile=flag("compile"),
        compile_mode=choice("compile_mode", COMPILE_MODES),
        compile_backend=str(values.get("compile_backend", defaults.compile_backend)),
    )


def _accelerator() -> str | None:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return None


def load_device(model_device: str | torch.device, cfg) -> str:
    """Where to load the pipeline: the CPU when offloading (the hooks move models to the GPU on
    use), else ``model.device``. Loading on the GPU first would need the full VRAM offload avoids."""
    return "cpu" if memory_modes(cfg).offload != "none" else str(model_device)


def _offload_target(modes: MemorySettings, device: str | torch.device | None) -> torch.device | None:
    """The accelerator to offload to, or None when there is none (offloading would save nothing)."""
    if modes.offload_device is not None:
        return torch.device(modes.offload_device)  # explicit, even "cpu": runs the hooks (tests)
    if device is not None and torch.device(device).type != "cpu":
        return torch.device(device)
    found = _accelerator()
    return torch.device(found) if found else None


def _set_attention(pipe, modes: MemorySettings) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    models = [m for m in (pipe.unet, pipe.vae) if m is not None and hasattr(m, "set_attn_processor")]
    if modes.attention == "sliced":
        # diffusers' SlicedAttnProcessor: attention computed a few heads at a time.
        pipe.enable_attention_slicing(modes.attention_slice_size)
        return
    processor = AttnProcessor2_0 if modes.attention == "sdpa" else AttnProcessor
    for model in models:
        model.set_attn_processor(processor())


def apply_memory_modes(pipe, cfg, device: str | torch.device | None = None, before_offload=None) -> dict:
    """Apply the ``memory`` config to a loaded pipeline; returns what was applied (for manifests).

    ``device`` is the device generation runs on (``model.device``); offloading targets it. On a
    machine without an accelerator, offloading is skipped with a warning unless
    ``memory.offload_device`` names a device explicitly. ``before_offload(pipe)`` runs after the
    attention processors are set and before offload hooks wrap the models (the IP-Adapter loads
    there: it adds its own processors and an image encoder the hooks must see).
    """
    modes = memory_modes(cfg)
    applied: dict = {"attention": modes.attention}
    _set_attention(pipe, modes)
    if modes.channels_last:
        for model in (pipe.unet, pipe.vae):
            if model is not None:
                model.to(memory_format=torch.channels_last)
    if pipe.vae is not None:
        if modes.vae_tiling:
            pipe.vae.enable_tiling()
        if modes.vae_slicing:
            pipe.vae.enable_slicing()
    applied.update(channels_last=modes.channels_last, vae_tiling=modes.vae_tiling, vae_slicing=modes.vae_slicing)
    if before_offload is not None:
        before_offload(pipe)
    keep_across_steps(pipe.unet, modes.keeps_prompt_projections())  # after LoRAs and the IP-Adapter: kept with them
    applied["keep_prompt_projections"] = modes.keeps_prompt_projections()

    applied["offload"] = "none"
    if modes.offload != "none":
        target = _offload_target(modes, device)
        if target is None:
            log.warning(
                "memory.offload=%s needs a GPU to offload to and none was found: running without offloading "
                "(set memory.offload_device to force a device)", modes.offload)
        elif modes.offload == "sequential" and target.type == "cpu":
            # accelerate's sequential hooks fail when the execution device is the CPU itself
            # (they rebuild parameters with a class that rejects requires_grad); nothing to save anyway.
            raise MemoryConfigError(
                "memory.offload=sequential with offload_device=cpu: sequential offload streams weights to an "
                "accelerator and cannot run CPU-to-CPU; use memory.offload=model or a cuda device"
            )
        else:
            if modes.offload == "model":
                pipe.enable_model_cpu_offload(device=target)
            else:
                pipe.enable_sequential_cpu_offload(device=target)
            applied["offload"] = f"{modes.offload}:{target}"
    if modes.compile:
        # In place (nn.Module.compile): pipe.unet stays the same object, hooks and LoRA keep working.
        pipe.unet.compile(mode=None if modes.compile_mode == "default" else modes.compile_mode,
                          backend=modes.compile_backend)
    applied.update(compile=modes.compile and f"{modes.compile_backend}:{modes.compile_mode}",
                   release_text_encoder=modes.release_text_encoder)
    return applied


def release_text_encoder(pipe) -> int:
    """Drop the text encoder from the pipeline (and its offload hook); returns the bytes released.

    Afterwards the pipeline only accepts precomputed prompt embeddings.
    """
    te = getattr(pipe, "text_encoder", None)
    if te is None:
        return 0
    nbytes = stored_bytes(te)  # an int8/nf4 encoder: its codes and scales
    # Model-offload hooks keep a reference to their model: drop the text encoder's hook too.
    hooks = getattr(pipe, "_all_hooks", None)
    if hooks:
        pipe._all_hooks = [h for h in hooks if getattr(h, "model", None) is not te]
    pipe.text_encoder = None
    del te
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.info("released the text encoder (%.2f GB)", nbytes / 1e9)
    return nbytes


def after_prompt_encoding(pipe, cfg) -> int:
    """Call once the story's prompts are encoded: releases the text encoder when configured."""
    return release_text_encoder(pipe) if memory_modes(cfg).release_text_encoder else 0
