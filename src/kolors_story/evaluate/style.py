"""How close renders are to a style set, by simple colour statistics: the before/after measure of a
training run (the story at LoRA scale 0 vs 1, each against the training images).

Statistics of an image, each in [0, 1], on a 64 x 64 thumbnail:
- ``saturation``: mean HSV saturation (ink wash ~0.1, a colourful picture 0.4 and more);
- ``brightness``: mean HSV value;
- ``contrast``: standard deviation of the grey level.
The distance between two sets is the Euclidean distance between their mean statistics: it says
whether the renders' palette moved toward the style set's, nothing about content.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

STATISTICS = ("saturation", "brightness", "contrast")


def _thumbnail(image: Image.Image | str | Path) -> Image.Image:
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            im.draft("RGB", (128, 128))  # JPEG: decode at reduced size (large style sets)
            return im.convert("RGB").resize((64, 64), Image.Resampling.BOX)
    return image.convert("RGB").resize((64, 64), Image.Resampling.BOX)


def colour_statistics(image: Image.Image | str | Path) -> dict[str, float]:
    thumb = _thumbnail(image)
    hsv = np.asarray(thumb.convert("HSV"), dtype=np.float64) / 255
    grey = np.asarray(thumb.convert("L"), dtype=np.float64) / 255
    return {"saturation": float(hsv[..., 1].mean()), "brightness": float(hsv[..., 2].mean()),
            "contrast": float(grey.std())}


def mean_statistics(images: Iterable) -> dict[str, float]:
    rows = [colour_statistics(im) for im in images]
    if not rows:
        raise ValueError("no images to measure")
    return {k: float(np.mean([r[k] for r in rows])) for k in STATISTICS}


def style_distance(a: dict[str, float], b: dict[str, float]) -> float:
    return float(np.sqrt(sum((a[k] - b[k]) ** 2 for k in STATISTICS)))


def style_shift(before: list, after: list, style: list) -> dict:
    """The statistics of ``before`` (LoRA scale 0), ``after`` (scale 1) and the ``style`` set, and
    each render set's distance to the style set; ``moved`` > 0 means the LoRA brought the renders
    closer to the style."""
    stats = {"before": mean_statistics(before), "after": mean_statistics(after), "style": mean_statistics(style)}
    d0, d1 = style_distance(stats["before"], stats["style"]), style_distance(stats["after"], stats["style"])
    return {**stats, "distance_before": d0, "distance_after": d1, "moved": d0 - d1, "style_images": len(style)}
