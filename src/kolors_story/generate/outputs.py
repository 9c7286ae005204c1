"""What a rendered story leaves on disk: ``1.png``..``8.png`` with their settings in PNG text
chunks (and the story's ComfyUI workflow, when written), ``panel.png`` (the 8 scenes 4x2 with
captions), ``prompts.csv``."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from kolors_story.files import atomic_save_image, atomic_write_text
from kolors_story.generate.panel import save_panel
from kolors_story.story import Scene


def png_metadata(fields: dict[str, Any], comfyui: tuple[dict, dict] | None = None) -> PngInfo:
    """Text chunks, one per field plus all of them as JSON in ``parameters``; non-Latin text
    (Chinese prompts) goes into iTXt chunks. No timestamps: same settings -> same bytes.

    ``comfyui`` (the story's workflow: API graph, UI graph) goes into the ``prompt`` and ``workflow``
    chunks as ComfyUI writes its own images (dragging the image into ComfyUI opens the graph); the
    scene's prompt text then lives in ``parameters`` only. ASCII JSON: plain tEXt chunks, which every
    ComfyUI frontend reads."""
    graphs = dict(zip(("prompt", "workflow"), comfyui)) if comfyui else {}
    info = PngInfo()
    for key, value in fields.items():
        if key in graphs:
            continue
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
        info.add_text(key, text)
    info.add_text("parameters", json.dumps(fields, ensure_ascii=False, sort_keys=True))
    for key, graph in graphs.items():
        info.add_text(key, json.dumps(graph))
    return info


def _short(text: str, limit: int = 36) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def write_prompts_csv(path: Path, scenes: list[Scene], seeds: list[int]) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["scene", "description", "prompt", "negative", "seed"])
    for s, seed in zip(scenes, seeds):
        writer.writerow([s.index, s.description, s.prompt, s.negative, seed])
    return atomic_write_text(path, buf.getvalue())


def panel_title(title: str, model_name: str, note: str | None, loras: list | None = None) -> str:
    """The panel's title line; ``note``: what a stand-in model says about itself."""
    text = f"{title} | model={model_name}"
    if loras:
        text += " | LoRA " + ", ".join(f"{Path(lo.path).name} @ {lo.scale:g}" for lo in loras)
    if note:
        text += f" ({note})"
    return text


def save_story(images: list[Image.Image], scenes: list[Scene], out_dir: str | Path, title: str | None = None,
               pnginfo: list[PngInfo] | None = None) -> dict:
    """Write 1.png..N.png and panel.png; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, (scene, image) in enumerate(zip(scenes, images)):
        extra = {"pnginfo": pnginfo[n]} if pnginfo else {}
        paths.append(atomic_save_image(image, out_dir / f"{scene.index}.png", **extra))
    panel = save_panel(images, out_dir / "panel.png", captions=[_short(s.description) for s in scenes], title=title,
                       ascii_captions=[_short(s.caption_ascii) for s in scenes])
    return {"images": [str(p) for p in paths], "panel": str(panel)}
