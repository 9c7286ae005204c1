"""Render a story: encode the 8 prompts once, denoise the scenes in batches, save images + panel."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

from kolors_story.io import atomic_save_image
from kolors_story.panel import save_panel
from kolors_story.story import Scene, scenes_from_config

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_scenes(pipe, scenes: list[Scene], device=None) -> dict[str, torch.Tensor]:
    """Prompt + negative embeddings of every scene, computed with the pipeline's own encode_prompt."""
    device = device or pipe.unet.device
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompt=[s.prompt for s in scenes],
        negative_prompt=[s.negative for s in scenes],
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
    )
    return {
        "prompt_embeds": embeds,
        "negative_prompt_embeds": neg,
        "pooled_prompt_embeds": pooled,
        "negative_pooled_prompt_embeds": neg_pooled,
    }


def render_scenes(pipe, scenes: list[Scene], embeds: dict[str, torch.Tensor], *, steps: int, cfg: float,
                  height: int, width: int, batch_size: int = 8) -> list[Image.Image]:
    """Denoise the scenes ``batch_size`` at a time; each scene draws its noise from its own seed,
    so the images do not depend on how scenes are batched."""
    device = pipe.unet.device
    images: list[Image.Image] = []
    batch_size = max(1, int(batch_size))
    for start in range(0, len(scenes), batch_size):
        part = scenes[start : start + batch_size]
        sl = slice(start, start + len(part))
        generators = [torch.Generator(device="cpu").manual_seed(s.seed) for s in part]
        latents = torch.cat(
            [
                torch.randn(
                    (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor),
                    generator=g,
                    dtype=torch.float32,
                )
                for g in generators
            ]
        ).to(device=device, dtype=pipe.unet.dtype)
        out = pipe(
            prompt_embeds=embeds["prompt_embeds"][sl],
            pooled_prompt_embeds=embeds["pooled_prompt_embeds"][sl],
            negative_prompt_embeds=embeds["negative_prompt_embeds"][sl],
            negative_pooled_prompt_embeds=embeds["negative_pooled_prompt_embeds"][sl],
            num_inference_steps=int(steps),
            guidance_scale=float(cfg),
            height=int(height),
            width=int(width),
            latents=latents,
        )
        images.extend(out.images)
    return images


def save_story(images: list[Image.Image], scenes: list[Scene], out_dir: str | Path, title: str | None = None) -> dict:
    """Write 1.png..N.png and panel.png; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for scene, image in zip(scenes, images):
        paths.append(atomic_save_image(image, out_dir / f"{scene.index}.png"))
    panel = save_panel(images, out_dir / "panel.png", captions=[s.description for s in scenes], title=title)
    return {"images": [str(p) for p in paths], "panel": str(panel)}


def generate_story_from_config(cfg) -> dict:
    """The `generate.py` job: load the model, render the story, write images and the panel."""
    from kolors_story.models import pipeline_from_config

    scenes = scenes_from_config(cfg.story, cfg.sampler)
    pipe = pipeline_from_config(cfg.model)
    embeds = encode_scenes(pipe, scenes)
    s = cfg.sampler
    images = render_scenes(pipe, scenes, embeds, steps=s.steps, cfg=s.cfg, height=s.height, width=s.width,
                           batch_size=s.get("batch_size", 8))
    title = f"{cfg.story.get('title', 'story')} | model={cfg.model.name}"
    if cfg.model.name == "tiny":
        title += " (tiny random model: not a real result)"
    result = save_story(images, scenes, cfg.output_dir, title=title)
    print(f"Wrote {len(images)} images and {result['panel']}")
    return result
