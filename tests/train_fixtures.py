"""Training fixtures shared by the trainer's tests: four cached-like items computed by the tiny
pipeline itself, and the configured story's scene embeddings (as the cache stage stores them)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.helpers import settings

CAPTIONS = ["a red square", "a blue circle", "a green field", "a yellow sun"]


def _image(i: int) -> Image.Image:
    g = torch.Generator().manual_seed(i)
    base = torch.rand(3, 1, 1, generator=g)
    noise = torch.rand(3, 64, 64, generator=g) * 0.3
    arr = ((base * 0.7 + noise).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)



@pytest.fixture(scope="session")
def tiny_batches(tiny_model_dir):
    """Four training items with the cache's keys, computed from the tiny pipeline itself."""
    from kolors_story.models.loading import load_pipeline

    pipe = load_pipeline(tiny_model_dir)
    with torch.no_grad():
        pixels = torch.stack([torch.from_numpy(__import__("numpy").asarray(_image(i))).permute(2, 0, 1).float()
                              / 127.5 - 1 for i in range(len(CAPTIONS))])
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=CAPTIONS, device="cpu", do_classifier_free_guidance=False)
    time_ids = torch.tensor([64.0, 64.0, 0.0, 0.0, 64.0, 64.0])
    return [
        {"latents": latents[i].clone(), "prompt_embeds": embeds[i].clone(), "pooled_prompt_embeds": pooled[i].clone(),
         "add_time_ids": time_ids.clone()}
        for i in range(len(CAPTIONS))
    ]


@pytest.fixture(scope="session")
def story(tiny_model_dir):
    """The configured story's scenes and their embeddings, as the cache stage stores them."""
    from kolors_story.models.loading import load_pipeline
    from kolors_story.models.prompts import encode_scenes
    from kolors_story.story import story_scenes

    job = settings("train", ["model=tiny"])
    scenes = story_scenes(job.story, job.sampler)
    return scenes, encode_scenes(load_pipeline(tiny_model_dir), scenes)


