"""The pictures of the curation step: a histogram of the aesthetic scores with the threshold line,
and contact sheets of what was removed (one row per duplicate group, or the dropped low scorers).
Drawn with PIL alone; each is written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from kolors_story.data.preflight import StagedImage
from kolors_story.files import atomic_save_image

TILE = 128
SHEET_COLUMNS = 8
MAX_ROWS = 24  # a sheet of thousands of thumbnails helps nobody; the report lists every file


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def score_histogram(scores: dict[str, float], threshold: float, path: Path, width: int = 640,
                    height: int = 360, bins: int = 24) -> Path:
    """Bars over the scores' range (with the threshold when it is near), dropped in red, kept in grey,
    and the threshold as a blue line (at the edge, labelled, when it is far off the chart)."""
    values = np.asarray(list(scores.values()), dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    span = max(hi - lo, 0.5)
    if lo - span <= threshold <= hi + span:
        lo, hi = min(lo, threshold), max(hi, threshold)
    hi = hi if hi > lo else lo + 1e-3
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = _font(14)
    left, right, top, bottom = 48, width - 16, 32, height - 40
    scale_y = (bottom - top) / max(1, int(counts.max()))
    bar_w = (right - left) / bins
    for i, c in enumerate(counts):
        x0 = left + i * bar_w
        colour = (200, 60, 60) if edges[i + 1] <= threshold else (120, 120, 120)
        draw.rectangle([x0 + 1, bottom - int(c) * scale_y, x0 + bar_w - 1, bottom], fill=colour)
    tx = left + (min(max(threshold, lo), hi) - lo) / (hi - lo) * (right - left)
    draw.line([tx, top - 8, tx, bottom], fill=(0, 0, 200), width=2)
    draw.line([left, bottom, right, bottom], fill="black")
    for i in range(0, bins + 1, bins // 4):
        draw.text((left + i * bar_w - 10, bottom + 6), f"{edges[i]:.3g}", fill="black", font=font)
    dropped = int((values < threshold).sum())
    draw.text((left, 8), f"aesthetic score of {len(values)} images: {dropped} below filter.min_aesthetic "
              f"{threshold:g} (blue line)", fill="black", font=font)
    atomic_save_image(img, path)
    return path


def contact_sheet(rows: list[list[StagedImage]], path: Path, scores: dict[str, float], keep_first: bool = False) -> Path:
    """Thumbnails with their name (and score), one row per group of images (``keep_first``: the first of
    each row is the one kept, labelled so)."""
    rows = [r for r in rows if r][:MAX_ROWS]
    lines = [r[i:i + SHEET_COLUMNS] for r in rows for i in range(0, len(r), SHEET_COLUMNS)]
    first = {id(r[0]) for r in rows} if keep_first else set()
    label = 18
    sheet = Image.new("RGB", (SHEET_COLUMNS * TILE, max(1, len(lines)) * (TILE + label)), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font(11)
    for y, line in enumerate(lines):
        for x, s in enumerate(line):
            with Image.open(s.staged) as im:
                thumb = im.convert("RGB")
                thumb.thumbnail((TILE, TILE))
            sheet.paste(thumb, (x * TILE + (TILE - thumb.width) // 2, y * (TILE + label)))
            text = ("KEPT " if id(s) in first else "") + Path(s.name).name[:14]
            text += f" {scores[s.name]:.2f}" if s.name in scores else ""
            draw.text((x * TILE + 2, y * (TILE + label) + TILE + 2), text, fill="black", font=font)
    atomic_save_image(sheet, path)
    return path
