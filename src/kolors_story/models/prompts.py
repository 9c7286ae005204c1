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


def text_pipeline(layout: KolorsLayout, dtype: torch.dtype, device, quant: str = "none") -> "KolorsPipeline":  # noqa: F821
    """A ``KolorsPipeline`` with only the tokenizer and text encoder: what ``encode_prompt`` needs
    (the same construction as ``load_pipeline``, without the UNet and VAE); ``quant``: ChatGLM3's
    weights (``model.text_encoder_quant``)."""
    from diffusers import KolorsPipeline

    text_encoder = load_text_encoder(layout, dtype, quant, device).to(device)
    return KolorsPipeline(vae=None, text_encoder=text_encoder, tokenizer=load_tokenizer(layout), unet=None,
                          scheduler=None, force_zeros_for_empty_prompt=False)


@torch.no_grad()
def encode_scenes(pipe, scenes: list[Scene], device=None) -> dict[str, torch.Tensor]:
    """Prompt + negative embeddings of every scene (``STORY_KEYS``): the prompts, then the negatives,
    each in its own encode_prompt call. The same tensors as one call with classifier-free guidance
    (the negatives are tokenized and encoded the same way), but that call would hold the prompts'
    states while it encodes the negatives: one call's peak is what the plan counts."""
    device = device or run_device(pipe)

    def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=texts, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=MAX_SEQUENCE_LENGTH)
        return embeds, pooled

    embeds, pooled = encode([s.prompt for s in scenes])
    neg, neg_pooled = encode([s.negative for s in scenes])
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


def prompt_tokens(tokenizer, text: str) -> int:
    """How many ChatGLM tokens ``text`` is, as ``encode_prompt`` tokenizes it (special tokens included)."""
    return len(tokenizer(text, truncation=False)["input_ids"])


def check_prompt_tokens(layout: KolorsLayout, scenes: list[Scene]) -> None:
    """Every scene's prompt and negative fit Kolors' 256 tokens; a longer one would be cut without a
    word, so it is refused naming the scene and by how much (before any weight is loaded)."""
    from kolors_story.errors import SettingsError

    tokenizer = load_tokenizer(layout)
    for scene in scenes:
        for what, text in (("prompt", scene.prompt), ("negative prompt", scene.negative)):
            n = prompt_tokens(tokenizer, text)
            if n > MAX_SEQUENCE_LENGTH:
                raise SettingsError(
                    f"scene {scene.index}: the {what} is {n} ChatGLM tokens, {n - MAX_SEQUENCE_LENGTH} over the "
                    f"{MAX_SEQUENCE_LENGTH} Kolors reads; shorten it (the rest would be cut off silently)")
