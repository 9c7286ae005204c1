"""``python -m kolors_story.generate.compare [overrides ...] [--out coherence.png] [--seed-sets N]
[--character-lora <run>/character/lora.safetensors]``: the same story rendered four ways (no
coherence / attention sharing / reference image / both), and a fifth with a character LoRA
(``train.py character=auto``) stacked when one is given, on one sheet, one row each, with each
row's similarity between panels: CLIP-I from the aesthetic scorer's embeddings and a pixel measure
(1 - mean absolute difference of 64x64 thumbnails, over all panel pairs). ``story.file`` is read
as generate.py reads it.

One set of seeds can mislead: on the tiny model, a setting's effect on similarity changes sign
from one seed set to the next. ``--seed-sets N`` renders every variant with N seed sets (set 0:
the story's seeds; set k: each scene's seed + 1000 k) and reports, per variant, the mean change
against "no coherence" and in how many sets it was higher. The sheet shows set 0; every number
goes to ``<out>.json``.

The overrides are generate.py's (default ``model=tiny``: the pre-trained tiny Kolors and its
pre-trained tiny IP-Adapter); the sheet says when the model is a tiny one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from kolors_story import tiny
from kolors_story.errors import SettingsError, UserError
from kolors_story.evaluate.duplicates import pixel_distances, thumbnails
from kolors_story.evaluate.summary import coherence as clip_i
from kolors_story.files import atomic_save_image, atomic_write_text
from kolors_story.generate.panel import labelled_rows
from kolors_story.story import scene_seeds

VARIANTS = (("no coherence", "none"), ("attention sharing", "sharing"), ("reference image", "reference"),
            ("both", "both"))
CHARACTER_ROW = "character LoRA"  # the fifth row: no coherence, the character LoRA stacked at character_scale


def variants(character_lora: str | None = None, character_scale: float = 1.0) -> list[tuple[str, str, list[str]]]:
    """(label, coherence preset, extra overrides) of each row."""
    rows = [(label, preset, []) for label, preset in VARIANTS]
    if character_lora:
        if not Path(character_lora).is_file():
            raise SettingsError(f"--character-lora {character_lora}: no such file (train.py character=auto writes "
                                "<run>/character/lora.safetensors)")
        path = str(Path(character_lora).resolve()).replace("'", "\\'")
        rows.append((CHARACTER_ROW, "none", [f"loras=[{{path: '{path}', scale: {float(character_scale)}}}]"]))
    return rows


def pixel_similarity(images: list[Image.Image]) -> float:
    """1 - the mean absolute difference of the panels' grey thumbnails, over all pairs (1 = identical)."""
    d = pixel_distances(thumbnails(images))
    n = len(images)
    return float(1.0 - d[np.triu_indices(n, 1)].mean())


SEED_SET_STEP = 1000  # seed set k renders each scene with its seed + 1000 k


def _settings(overrides: list[str]):
    """generate.py's settings for ``overrides``, ``story.file`` read in (as generate.py does)."""
    from kolors_story.config.compose import compose_settings
    from kolors_story.story.files import apply_story_file

    return apply_story_file(compose_settings("generate", overrides))


def seed_set_overrides(overrides: list[str], count: int) -> list[list[str]]:
    """The extra overrides of each seed set: none for set 0 (the story's own seeds)."""
    if count < 1:
        raise SettingsError(f"--seed-sets {count}: render at least one seed set")
    if count == 1:
        return [[]]
    job = _settings(overrides)
    seeds = scene_seeds(len(job.story.scenes), job.sampler.seeds, job.sampler.base_seed)
    return [[] if k == 0 else [f"sampler.seeds=[{','.join(str(s + SEED_SET_STEP * k) for s in seeds)}]"]
            for k in range(count)]


def render_variants(overrides: list[str], seed_sets: int = 1, character_lora: str | None = None,
                    character_scale: float = 1.0) -> list[dict]:
    """Each variant's images (seed set 0) and its similarities in every seed set (rendered into a
    temp folder with generate.py's code)."""
    from kolors_story.evaluate.scorer import AestheticScorer
    from kolors_story.generate.job import generate

    rows_to_render = variants(character_lora, character_scale)
    extra = seed_set_overrides(overrides, seed_sets)
    rows, scorer = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for n, (label, preset, more) in enumerate(rows_to_render):
            row = {"label": label, "preset": preset, "sets": []}
            for k, seeds in enumerate(extra):
                job = _settings([*overrides, *seeds, f"coherence={preset}", *more, f"output_dir={tmp}/{n}-{k}"])
                result = generate(job, progress=False)
                images = [im.copy() for im in result.render.images]
                scorer = scorer or AestheticScorer.from_settings(job.scorer)  # the same scorer for every render
                row["sets"].append({"seeds": [int(x) for x in result.render.seeds], "pixels": pixel_similarity(images),
                                    "clip_i": clip_i(scorer.embed(images))["coherence"]})
                if k == 0:
                    row.update(images=images, tiny=result.manifest.tiny_model, **row["sets"][0])
            rows.append(row)
    return rows


def versus_off(rows: list[dict]) -> dict[str, dict]:
    """Per variant (by label), against the first row ("no coherence") seed set by seed set: the mean
    change of each measure and in how many sets it was higher."""
    off = rows[0]["sets"]
    out = {}
    for row in rows[1:]:
        out[row["label"]] = {}
        for measure in ("pixels", "clip_i"):
            deltas = [s[measure] - o[measure] for s, o in zip(row["sets"], off, strict=True)]
            out[row["label"]][measure] = {"mean_change": float(np.mean(deltas)),
                                          "higher_in": sum(d > 0 for d in deltas), "sets": len(deltas)}
    return out


def comparison_sheet(rows: list[dict], tile: int = 128) -> Image.Image:
    title = tiny.PANEL_NOTE if rows and rows[0]["tiny"] else None
    vs = versus_off(rows) if len(rows[0].get("sets", [])) > 1 else {}
    labels = []
    for row in rows:
        label = f"{row['label']}: CLIP-I {row['clip_i']:.5f}, pixel similarity {row['pixels']:.4f}"
        if row["label"] in vs:
            p = vs[row["label"]]["pixels"]
            label += f"  (pixel vs off over {p['sets']} seed sets: {p['mean_change']:+.4f}, higher in {p['higher_in']} of {p['sets']})"
        labels.append((label, row["images"]))
    return labelled_rows(labels, tile, title)


def comparison_record(rows: list[dict]) -> dict:
    """Every number of the comparison, for ``<out>.json``."""
    return {"tiny_model": rows[0]["tiny"], "seed_set_step": SEED_SET_STEP,
            "variants": [{"label": r["label"], "coherence": r["preset"], "sets": r["sets"]} for r in rows],
            "versus_off": versus_off(rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kolors_story.generate.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", default=["model=tiny"], help="generate.py overrides (default model=tiny)")
    parser.add_argument("--out", default="coherence.png", help="the sheet to write (default coherence.png)")
    parser.add_argument("--seed-sets", type=int, default=1,
                        help="render each variant with this many seed sets (set k: seeds + 1000 k; default 1)")
    parser.add_argument("--character-lora", default=None,
                        help="a character LoRA (train.py character=auto: <run>/character/lora.safetensors): one more row with it stacked")
    parser.add_argument("--character-scale", type=float, default=1.0, help="its strength (default 1.0)")
    args = parser.parse_args(argv)
    from hydra.errors import HydraException

    try:
        rows = render_variants(args.overrides, args.seed_sets, args.character_lora, args.character_scale)
    except (UserError, HydraException) as exc:  # a bad override, value or file: one line, exit 2
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    atomic_save_image(comparison_sheet(rows), out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(comparison_record(rows), indent=2))
    vs = versus_off(rows)
    for row in rows:
        line = f"{row['label']:>18}: CLIP-I {row['clip_i']:.6f}  pixel similarity {row['pixels']:.5f}"
        if row["label"] in vs and args.seed_sets > 1:
            p, c = vs[row["label"]]["pixels"], vs[row["label"]]["clip_i"]
            line += (f"  | vs off over {p['sets']} seed sets: pixel {p['mean_change']:+.4f} (higher in "
                     f"{p['higher_in']} of {p['sets']}), CLIP-I {c['mean_change']:+.4f} (higher in {c['higher_in']} of {c['sets']})")
        print(line)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
