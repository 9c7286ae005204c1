"""The end of a training run: the story at LoRA scale 0 (the base model) and 1 (as trained), side
by side in ``before_after.png``, and how far each is from the style set by colour statistics
(``evaluate.style``) in ``before_after.json``: did the LoRA move the story toward the style?

Both rows use the validation renderer (same scenes, seeds, sampler and coherence settings as the
checkpoint panels). Scale 0 switches the adapters off (peft's ``disable_adapters``), so the top row
is exactly the base model, for every adapter type (a DoRA at weight 0 is not). Cost: one story
render at the validation settings when the run ends on a checkpoint (its story is the bottom
row), two otherwise.
"""

from __future__ import annotations

from pathlib import Path

from kolors_story import tiny
from kolors_story.evaluate.style import style_shift
from kolors_story.files import atomic_save_image, atomic_write_json
from kolors_story.generate.panel import labelled_rows

BEFORE_AFTER_IMAGE = "before_after.png"
BEFORE_AFTER_FILE = "before_after.json"


def before_after(job, status: str, validator, style_images, run_dir, step: int, checkpoints: list) -> dict | None:
    """``job.before_after`` of a finished run that rendered its story (rank 0), else None."""
    if status != "finished" or validator is None or not job.before_after or not style_images:
        return None
    return render_before_after(validator, list(style_images), run_dir, title=tiny.PANEL_NOTE if tiny.note(job.model) else None,
                               after=_final_story(checkpoints, step, Path(run_dir)))


def _final_story(checkpoints: list, step: int, run_dir: Path) -> list | None:
    """The story the last checkpoint rendered, when it is the final step's (the same weights,
    renderer and seeds: the images ``validator.render()`` would give again; PNG is lossless)."""
    from PIL import Image

    last = checkpoints[-1] if checkpoints else None
    if last is None or last.step != step or not last.images:
        return None
    images = []
    for rel in last.images:
        with Image.open(run_dir / rel) as im:
            images.append(im.convert("RGB"))
    return images


def render_before_after(validator, style_images: list[Path], run_dir: str | Path, title: str | None = None,
                        after: list | None = None) -> dict:
    """Render both rows (``after``: the scale-1 story already rendered), write the image and the
    measure into ``run_dir`` (``title``: the sheet's, e.g. a stand-in model's note); returns the measure."""
    unet = validator.pipe.unet
    unet.disable_adapters()
    try:
        before = validator.render()
    finally:
        unet.enable_adapters()
    after = after if after is not None else validator.render()
    shift = style_shift(before, after, list(style_images))
    run_dir = Path(run_dir)
    b, a = shift["before"], shift["after"]
    rows = [(f"LoRA scale 0 (base): saturation {b['saturation']:.2f}, distance to the style set "
             f"{shift['distance_before']:.3f}", before),
            (f"LoRA scale 1 (trained): saturation {a['saturation']:.2f}, distance to the style set "
             f"{shift['distance_after']:.3f}", after)]
    atomic_save_image(labelled_rows(rows, tile=128, title=title), run_dir / BEFORE_AFTER_IMAGE)
    atomic_write_json(run_dir / BEFORE_AFTER_FILE, shift)
    return {**shift, "image": str(run_dir / BEFORE_AFTER_IMAGE)}
