"""A small ink-wash ("水墨") landscape style dataset, drawn by code so the pipeline runs offline.

24 images, deterministic for a seed, with captions that describe what was drawn (mountain layers,
mist, sun or moon, birds, boat, orientation). The sizes are chosen around the baseline recipe's
bounds (min side 1024, aspect 0.5-2.0, inclusive): some sit exactly on a bound, some just outside,
so ``filter=default`` visibly drops some of them. A few are written as palette / RGBA / grayscale
files so preflight's conversions are exercised on the normal path too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from kolors_story.files import atomic_save_image, atomic_write_json, atomic_write_text

DEMO_VERSION = 1

# (width, height, file format). The comment says what the default recipe does with it.
DEMO_SIZES: list[tuple[int, int, str]] = [
    (1024, 1024, "jpg"),  # kept: exactly the minimum
    (1280, 1024, "jpg"),  # kept
    (1024, 1280, "jpg"),  # kept
    (1536, 1024, "jpg"),  # kept
    (1024, 1536, "png-p"),  # kept (palette PNG)
    (2048, 1024, "jpg"),  # kept: aspect exactly 2.0
    (1024, 2048, "jpg"),  # kept: aspect exactly 0.5
    (1200, 1200, "jpg-l"),  # kept (grayscale JPEG)
    (1344, 1152, "jpg"),  # kept
    (1152, 1344, "png-rgba"),  # kept (RGBA PNG, transparent border)
    (1600, 1200, "jpg"),  # kept
    (1120, 1400, "jpg"),  # kept
    (1023, 1024, "jpg"),  # dropped: width one pixel short
    (1024, 1000, "jpg"),  # dropped: height short
    (768, 768, "jpg"),  # dropped: small
    (512, 640, "jpg"),  # dropped: small
    (960, 1280, "jpg"),  # dropped: width short
    (2080, 1024, "jpg"),  # dropped: aspect 2.03
    (1024, 2080, "jpg"),  # dropped: aspect 0.49
    (3072, 1024, "jpg"),  # dropped: aspect 3
    (1024, 3072, "jpg"),  # dropped: aspect 1/3
    (640, 480, "jpg"),  # dropped: small
    (1408, 1056, "jpg"),  # kept
    (2040, 1024, "jpg"),  # kept: aspect 1.99
]

_COUNT_ZH = {1: "一", 2: "两", 3: "三", 4: "四", 5: "五"}


def _ridge(rng, width: int, base: float, amp: float) -> np.ndarray:
    """A mountain ridge line: a sum of a few sines with random phase."""
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)
    y = np.full(width, base, dtype=np.float32)
    for k in range(1, 5):
        freq = rng.uniform(0.6, 2.2) * k
        y += amp / k * np.sin(2 * np.pi * freq * x + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    return y


def _wash(rng, width: int, height: int, paper, ink) -> tuple[Image.Image, int, bool, bool]:
    """The mountains in ink wash, painted at 1/4 size and enlarged (soft edges, like ink bleeding
    into paper); returns the picture, its layer count and whether it is misty / has water."""
    w, h = max(8, width // 4), max(8, height // 4)
    img = np.broadcast_to(paper, (h, w, 3)).copy()
    yy = np.arange(h, dtype=np.float32)[:, None]
    layers = int(rng.integers(2, 5))
    misty = bool(rng.random() < 0.6)
    water = bool(rng.random() < 0.5)
    horizon = h * (0.78 if water else 1.0)
    for k in range(layers):
        depth = (k + 1) / layers  # 1 = nearest
        ridge = _ridge(rng, w, base=h * (0.25 + 0.4 * depth), amp=h * rng.uniform(0.05, 0.12))[None, :]
        below = yy >= ridge
        fade = np.exp(-(yy - ridge).clip(0) / (h * (0.12 if misty else 0.35)))
        alpha = below * (0.18 + 0.6 * depth) * (0.35 + 0.65 * fade)
        if water:
            alpha = alpha * (yy < horizon)
        img = img * (1 - alpha[..., None]) + ink * alpha[..., None]
    if water:  # pale water band with the mountains' faint reflection
        band = (yy >= horizon) * 0.08
        img = img * (1 - band[..., None]) + ink * band[..., None]
    im = Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB").resize((width, height), Image.Resampling.BICUBIC)
    return im, layers, misty, water


def _sky_and_boat(rng, im: Image.Image, ink, water: bool) -> tuple[list[str], bool]:
    """A sun or moon, birds and (on water) a boat drawn onto ``im``; returns the sky's caption parts."""
    width, height = im.size
    draw = ImageDraw.Draw(im)
    s = min(width, height)
    sky = []
    body = rng.choice(["red sun", "moon", "none"], p=[0.45, 0.3, 0.25])
    if body != "none":
        r = s * rng.uniform(0.05, 0.09)
        cx, cy = width * rng.uniform(0.2, 0.8), height * rng.uniform(0.1, 0.25)
        fill = (196, 48, 38) if body == "red sun" else (250, 248, 240)
        outline = None if body == "red sun" else (150, 150, 150)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=max(1, s // 300))
        sky.append("一轮红日" if body == "red sun" else "一弯明月")
    birds = int(rng.integers(0, 5))
    for _ in range(birds):
        bx, by, bs = width * rng.uniform(0.1, 0.9), height * rng.uniform(0.08, 0.3), s * rng.uniform(0.012, 0.025)
        draw.line([(bx - bs, by - bs * 0.5), (bx, by), (bx + bs, by - bs * 0.5)], fill=tuple(int(c) for c in ink), width=max(2, s // 250))
    if birds:
        sky.append(f"{_COUNT_ZH.get(birds, str(birds))}只飞鸟")
    boat = water and bool(rng.random() < 0.7)
    if boat:
        bx, by, bl = width * rng.uniform(0.25, 0.75), height * 0.86, s * 0.06
        draw.polygon([(bx - bl, by), (bx + bl, by), (bx + bl * 0.6, by + bl * 0.25), (bx - bl * 0.6, by + bl * 0.25)],
                     fill=tuple(int(c) for c in ink))
        draw.line([(bx, by), (bx, by - bl * 0.9)], fill=tuple(int(c) for c in ink), width=max(2, s // 300))
    return sky, boat


def draw_demo_image(index: int, width: int, height: int, seed: int = 0) -> tuple[Image.Image, str]:
    """One RGB ink-wash landscape and its caption."""
    rng = np.random.default_rng([seed, index])
    paper = np.array([241, 233, 214], dtype=np.float32) + rng.uniform(-6, 6, 3).astype(np.float32)
    ink = np.array([28, 30, 36], dtype=np.float32) + rng.uniform(-6, 6, 3).astype(np.float32)
    im, layers, misty, water = _wash(rng, width, height, paper, ink)
    sky, boat = _sky_and_boat(rng, im, ink, water)
    # Paper grain at full size.
    grain = np.random.default_rng([seed, index, 1]).integers(-5, 6, (height, width, 1), dtype=np.int16)
    im = Image.fromarray((np.asarray(im, dtype=np.int16) + grain).clip(0, 255).astype(np.uint8), "RGB")

    shape = "横幅" if width > height * 1.15 else "竖幅" if height > width * 1.15 else "方幅"
    parts = ["水墨画风格", shape, f"{_COUNT_ZH[layers]}重远山层叠"]
    parts.append("山间云雾缭绕" if misty else "山势清晰")
    parts += sky
    if water:
        parts.append("江上一叶扁舟" if boat else "江水平静")
    parts += ["大片留白", "宣纸纹理"]
    return im, "，".join(parts)


def make_demo_dataset(folder: str | Path, seed: int = 0) -> Path:
    """Write the demo images + ``metadata.jsonl`` into ``folder`` (skipped when already there)."""
    folder = Path(folder)
    marker = folder / "demo.json"
    spec = {"version": DEMO_VERSION, "seed": int(seed), "count": len(DEMO_SIZES)}
    if marker.is_file() and (folder / "metadata.jsonl").is_file():
        try:
            done = json.loads(marker.read_text(encoding="utf-8"))
            if done.get("spec") == spec and all((folder / f).is_file() for f in done.get("files", [])):
                return folder
        except ValueError:
            pass
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    rows, files = [], []
    for i, (width, height, fmt) in enumerate(tqdm(DEMO_SIZES, desc="demo: drawing images", unit="img", dynamic_ncols=True)):
        im, caption = draw_demo_image(i, width, height, seed)
        if fmt == "png-p":
            name = f"ink_{i:02d}.png"
            atomic_save_image(im.quantize(colors=64, method=Image.Quantize.MEDIANCUT), folder / name, compress_level=1)
        elif fmt == "png-rgba":
            name = f"ink_{i:02d}.png"
            rgba = im.convert("RGBA")
            alpha = Image.new("L", im.size, 0)
            m = min(width, height) // 20  # a transparent border: preflight composites it on white
            ImageDraw.Draw(alpha).rectangle([m, m, width - 1 - m, height - 1 - m], fill=255)
            rgba.putalpha(alpha)
            atomic_save_image(rgba, folder / name, compress_level=1)
        elif fmt == "jpg-l":
            name = f"ink_{i:02d}.jpg"
            atomic_save_image(im.convert("L"), folder / name, quality=92)
            caption = caption.replace("水墨画风格", "水墨画风格，纯墨色")
        else:
            name = f"ink_{i:02d}.jpg"
            atomic_save_image(im, folder / name, quality=92)
        rows.append({"file_name": name, "text": caption})
        files.append(name)
    atomic_write_text(folder / "metadata.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_json(marker, {"spec": spec, "files": files})
    return folder
