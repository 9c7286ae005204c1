"""The base dataset the pre-trained tiny Kolors learned from: simple, colourful scenes drawn by code.

Each scene is a sky over a ground with one object (a sun-like disc, a square, a triangle or a
little figure) in a named colour at a named place, and a Chinese caption that says exactly that,
e.g. "蓝色的天空，绿色的草地，左边一个红色的圆形". ``Scene.colours`` keeps what the caption asks
for, so a render can be checked against its caption (the learning test does).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SKIES = {"蓝色的天空": (80, 140, 230), "橙色的晚霞": (245, 145, 60), "紫色的夜空": (95, 55, 150),
         "粉色的天空": (245, 160, 200)}
GROUNDS = {"绿色的草地": (60, 165, 75), "黄色的沙漠": (230, 195, 85), "蓝色的大海": (30, 80, 190)}
COLOURS = {"红色": (225, 35, 35), "白色": (248, 248, 248), "黄色": (250, 215, 30), "黑色": (25, 25, 25)}
SHAPES = ("圆形", "方块", "三角形", "小人")
PLACES = {"左边": 0.25, "中间": 0.5, "右边": 0.75}
HORIZON = 0.55  # the ground starts at this fraction of the height (jittered a little)


@dataclass(frozen=True)
class Scene:
    caption: str
    sky: str
    ground: str
    colour: str
    shape: str
    place: str

    @property
    def colours(self) -> dict[str, tuple[int, int, int]]:
        """The RGB the caption names for the sky, the ground and the object."""
        return {"sky": SKIES[self.sky], "ground": GROUNDS[self.ground], "object": COLOURS[self.colour]}


def random_scene(rng: np.random.Generator) -> Scene:
    pick = lambda options: list(options)[int(rng.integers(len(options)))]  # noqa: E731
    sky, ground, colour, shape, place = pick(SKIES), pick(GROUNDS), pick(COLOURS), pick(SHAPES), pick(PLACES)
    return Scene(f"{sky}，{ground}，{place}一个{colour}的{shape}", sky, ground, colour, shape, place)


def draw_scene(scene: Scene, rng: np.random.Generator, size: int = 64, horizon: float = HORIZON) -> Image.Image:
    """The scene at ``size`` x ``size`` (drawn at 4x and reduced: soft edges), with small jitter in
    colours, horizon, object size and position so that no two drawings are alike. ``horizon``:
    where the ground starts (a fraction of the height; the base model learned ``HORIZON``)."""
    big = size * 4
    jitter = lambda rgb, amount=12: tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)  # noqa: E731
    image = Image.new("RGB", (big, big), jitter(SKIES[scene.sky]))
    draw = ImageDraw.Draw(image)
    sky_share = horizon / HORIZON  # 1.0 for the base layout: the sun sits as high, relative to the horizon
    horizon = int(big * (horizon + rng.uniform(-0.04, 0.04)))
    draw.rectangle([0, horizon, big, big], fill=jitter(GROUNDS[scene.ground]))
    cx = big * (PLACES[scene.place] + rng.uniform(-0.05, 0.05))
    r = big * rng.uniform(0.11, 0.15)
    colour = jitter(COLOURS[scene.colour], 8)
    if scene.shape == "圆形":  # a disc in the sky
        cy = big * rng.uniform(0.22, 0.3) * sky_share
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif scene.shape == "方块":  # standing on the ground
        draw.rectangle([cx - r, horizon + r * 0.2 - 2 * r, cx + r, horizon + r * 0.2], fill=colour)
    elif scene.shape == "三角形":
        base = horizon + r * 0.2
        draw.polygon([(cx - r * 1.2, base), (cx + r * 1.2, base), (cx, base - 2.2 * r)], fill=colour)
    else:  # a little figure: head, body, legs
        foot = horizon + r * 0.6
        head = r * 0.45
        draw.ellipse([cx - head, foot - 2.6 * r - head, cx + head, foot - 2.6 * r + head], fill=colour)
        draw.rectangle([cx - r * 0.4, foot - 2.2 * r, cx + r * 0.4, foot - 0.9 * r], fill=colour)
        draw.rectangle([cx - r * 0.4, foot - 0.9 * r, cx - r * 0.1, foot], fill=colour)
        draw.rectangle([cx + r * 0.1, foot - 0.9 * r, cx + r * 0.4, foot], fill=colour)
    return image.resize((size, size), Image.Resampling.BOX)


def region_colours(image: Image.Image) -> dict[str, np.ndarray]:
    """Mean RGB of the top band (sky) and the bottom band (ground) of a render, away from the
    horizon and from where objects stand."""
    a = np.asarray(image.convert("RGB"), dtype=np.float64)
    h = a.shape[0]
    return {"sky": a[: int(h * 0.12)].reshape(-1, 3).mean(0), "ground": a[int(h * 0.85) :].reshape(-1, 3).mean(0)}


def caption_distance(image: Image.Image, scene: Scene) -> float:
    """How far a render's sky and ground colours are from what ``scene``'s caption names (mean RGB
    distance, 0-255 scale): low when the render follows the caption."""
    got = region_colours(image)
    want = scene.colours
    return float(np.mean([np.linalg.norm(got[k] - np.asarray(want[k], dtype=np.float64)) for k in ("sky", "ground")]))


def horizon_height(image: Image.Image) -> float:
    """Where a render's ground starts, as a fraction of its height: the row that best splits the
    image into a flat top band and a flat bottom band (least squared deviation of each row's median
    colour from its band's mean; objects barely move a row's median)."""
    rows = np.median(np.asarray(image.convert("RGB"), dtype=np.float64), axis=1)  # [H, 3]
    h = len(rows)
    splits = range(max(1, int(h * 0.15)), int(h * 0.85))
    cost = [((rows[:k] - rows[:k].mean(0)) ** 2).sum() + ((rows[k:] - rows[k:].mean(0)) ** 2).sum() for k in splits]
    return splits[int(np.argmin(cost))] / h
