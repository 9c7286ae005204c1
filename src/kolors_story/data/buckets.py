"""Aspect-ratio buckets (``dataset.buckets``): each training image keeps (about) its aspect ratio.

A bucket is a training size (h, w), both multiples of 64, of about the target pixel count. Each
image goes to the bucket whose aspect ratio is closest to its own (in log space), is scaled to
cover it and cropped (center or seeded random, as without buckets), and its micro-conditioning
records that: original size, crop top-left, target size = the bucket. Every batch is drawn from
one bucket (``train.loader.StreamBatchSampler``), so the images in it have one shape.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image

from kolors_story.errors import SettingsError

STEP = 64  # bucket sides are multiples of this (the UNet's downsampling of the latents, x8 for the VAE)
MAX_ASPECT = 2.0  # auto buckets span aspect ratios 1:2 .. 2:1


def auto_buckets(target_hw: tuple[int, int], step: int = STEP, max_aspect: float = MAX_ASPECT) -> list[tuple[int, int]]:
    """Sizes of about ``h x w`` pixels, sides multiples of ``step``, aspect ratios from 1:max to max:1."""
    area = target_hw[0] * target_hw[1]
    out = set()
    w = step
    while w * w <= area:  # the landscape half (w <= h), mirrored below: the list is symmetric
        h = int(area / w) // step * step
        if h >= step and w / h >= 1 / max_aspect:
            out |= {(h, w), (w, h)}
        w += step
    return sorted(out, key=lambda hw: hw[1] / hw[0])


def make_buckets(spec, target_hw: tuple[int, int]) -> list[tuple[int, int]] | None:
    """``dataset.buckets``: null (no buckets), ``auto`` or a list of [h, w]."""
    if spec in (None, False, "none"):
        return None
    if spec == "auto":
        return auto_buckets(target_hw)
    try:
        buckets = sorted({(int(h), int(w)) for h, w in spec}, key=lambda hw: hw[1] / hw[0])
    except (TypeError, ValueError):
        raise SettingsError(f"dataset.buckets={spec!r}: use null, auto or a list of [height, width]") from None
    bad = [list(b) for b in buckets if b[0] <= 0 or b[1] <= 0 or b[0] % STEP or b[1] % STEP]
    if not buckets or bad:
        raise SettingsError(f"dataset.buckets: sizes must be positive multiples of {STEP} (got {bad or spec})")
    return buckets


def bucket_for(orig_hw: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket with the aspect ratio closest to the image's."""
    aspect = math.log(orig_hw[1] / orig_hw[0])
    return min(buckets, key=lambda hw: (abs(math.log(hw[1] / hw[0]) - aspect), -hw[0] * hw[1]))


def image_size(path: Path) -> tuple[int, int]:
    """(h, w) after EXIF rotation, from the header (the pixels are not decoded)."""
    with Image.open(path) as im:
        h, w = im.height, im.width
        if im.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees
            h, w = w, h
    return h, w
