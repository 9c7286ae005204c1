"""Prompt encoding, shared by the cache (training captions, the story's prompts) and generation.

Both go through the pipeline's own ``KolorsPipeline.encode_prompt`` (ChatGLM3 penultimate hidden
state + pooled last-layer state, 256 tokens, left padding), so what training learns from is
exactly what generation conditions on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kolors_story.models.loading import (
    KolorsLayout,
    load_text_encoder,
    load_tokenizer,
    run_device,
)
from kolors_story.story import Scene

MAX_SEQUENCE_LENGTH = 256  # KolorsPipeline.encode_prompt's default, what generation uses
STORY_KEYS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


def text_pipeline(layout: KolorsLayout, dtype: torch.dtype, device) -> "KolorsPipeline":  # noqa: F821
    """A ``KolorsPipeline`` with only the tokenizer and text encoder: what ``encode_prompt`` needs
    (the same construction as ``load_pipeline``, without the UNet and VAE)."""
    from diffusers import KolorsPipeline

    text_encoder = load_text_encoder(layout, dtype).to(device)
    return KolorsPipeline(vae=None, text_encoder=text_encoder, tokenizer=load_tokenizer(layout), unet=None,
                          scheduler=None, force_zeros_for_empty_prompt=False)


@torch.no_grad()
def encode_scenes(pipe, scenes: list[Scene], device=None) -> dict[str, torch.Tensor]:
    """Prompt + negative embeddings of every scene (``STORY_KEYS``), in one encode_prompt call."""
    device = device or run_device(pipe)
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompt=[s.prompt for s in scenes],
        negative_prompt=[s.negative for s in scenes],
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
    )
    return dict(zip(STORY_KEYS, (embeds, neg, pooled, neg_pooled)))


@torch.no_grad()
def encode_captions(pipe, captions: list[str], device, batch_size: int,
                    on_batch: Callable[[int], None] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{caption: (prompt_embeds [L, D], pooled [D])}`` in float32 on the CPU, ``batch_size``
    captions per call; NaN/inf embeddings raise ValueError naming the captions."""
    out = {}
    for start in range(0, len(captions), batch_size):
        part = captions[start : start + batch_size]
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=part, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        if not (torch.isfinite(embeds).all() and torch.isfinite(pooled).all()):
            raise ValueError(f"The text encoder produced NaN/inf embeddings for captions {part}")
        for i, caption in enumerate(part):
            out[caption] = (embeds[i].float().cpu().clone(), pooled[i].float().cpu().clone())
        if on_batch is not None:
            on_batch(len(part))
    return out
