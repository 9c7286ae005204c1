"""``python -m kolors_story.generate.compare [overrides ...] [--out coherence.png]``: the same story
rendered four ways (no coherence / attention sharing / reference image / both) on one sheet, one
row each, with each row's similarity between panels: CLIP-I from the aesthetic scorer's embeddings
and a pixel measure (1 - mean absolute difference of 64x64 thumbnails, over all panel pairs).

The overrides are generate.py's (default ``model=tiny``: the pre-trained tiny Kolors and its
pre-trained tiny IP-Adapter); the sheet says when the model is a tiny one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from kolors_story.evaluate.duplicates import pixel_distances, thumbnails
from kolors_story.evaluate.summary import coherence as clip_i
from kolors_story.files import atomic_save_image
from kolors_story.generate.panel import labelled_rows
from kolors_story.records import TINY_NOTE

VARIANTS = (("no coherence", "none"), ("attention sharing", "sharing"), ("reference image", "reference"),
            ("both", "both"))


def pixel_similarity(images: list[Image.Image]) -> float:
    """1 - the mean absolute difference of the panels' grey thumbnails, over all pairs (1 = identical)."""
    d = pixel_distances(thumbnails(images))
    n = len(images)
    return float(1.0 - d[np.triu_indices(n, 1)].mean())


def render_variants(overrides: list[str]) -> list[dict]:
    """Each variant's images and similarities (rendered into a temp folder with generate.py's code)."""
    from kolors_story.configs import compose_settings
    from kolors_story.evaluate.scorer import AestheticScorer
    from kolors_story.generate.run import generate

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, preset in VARIANTS:
            job = compose_settings("generate", [*overrides, f"coherence={preset}", f"output_dir={tmp}/{preset}"])
            result = generate(job, progress=False)
            scorer = AestheticScorer.from_settings(job.scorer)
            images = [im.copy() for im in result.render.images]
            rows.append({"label": label, "images": images, "tiny": result.manifest["tiny_model"],
                         "clip_i": clip_i(scorer.embed(images))["coherence"], "pixels": pixel_similarity(images)})
    return rows


def comparison_sheet(rows: list[dict], tile: int = 128) -> Image.Image:
    title = f"{TINY_NOTE} (64x64)" if rows and rows[0]["tiny"] else None
    return labelled_rows([(f"{row['label']}: CLIP-I {row['clip_i']:.5f}, pixel similarity {row['pixels']:.4f}",
                           row["images"]) for row in rows], tile, title)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kolors_story.generate.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", default=["model=tiny"], help="generate.py overrides (default model=tiny)")
    parser.add_argument("--out", default="coherence.png", help="the sheet to write (default coherence.png)")
    args = parser.parse_args(argv)
    rows = render_variants(args.overrides)
    atomic_save_image(comparison_sheet(rows), Path(args.out))
    for row in rows:
        print(f"{row['label']:>18}: CLIP-I {row['clip_i']:.6f}  pixel similarity {row['pixels']:.5f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
