"""Copy-paste detection: panels that are (nearly) the same picture. Style coherence (CLIP-I) rises
when the panels look alike, and is highest for eight copies of one image; this is what keeps
duplicates from winning. A pair is flagged when its small grey thumbnails are nearly equal
(pixels) or its CLIP image embeddings nearly coincide (a flipped, shifted or re-encoded copy)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

THUMBNAIL = 64  # thumbnails are THUMBNAIL x THUMBNAIL grey pixels in [0, 1]


def thumbnails(images: list[Image.Image]) -> np.ndarray:
    """``[N, 64, 64]`` float32 grey thumbnails in [0, 1]."""
    return np.stack([np.asarray(im.convert("L").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BILINEAR),
                                dtype=np.float32) / 255.0 for im in images])


def pixel_distances(thumbs: np.ndarray) -> np.ndarray:
    """``[N, N]`` mean absolute difference between thumbnails (0 = identical, 1 = black vs white)."""
    flat = thumbs.reshape(len(thumbs), -1)
    return np.abs(flat[:, None, :] - flat[None, :, :]).mean(axis=-1)


def cosine_matrix(embeddings) -> np.ndarray:
    e = torch.as_tensor(embeddings).detach().to("cpu", torch.float64)
    e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (e @ e.T).numpy()


def duplicate_pairs(thumbs: np.ndarray, cosines: np.ndarray, *, max_pixel_distance: float,
                    min_cosine: float) -> list[dict]:
    """Every pair (1-based panel numbers) that is a copy, with why: ``pixels`` and/or ``embedding``."""
    dist = pixel_distances(thumbs)
    pairs = []
    for i in range(len(thumbs)):
        for j in range(i + 1, len(thumbs)):
            why = [name for name, hit in (("pixels", dist[i, j] <= max_pixel_distance),
                                          ("embedding", cosines[i, j] >= min_cosine)) if hit]
            if why:
                pairs.append({"panels": [i + 1, j + 1], "why": why, "pixel_distance": round(float(dist[i, j]), 4),
                              "cosine": round(float(cosines[i, j]), 4)})
    return pairs


def copy_paste_share(n_panels: int, pairs: list[dict]) -> float:
    """Flagged pairs over all pairs: 0 = no copies, 1 = every panel a copy of every other."""
    total = n_panels * (n_panels - 1) // 2
    return len(pairs) / total if total else 0.0
