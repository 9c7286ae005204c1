"""Preflight: every candidate image is fully decoded and converted to RGB before anything else.

The header alone proves little (a truncated JPEG opens fine and fails on the last scanline), so each
image is ``load()``-ed with PIL's own truncation tolerance off. The pixel count is checked from the
header *before* decoding, so a decompression bomb is rejected without allocating it. Good images
are staged as RGB JPEG (quality 95; an RGB JPEG that needs no change is copied byte for byte, so its
pixels stay exactly as they were): data-juicer then sees exactly the pixels that will be trained on.
"""

from __future__ import annotations

import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from kolors_story.data.candidates import Candidate, DataError, Dropped

POLICIES = ("skip", "fail")
JPEG_QUALITY = 95

# Magic numbers of formats PIL reads: an unidentifiable file that starts with one is a corrupt
# image, not a stray non-image file.
_MAGIC = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


class BadImage(ValueError):
    """Raised by ``load_rgb`` with the reason a user reads in the report."""


@dataclass
class StagedImage:
    id: int
    name: str  # the candidate's name (relative to the source folder)
    source: Path  # the original file
    staged: Path  # the RGB JPEG preflight wrote
    caption: str
    width: int
    height: int
    converted: str | None = None  # e.g. "CMYK -> RGB", None when the file was copied as is


def rgb_batches(images: list[StagedImage], size: int, desc: str, progress: bool):
    """``(chunk, RGB pictures)`` of ``size`` staged images at a time, with a progress bar: what the
    curation and captioning models read (only one chunk of pictures is in memory at once)."""
    from tqdm.auto import tqdm

    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, len(images), size):
            chunk = images[start : start + size]
            pictures = []
            for s in chunk:
                with Image.open(s.staged) as im:
                    pictures.append(im.convert("RGB"))
            yield chunk, pictures
            bar.update(len(chunk))


@dataclass
class PreflightResult:
    kept: list[StagedImage]
    dropped: list[Dropped]
    converted: list[dict] = field(default_factory=list)


@contextmanager
def _strict_pil(max_pixels: int | None):
    """PIL settings for the duration of preflight: no truncated-image tolerance (data-juicer turns it
    on globally when imported), and our own pixel limit instead of PIL's warning/exception."""
    old_trunc, old_max = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = old_trunc, old_max


def _not_an_image_reason(path: Path) -> str:
    head = path.read_bytes()[:512]
    for magic, fmt in _MAGIC.items():
        if head.startswith(magic):
            return f"corrupt image: looks like {fmt} but its header cannot be read"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "corrupt image: looks like WebP but its header cannot be read"
    try:
        text = head.decode("utf-8")
        if all(c.isprintable() or c in "\r\n\t" for c in text):
            return "not an image: the file contains text"
    except UnicodeDecodeError:
        pass
    return "not an image: PIL does not recognise the format"


def _to_rgb8(im: Image.Image) -> Image.Image:
    """RGB, 8 bits per channel. Transparency is composited on white (what a viewer shows);
    16-bit and 32-bit grayscale are rescaled, not clipped (``convert('RGB')`` would clip 16-bit
    values > 255 to white)."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im).astype(np.float64)
        if mode.startswith("I;16") or (arr.min() >= 0 and arr.max() <= 65535):
            arr = arr / 257.0
        else:  # 32-bit integer data of unknown range: stretch to 0..255
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.rint(arr).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(im).astype(np.float64)
        arr = arr * 255.0 if arr.size and np.nanmax(arr) <= 1.0 else arr
        return Image.fromarray(np.nan_to_num(arr).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "1":
        return im.convert("L").convert("RGB")
    return im.convert("RGB")


def _check_file(path: Path) -> None:
    """A regular, non-empty, readable file, or ``BadImage`` saying which of those it is not."""
    if not path.exists():
        raise BadImage("missing file: it does not exist")
    if not path.is_file():
        raise BadImage("not a file (a folder or a special file)")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BadImage(f"cannot read: {exc}") from None
    if size == 0:
        raise BadImage("zero-byte file")


def load_rgb(path: str | Path, max_pixels: int | None = None) -> tuple[Image.Image, dict]:
    """Open, check and fully decode one image; returns (RGB image, info) or raises ``BadImage``.
    ``info`` has ``format``, ``mode``, ``size`` and ``unchanged`` (True: an RGB JPEG whose bytes can
    be copied as they are)."""
    path = Path(path)
    _check_file(path)
    with _strict_pil(max_pixels):
        try:
            im = Image.open(path)
        except UnidentifiedImageError:
            raise BadImage(_not_an_image_reason(path)) from None
        except Image.DecompressionBombError as exc:  # only if someone re-enabled PIL's own limit
            raise BadImage(f"too many pixels: {exc}") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise BadImage(f"corrupt image header: {exc}") from None
        with im:
            w, h = im.size
            if w <= 0 or h <= 0:
                raise BadImage(f"corrupt image header: size {w}x{h}")
            if max_pixels and w * h > int(max_pixels):
                raise BadImage(
                    f"too many pixels: {w}x{h} = {w * h:,} > dataset.max_pixels={int(max_pixels):,} "
                    "(decompression-bomb guard; raise dataset.max_pixels if the image is genuine)"
                )
            fmt, mode = im.format, im.mode
            try:
                im.load()
            except OSError as exc:
                msg = str(exc)
                if "truncated" in msg:
                    raise BadImage(f"truncated image: {msg}") from None
                raise BadImage(f"corrupt image data: {msg}") from None
            except (SyntaxError, ValueError, EOFError, MemoryError) as exc:
                raise BadImage(f"corrupt image data: {type(exc).__name__}: {exc}") from None
            frames = getattr(im, "n_frames", 1)
            orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
            try:
                upright = ImageOps.exif_transpose(im) if orientation not in (None, 1) else im
                rgb = _to_rgb8(upright)
            except Exception as exc:  # noqa: BLE001 - exotic modes: report, don't crash the run
                raise BadImage(f"cannot convert {mode} to RGB: {type(exc).__name__}: {exc}") from None
    notes = []
    if mode != "RGB":
        notes.append(f"{mode} -> RGB")
    if orientation not in (None, 1):
        notes.append(f"EXIF orientation {orientation} applied")
    if frames > 1:
        notes.append(f"first of {frames} frames")
    if fmt != "JPEG" and not notes:
        notes.append(f"{fmt} -> JPEG")
    unchanged = fmt == "JPEG" and mode == "RGB" and orientation in (None, 1)
    return rgb, {"format": fmt, "mode": mode, "size": rgb.size, "unchanged": unchanged, "note": ", ".join(notes) or None}


def _check(index: int, cand: Candidate, stage_dir: Path, max_pixels: int | None,
           allow_uncaptioned: bool) -> tuple[str | None, dict | None]:
    """(why the candidate is bad, or None; what was staged as ``<stage_dir>/<index>.jpg``)."""
    reason = cand.problem
    if reason is None and cand.path is None:
        reason = "missing file"
    if reason is None and not (cand.caption or "").strip() and not allow_uncaptioned:
        reason = "empty caption"
    if reason is not None:
        return reason, None
    try:
        rgb, info = load_rgb(cand.path, max_pixels)
    except BadImage as exc:
        return str(exc), None
    staged = stage_dir / f"{index:06d}.jpg"
    if info["unchanged"]:
        shutil.copyfile(cand.path, staged)
    else:
        rgb.save(staged, format="JPEG", quality=JPEG_QUALITY)
    return None, {"size": rgb.size, "unchanged": info["unchanged"], "note": info["note"]}


def _check_star(args):
    return _check(*args)


def _results(candidates: list[Candidate], stage_dir: Path, max_pixels, allow_uncaptioned, workers: int):
    """Each candidate's check in input order: in this process, or ``workers`` processes (spawned:
    no forked torch threads), each staging its own files."""
    jobs = [(i, c, stage_dir, max_pixels, allow_uncaptioned) for i, c in enumerate(candidates)]
    if workers <= 1 or len(jobs) < 2:
        yield from map(_check_star, jobs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(_check_star, jobs, chunksize=max(1, min(32, len(jobs) // (4 * workers))))


def preflight(candidates: list[Candidate], stage_dir: str | Path, *, policy: str = "skip",
              max_pixels: int | None = None, progress: bool = True, allow_uncaptioned: bool = False,
              workers: int = 1) -> PreflightResult:
    """Check every candidate; stage the good ones as ``<stage_dir>/<id>.jpg`` (``allow_uncaptioned``:
    an empty caption is fine, the captioner writes one). ``workers`` > 1 checks in that many
    processes (``dataset.workers``): the same files, reasons and order as one.

    ``policy='fail'`` raises a DataError listing every bad file (after checking all of them, so the
    list is complete); ``'skip'`` drops them and returns them in ``dropped``.
    """
    from tqdm.auto import tqdm

    if policy not in POLICIES:
        raise DataError(f"dataset.on_bad_file={policy!r}: use skip or fail", step="preflight")
    if int(workers) < 1:
        raise DataError(f"dataset.workers={workers}: use 1 (this process) or more processes", step="preflight")
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    kept: list[StagedImage] = []
    dropped: list[Dropped] = []
    converted: list[dict] = []
    bar = tqdm(total=len(candidates), desc="preflight", unit="img", dynamic_ncols=True, disable=not progress)
    results = _results(candidates, stage_dir, max_pixels, allow_uncaptioned, int(workers))
    for index, (cand, (reason, staged)) in enumerate(zip(candidates, results)):
        bar.update(1)
        if reason is not None:
            dropped.append(Dropped(cand.name, "preflight", reason))
            bar.set_postfix(bad=len(dropped), refresh=False)
            continue
        if not staged["unchanged"]:
            converted.append({"file": cand.name, "conversion": staged["note"]})
        w, h = staged["size"]
        kept.append(StagedImage(index, cand.name, Path(cand.path), stage_dir / f"{index:06d}.jpg", cand.caption,
                                w, h, None if staged["unchanged"] else staged["note"]))
    bar.close()
    if dropped and policy == "fail":
        lines = "\n".join(f"  {d.file}: {d.reason}" for d in dropped[:50])
        more = f"\n  ... and {len(dropped) - 50} more" if len(dropped) > 50 else ""
        raise DataError(
            f"preflight found {len(dropped)} bad file(s) of {len(candidates)} and dataset.on_bad_file=fail:\n"
            f"{lines}{more}\nFix or remove them, or set dataset.on_bad_file=skip to drop them.",
            step="preflight",
            report={"dropped": [d.as_dict() for d in dropped]},
        )
    return PreflightResult(kept, dropped, converted)
