"""How a training image becomes pixels: scaled to cover the target size, then cropped, with the
SDXL micro-conditioning (``add_time_ids``) of that crop.

``add_time_ids`` follow ``KolorsPipeline._get_add_time_ids``: original (h, w) of the file after EXIF
rotation, crop top-left (top, left) in the resized image, target (h, w). A random crop is drawn
from (seed, image hash) only, so it is the same for an image on every run and in every order.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from kolors_story.errors import SettingsError

CROP_POLICIES = ("center", "random")
RESAMPLE = Image.Resampling.LANCZOS


class ImageDecodeError(ValueError):
    """A training image cannot be decoded; the message names the file."""


def target_size(resolution) -> tuple[int, int]:
    """(h, w) from ``dataset.resolution``: an int (square) or [h, w]; both multiples of 8."""
    if isinstance(resolution, (int, np.integer)) or (isinstance(resolution, str) and resolution.isdigit()):
        h = w = int(resolution)
    else:
        try:
            h, w = (int(v) for v in resolution)
        except (TypeError, ValueError):
            raise SettingsError(f"dataset.resolution={resolution!r}: give one int or [height, width]") from None
    if h <= 0 or w <= 0 or h % 8 or w % 8:
        raise SettingsError(f"dataset.resolution={resolution!r}: sizes must be positive multiples of 8 (the VAE downsamples 8x)")
    return h, w


def crop_geometry(orig_hw: tuple[int, int], target_hw: tuple[int, int], crop: str, seed: int, image_sha: str):
    """(resized (h, w), crop (top, left)) for an image of size ``orig_hw``.

    The image is scaled to cover the target, then cropped. A random crop is drawn from
    ``(seed, image_sha)`` only, so it is the same for an image on every run and in every order.
    """
    if crop not in CROP_POLICIES:
        raise SettingsError(f"dataset.crop={crop!r}: use one of {list(CROP_POLICIES)}")
    oh, ow = orig_hw
    th, tw = target_hw
    scale = max(th / oh, tw / ow)
    rh, rw = max(th, round(oh * scale)), max(tw, round(ow * scale))
    if crop == "center":
        top, left = (rh - th) // 2, (rw - tw) // 2
    else:
        digest = hashlib.sha256(f"{int(seed)}:{image_sha}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        top, left = rng.randint(0, rh - th), rng.randint(0, rw - tw)
    return (rh, rw), (top, left)


def preprocess_image(path: Path, target_hw, crop: str, seed: int, image_sha: str):
    """Pixels in [-1, 1] as [3, h, w] float32, and the 6 add_time_ids of this crop
    (original h, w of the file after EXIF rotation; crop top, left; target h, w)."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
    except Exception as e:
        raise ImageDecodeError(f"Training image {path} cannot be decoded ({e}); re-run `python train.py stage=data`.") from e
    orig_hw = (im.height, im.width)
    (rh, rw), (top, left) = crop_geometry(orig_hw, target_hw, crop, seed, image_sha)
    th, tw = target_hw
    if (rh, rw) != orig_hw:
        im = im.resize((rw, rh), RESAMPLE)
    im = im.crop((left, top, left + tw, top + th))
    pixels = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
    return pixels, [orig_hw[0], orig_hw[1], top, left, th, tw]
