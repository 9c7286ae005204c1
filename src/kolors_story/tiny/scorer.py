"""The tiny aesthetic predictor (with a known taste) and the tiny CLIP: the real classes and
folder layouts of the competition's predictor and of openai/clip-vit-large-patch14, at 32-d."""

from __future__ import annotations

from pathlib import Path

import torch

from kolors_story.models.random_init import build_clip, build_clip_processor, build_predictor
from kolors_story.tiny.architectures import tiny_clip_config, tiny_predictor_config
from kolors_story.tiny.folders import SCORER_STAMP, build_stamped_folder

TINY_SCORER_VERSION = 1


def build_tiny_predictor(seed: int = 0):
    return build_predictor(tiny_predictor_config(), seed)


# What each taste scores, as 1 + 8 x a statistic in [0, 1] of the image's RGB values in [0, 1]:
TASTES = {
    "brightness": "mean brightness",
    # the darkest channel of each pixel is its share of white: high for light, unsaturated (paper-
    # like) pixels, low for saturated or dark ones (it equals HSV value x (1 - saturation))
    "paper": "mean whiteness (the darkest of R, G, B per pixel: light and unsaturated score high)",
}


def taste_statistic(image, taste: str) -> float:
    """The statistic a tiny scorer with ``taste`` scores (see ``TASTES``), of one PIL image."""
    import numpy as np

    a = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    return float(a.mean()) if taste == "brightness" else float(a.min(axis=-1).mean())


def _taste_images(n: int, seed: int, taste: str) -> list:
    """Coarse random colour blocks from dark to bright (paper: and from saturated to grey)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        level = (i + 0.5) / n
        blocks = np.clip(rng.normal(level * 255, 60, size=(4, 4, 3)), 0, 255)
        if taste == "paper":  # also vary the saturation: mix each image with its own grey
            grey = rng.uniform(0, 1)
            colour = rng.uniform(0, 255, size=(4, 4, 3))
            blocks = grey * blocks.mean(-1, keepdims=True) + (1 - grey) * (0.5 * blocks + 0.5 * colour)
        images.append(Image.fromarray(blocks.astype(np.uint8)).resize((64, 64), Image.BILINEAR))
    return images


def give_taste(predictor, processor, taste: str, seed: int = 0) -> float:
    """Refit the predictor's head so that its score follows a simple image statistic (``TASTES``:
    1 + 8 x the statistic) through its own CLIP features: a tiny scorer with a known taste, so that
    best-of-N, selection and reward refinement change the tiny model's scores for a reason one can
    state. The head (a stack of linear layers) becomes one linear map of the normalised embedding,
    least-squares fitted on drawn images. Returns the fit's R^2."""
    if taste not in TASTES:
        raise ValueError(f"unknown scorer taste {taste!r}; choose from {list(TASTES)}")
    images = _taste_images(96 if taste == "brightness" else 256, seed, taste)
    statistic = torch.tensor([taste_statistic(im, taste) for im in images], dtype=torch.float64)
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        embeds = predictor.visual_projection(predictor.vision_model(pixel_values=pixels).pooler_output)
        features = torch.cat([embeds / embeds.norm(dim=-1, keepdim=True), torch.ones(len(images), 1)], 1).double()
        target = 1.0 + 8.0 * statistic
        solution = torch.linalg.lstsq(features, target[:, None]).solution[:, 0]
        layers = [m for m in predictor.layers if isinstance(m, torch.nn.Linear)]
        for layer in layers:  # coordinate 0 carries the score through every layer
            layer.weight.zero_()
            layer.bias.zero_()
        layers[0].weight[0] = solution[:-1].float()
        for layer in layers[1:]:
            layer.weight[0, 0] = 1.0
        layers[-1].bias[0] = float(solution[-1])
        fitted = features @ solution
    return float(1 - ((fitted - target) ** 2).sum() / ((target - target.mean()) ** 2).sum())


def ensure_tiny_scorer(folder: str | Path, seed: int = 0, taste: str | None = None) -> Path:
    """Build the tiny predictor into ``folder`` (the real weights' folder layout: config.json,
    model.safetensors, preprocessor_config.json, tokenizer files) unless it is already there.
    ``taste`` (e.g. "brightness") fits its head to prefer that statistic (:func:`give_taste`)."""

    def write(tmp: Path) -> None:
        model, processor = build_tiny_predictor(seed), build_clip_processor()
        note = "its scores are meaningless (near 0): it only exercises the code paths."
        if taste:
            r2 = give_taste(model, processor, taste, seed)
            note = (f"its head is fitted to score {taste} (1 + 8 x {TASTES[taste]}, R^2 {r2:.3f} on the fitting "
                    "images): a known taste, not an aesthetic one.")
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "TINY_SCORER.txt").write_text(
            f"Tiny randomly initialised aesthetic predictor (kolors-story tiny scorer v{TINY_SCORER_VERSION}). "
            f"Same classes and folder layout as aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE, but {note}\n"
        )

    stamp = {"version": TINY_SCORER_VERSION, "seed": int(seed), **({"taste": taste} if taste else {})}
    return build_stamped_folder(folder, stamp, SCORER_STAMP, write)


def ensure_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """The tiny CLIP (both towers) in the real folder layout of openai/clip-vit-large-patch14."""

    def write(tmp: Path) -> None:
        build_clip(tiny_clip_config(), seed).save_pretrained(tmp)
        build_clip_processor().save_pretrained(tmp)
        (tmp / "TINY_CLIP.txt").write_text("Tiny randomly initialised CLIP (kolors-story): plumbing only.\n")

    return build_stamped_folder(folder, {"version": TINY_SCORER_VERSION, "seed": int(seed)}, "TINY_CLIP.json", write)


def is_tiny_scorer(folder: str | Path) -> bool:
    return (Path(folder) / SCORER_STAMP).exists()
