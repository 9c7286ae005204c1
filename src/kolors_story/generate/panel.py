"""Story panels: the 8 scenes tiled 4 rows x 2 columns like the seeds' notebook, with captions."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from kolors_story.files import atomic_save_image

CJK_FONTS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
)


def panel_font(size: int) -> tuple[ImageFont.ImageFont, bool]:
    """A CJK-capable font when the system has one (fonts-noto-cjk); else Pillow's built-in one."""
    for candidate in CJK_FONTS:
        if Path(candidate).exists():
            return ImageFont.truetype(candidate, size), True
    return ImageFont.load_default(size=size), False


def _drawable(text: str, cjk: bool) -> str:
    # Without a CJK font, Chinese captions would render as boxes: keep only the ASCII part.
    return text if cjk else text.encode("ascii", "ignore").decode().strip()


def make_panel(images: list[Image.Image], captions: list[str] | None = None, columns: int = 2,
               tile: int | None = None, title: str | None = None,
               ascii_captions: list[str] | None = None) -> Image.Image:
    """Tile images row-major into ``columns`` columns; each tile gets ``"<n>. <caption>"`` under it.

    ``ascii_captions`` (e.g. the English descriptions) replace captions the font cannot draw.
    """
    if not images:
        raise ValueError("make_panel needs at least one image")
    tile = tile or max(256, images[0].width)
    rows = (len(images) + columns - 1) // columns
    font, cjk = panel_font(max(12, tile // 20))
    cap_h = max(18, tile // 12) if captions is not None else 0
    title_h = cap_h if title else 0
    panel = Image.new("RGB", (columns * tile, rows * (tile + cap_h) + title_h), "white")
    draw = ImageDraw.Draw(panel)
    if title:
        draw.text((6, 2), _drawable(title, cjk), fill="black", font=font)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        x, y = c * tile, title_h + r * (tile + cap_h)
        panel.paste(img.convert("RGB").resize((tile, tile), Image.Resampling.LANCZOS), (x, y))
        if captions is not None:
            caption = captions[i]
            if not cjk and not caption.isascii() and ascii_captions and ascii_captions[i]:
                caption = ascii_captions[i]
            text = _drawable(f"{i + 1}. {caption}", cjk)
            draw.text((x + 4, y + tile + 2), text, fill="black", font=font)
    return panel


def labelled_rows(rows: list[tuple[str, list[Image.Image]]], tile: int = 128, title: str | None = None) -> Image.Image:
    """One row of ``tile``-sized images per ``(label, images)``, each under its label line."""
    font, _ = panel_font(max(12, tile // 9))
    label_h = max(18, tile // 6)
    title_h = label_h if title else 0
    width = tile * max(len(images) for _, images in rows)
    sheet = Image.new("RGB", (width, title_h + len(rows) * (tile + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 2), title, fill="black", font=font)
    for r, (label, images) in enumerate(rows):
        y = title_h + r * (tile + label_h)
        draw.text((4, y + 2), label, fill="black", font=font)
        for c, im in enumerate(images):
            sheet.paste(im.convert("RGB").resize((tile, tile), Image.Resampling.LANCZOS), (c * tile, y + label_h))
    return sheet


def save_panel(images, path: str | Path, captions=None, **kw) -> Path:
    path = Path(path)
    atomic_save_image(make_panel(images, captions, **kw), path)
    return path


FRAME = (220, 30, 30)  # the chosen candidate's frame


def make_candidates_grid(grid: list[list[Image.Image]], chosen: list[int], candidates: list[list[dict]] | None = None,
                         tile: int = 192) -> Image.Image:
    """Best-of candidates: one column per scene, one row per candidate, the kept one framed in red;
    each tile is labelled ``<scene>/<candidate>`` and its aesthetic score (and CLIP-T) when known."""
    scenes, n = len(grid), len(grid[0])
    font, _ = panel_font(max(11, tile // 14))
    cap_h, border = max(16, tile // 10), max(3, tile // 40)
    sheet = Image.new("RGB", (scenes * tile, n * (tile + cap_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for s, column in enumerate(grid):
        for k, img in enumerate(column):
            x, y = s * tile, k * (tile + cap_h)
            sheet.paste(img.convert("RGB").resize((tile, tile), Image.Resampling.LANCZOS), (x, y))
            label = f"{s + 1}/{k + 1}"
            info = candidates[s][k] if candidates else {}
            if info.get("score") is not None:
                label += f"  {info['score']:.2f}"
            if info.get("clip_t") is not None:
                label += f"  T{info['clip_t']:.2f}"
            draw.text((x + 4, y + tile + 1), label, fill="black", font=font)
            if k == chosen[s]:
                draw.rectangle((x, y, x + tile - 1, y + tile + cap_h - 1), outline=FRAME, width=border)
    return sheet


def save_candidates_grid(grid, chosen, path: str | Path, candidates=None) -> Path:
    path = Path(path)
    atomic_save_image(make_candidates_grid(grid, chosen, candidates), path)
    return path
