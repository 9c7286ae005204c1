"""How the cache build cuts its work into batches and encodes one batch.

One definition for the one-process build and the sharded one (``cache_shards``): a batch's result
depends on its members and their order (padding, CPU reduction order), never on which process
computes it, so both builds cut the same batches and write the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kolors_story.data.cache_files import CacheError
from kolors_story.data.crop import ImageDecodeError, preprocess_image
from kolors_story.models.prompts import encode_captions


@dataclass(frozen=True)
class ImageJob:
    """One image to encode: what decides its pixels, and the key its latents are stored under."""

    path: Path
    target_hw: tuple[int, int]
    sha: str
    key: str


def text_batches(need: list[tuple[str, str]], batch_size: int) -> list[list[tuple[str, str]]]:
    """(text key, caption) pairs, in the order given, ``batch_size`` per text-encoder call."""
    return [need[i : i + batch_size] for i in range(0, len(need), batch_size)]


def image_batches(jobs: list[ImageJob], batch_size: int) -> list[list[ImageJob]]:
    """Images by training size (a VAE batch holds one size), ``batch_size`` per VAE call."""
    batches = []
    for size in sorted({j.target_hw for j in jobs}):
        same = [j for j in jobs if j.target_hw == size]
        batches += [same[i : i + batch_size] for i in range(0, len(same), batch_size)]
    return batches


def encode_text_batch(pipe, batch: list[tuple[str, str]], device, dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{text key: (prompt_embeds [L, D], pooled [D])}`` of one batch, in one text-encoder call."""
    captions = [c for _, c in batch]
    try:
        encoded = encode_captions(pipe, captions, device, len(captions))
    except ValueError as exc:
        raise CacheError(f"{exc} (model.dtype={dtype}); try model.dtype=float32 or bfloat16.") from exc
    return {key: encoded[caption] for key, caption in batch}


@torch.no_grad()
def encode_latents(vae, scale: float, batch: list[ImageJob], crop: str, seed: int,
                   device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{image key: (latents [4, h/8, w/8], add_time_ids [6])}`` in float32 on the CPU: the VAE
    posterior mean times ``scale``; NaN/inf latents raise a CacheError naming the image."""
    try:
        pixels, ids = zip(*(preprocess_image(j.path, j.target_hw, crop, seed, j.sha) for j in batch))
    except ImageDecodeError as exc:
        raise CacheError(str(exc)) from exc
    x = torch.stack(pixels).to(device=device, dtype=vae.dtype)
    latents = (vae.encode(x).latent_dist.mean * scale).float().cpu()
    out = {}
    for i, job in enumerate(batch):
        if not torch.isfinite(latents[i]).all():
            raise CacheError(
                f"The VAE produced NaN/inf latents for {job.path} (model.dtype={vae.dtype}). The stock SDXL "
                "VAE overflows in float16: use the sdxl-vae-fp16-fix (model.vae_path) or model.dtype=float32."
            )
        out[job.key] = (latents[i].clone(), torch.tensor(ids[i], dtype=torch.float32))
    return out
