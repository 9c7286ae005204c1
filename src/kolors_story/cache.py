"""Latent + prompt-embedding cache: what the trainer consumes instead of images and captions.

For every training image the cache holds one ``.safetensors`` file with
``latents`` [4, H/8, W/8], ``prompt_embeds`` [256, D], ``pooled_prompt_embeds`` [D] and
``add_time_ids`` [6]; the story's scenes get one file with their prompt + negative embeddings.

Design choices (why):
- Prompt embeddings come from the pipeline's own ``encode_prompt`` (and the story's from
  ``generation.encode_scenes``), so a cached embedding is exactly what generation computes.
- Latents are the VAE posterior's *mean* times ``vae.config.scaling_factor``: deterministic, so the
  cache is reproducible and its key means something. Sampling from the posterior (as some trainers
  do every step) adds noise of std ~exp(logvar/2), which for the SDXL VAE is tiny next to the
  diffusion noise; the trainer is free to treat the latents as fixed.
- An item file is named ``<image_key>-<text_key>.safetensors``. The image key hashes the image
  bytes, the resize/crop policy, ``models.model_hash``, the dtype and a sampled fingerprint of the
  VAE weights; the text key hashes the caption, the model hash, the dtype and a fingerprint of the
  text encoder + tokenizer files (``model_hash`` alone sees only names and sizes, so a retrained
  model of the same shape would otherwise reuse stale entries). A changed caption therefore only
  needs a new text part: its latents are taken from the file that still carries the old caption
  (same image key), and vice versa. Superseded files are left in place (cheap to keep, and
  switching back to an old caption is then free); delete ``<data_dir>/cache`` to reclaim space.
- Nothing on disk is trusted: a file that fails to load, lacks a key, has a wrong shape or dtype
  or holds NaN/inf is deleted and recomputed. Writes go through ``io.atomic_path`` (temp + rename),
  so a killed run leaves either no file or a complete one.
- The text encoder (the largest part of Kolors) is only constructed when some embedding is
  missing, the VAE only when some latent is missing (never the UNet), and both are released
  (del + gc) before ``build_cache`` returns, i.e. before the trainer loads the UNet. Files are
  written as soon as both their parts exist (batch by batch), so an interrupted run keeps its work.
- Embeddings are computed on ``model.device`` in ``model.dtype`` and stored as float32; the key
  includes the dtype but not the device (CPU and GPU kernels may differ in the last bits).

Resize/crop: the image is scaled (Lanczos) so it covers the target size (short side = resolution
for a square target), then cropped to it: ``center`` or ``random`` (one offset per image, drawn
from ``trainer.seed`` and the image hash, so it is stable across runs and cached). ``add_time_ids``
follow SDXL's micro-conditioning as ``KolorsPipeline._get_add_time_ids`` builds them:
original (h, w) of the file, crop top-left (top, left) in the resized image, target (h, w).
"""

from __future__ import annotations

import csv
import gc
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file
from tqdm.auto import tqdm

from kolors_story.io import file_sha256
from kolors_story import models
from kolors_story.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

# Bump when what goes into a cache file changes (preprocessing, encoding): old files stop matching.
CACHE_VERSION = 1
MAX_SEQUENCE_LENGTH = 256  # KolorsPipeline.encode_prompt's default, what generation uses
ITEM_KEYS = ("latents", "prompt_embeds", "pooled_prompt_embeds", "add_time_ids")
STORY_KEYS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
CROP_POLICIES = ("center", "random")
DEFAULT_BATCH_SIZE = 4
STALE_TMP_SECONDS = 3600  # temp files left by a killed writer are removed after this long
RESAMPLE = Image.Resampling.LANCZOS

REBUILD_HINT = "Rebuild it with `python train.py stage=data` (bad cache files are recomputed)."


class CacheError(RuntimeError):
    """A cache file or the dataset feeding the cache is unusable; the message names it."""


@dataclass
class TrainingCache:
    cache_dir: Path
    items: list[Path]  # one file per training image, metadata.csv order
    story: Path | None  # the scenes' embeddings (None when no scenes were given)
    model_hash: str
    stats: dict = field(default_factory=dict)  # counts of reused / computed parts of this build

    def __len__(self) -> int:
        return len(self.items)


# ----------------------------------------------------------------------------------------- loading


def _check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise CacheError(f"{path}: '{name}' holds NaN/inf values. {REBUILD_HINT}")


def _load(path: str | Path, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CacheError(f"Cache file {path} does not exist. {REBUILD_HINT}")
    try:
        # Read into memory rather than memory-map: a mapped file that someone truncates in place
        # would crash the process (SIGBUS) when a tensor is touched, instead of raising here.
        tensors = load_safetensors_bytes(path.read_bytes())
    except Exception as e:  # truncated/garbage files raise various safetensors errors
        raise CacheError(f"Cache file {path} cannot be read ({e}). {REBUILD_HINT}") from e
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise CacheError(f"Cache file {path} lacks {missing} (has {sorted(tensors)}). {REBUILD_HINT}")
    out = {k: tensors[k] for k in keys}
    for k, t in out.items():
        if t.dtype != torch.float32:
            raise CacheError(f"Cache file {path}: '{k}' is {t.dtype}, expected float32. {REBUILD_HINT}")
    _check_finite(out, path)
    return out


def load_cached_item(path: str | Path) -> dict[str, torch.Tensor]:
    """One training item: latents [C, h, w], prompt_embeds [L, D], pooled_prompt_embeds [D], add_time_ids [6]."""
    out = _load(path, ITEM_KEYS)
    lat, emb, pooled, ids = (out[k] for k in ITEM_KEYS)
    if lat.dim() != 3 or emb.dim() != 2 or pooled.dim() != 1 or tuple(ids.shape) != (6,) or emb.shape[1] != pooled.shape[0]:
        shapes = {k: tuple(v.shape) for k, v in out.items()}
        raise CacheError(f"Cache file {path} has wrong shapes {shapes}. {REBUILD_HINT}")
    return out


def load_story_embeddings(path: str | Path) -> dict[str, torch.Tensor]:
    """The scenes' embeddings, same keys and shapes as ``generation.encode_scenes`` returns."""
    out = _load(path, STORY_KEYS)
    n = out["prompt_embeds"].shape[0]
    ok = (
        out["prompt_embeds"].dim() == 3
        and out["negative_prompt_embeds"].shape == out["prompt_embeds"].shape
        and out["pooled_prompt_embeds"].shape == (n, out["prompt_embeds"].shape[2])
        and out["negative_pooled_prompt_embeds"].shape == out["pooled_prompt_embeds"].shape
    )
    if not ok:
        shapes = {k: tuple(v.shape) for k, v in out.items()}
        raise CacheError(f"Story cache file {path} has wrong shapes {shapes}. {REBUILD_HINT}")
    return out


def read_cache_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a cache file's header (caption, image hash, crop, model hash ...)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


# ------------------------------------------------------------------------------------- the dataset


def _resolve(train: Path, p: Path) -> Path:
    return p if p.is_absolute() or not (train / p).exists() and p.exists() else train / p


def _dataset_items(prepared, data_dir) -> tuple[list[tuple[Path, str]], str | None]:
    """(image path, caption) pairs from a PreparedDataset (duck-typed) or a processed folder."""
    if prepared is None:
        prepared = data_dir
    if isinstance(prepared, (str, os.PathLike)):
        root = Path(prepared)
        train = root / "train" if (root / "train" / "metadata.csv").exists() else root
        csv_path = train / "metadata.csv"
        if not csv_path.is_file():
            raise CacheError(
                f"No processed dataset at {root}: expected {root / 'train' / 'metadata.csv'} (file_name,text). "
                "Prepare it first with `python train.py stage=data`."
            )
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = {"file_name", "text"} - set(reader.fieldnames or [])
            if missing:
                raise CacheError(f"{csv_path} lacks column(s) {sorted(missing)} (has {reader.fieldnames}).")
            items = [(train / row["file_name"], row["text"] or "") for row in reader]
        dataset_hash = None
    else:
        train = Path(prepared.train_dir)
        # paths may be absolute, relative to train_dir, or relative to the working directory
        items = [(_resolve(train, Path(p)), str(t)) for p, t in prepared.items]
        dataset_hash = getattr(prepared, "dataset_hash", None)
    if not items:
        raise CacheError(f"The processed dataset in {train} has no images: nothing to cache.")
    missing = [str(p) for p, _ in items if not p.is_file()]
    if missing:
        raise CacheError(
            f"{len(missing)} image(s) listed in {train / 'metadata.csv'} do not exist, e.g. {missing[:3]}. "
            "Re-run `python train.py stage=data`."
        )
    return items, dataset_hash


# --------------------------------------------------------------------------- resize / crop / keys


def target_size(resolution) -> tuple[int, int]:
    """(h, w) from ``dataset.resolution``: an int (square) or [h, w]; both multiples of 8."""
    if isinstance(resolution, (int, np.integer)) or (isinstance(resolution, str) and resolution.isdigit()):
        h = w = int(resolution)
    else:
        try:
            h, w = (int(v) for v in resolution)
        except Exception:
            raise ValueError(f"dataset.resolution={resolution!r}: give one int or [height, width]") from None
    if h <= 0 or w <= 0 or h % 8 or w % 8:
        raise ValueError(f"dataset.resolution={resolution!r}: sizes must be positive multiples of 8 (the VAE downsamples 8x)")
    return h, w


def crop_geometry(orig_hw: tuple[int, int], target_hw: tuple[int, int], crop: str, seed: int, image_sha: str):
    """(resized (h, w), crop (top, left)) for an image of size ``orig_hw``.

    The image is scaled to cover the target, then cropped. A random crop is drawn from
    ``(seed, image_sha)`` only, so it is the same for an image on every run and in every order.
    """
    if crop not in CROP_POLICIES:
        raise ValueError(f"dataset.crop={crop!r}: use one of {list(CROP_POLICIES)}")
    oh, ow = orig_hw
    th, tw = target_hw
    scale = max(th / oh, tw / ow)
    rh, rw = max(th, round(oh * scale)), max(tw, round(ow * scale))
    if crop == "center":
        top, left = (rh - th) // 2, (rw - tw) // 2
    else:
        digest = hashlib.sha256(f"{int(seed)}:{image_sha}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        top, left = rng.randint(0, rh - th), rng.randint(0, rw - tw)
    return (rh, rw), (top, left)


def preprocess_image(path: Path, target_hw, crop: str, seed: int, image_sha: str):
    """Pixels in [-1, 1] as [3, h, w] float32, and the 6 add_time_ids of this crop
    (original h, w of the file after EXIF rotation; crop top, left; target h, w)."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
    except Exception as e:
        raise CacheError(f"Training image {path} cannot be decoded ({e}); re-run `python train.py stage=data`.") from e
    orig_hw = (im.height, im.width)
    (rh, rw), (top, left) = crop_geometry(orig_hw, target_hw, crop, seed, image_sha)
    th, tw = target_hw
    if (rh, rw) != orig_hw:
        im = im.resize((rw, rh), RESAMPLE)
    im = im.crop((left, top, left + tw, top + th))
    pixels = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
    return pixels, [orig_hw[0], orig_hw[1], top, left, th, tw]






def component_fingerprint(layout: models.KolorsLayout, part: str) -> str:
    """Identity of the files that produce a cache part: ``vae`` (latents) or ``text`` (embeddings),
    so a new text encoder does not invalidate latents and a new VAE does not invalidate embeddings."""
    if part not in ("vae", "text"):
        raise ValueError(f"part={part!r}: use 'vae' or 'text'")
    files = models.component_files(layout, "vae" if part == "vae" else "text_encoder")
    h = hashlib.sha256()
    for f in files:
        h.update(models.file_fingerprint(f).encode())
    return h.hexdigest()[:16]


def _key(material: dict) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:24]


# ------------------------------------------------------------------------------------------ build


@dataclass
class _Expected:
    """Shapes a valid cache file must have for this model and resolution (read from config files)."""

    latents: tuple[int, int, int]
    hidden: int
    target_hw: tuple[int, int]

    @classmethod
    def from_layout(cls, layout: models.KolorsLayout, target_hw: tuple[int, int]) -> _Expected:
        vae_cfg = layout.vae / "config.json"
        if not vae_cfg.exists():
            vae_cfg = layout.root / "vae" / "config.json"
        vae = models.read_json(vae_cfg)
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        if target_hw[0] % factor or target_hw[1] % factor:
            raise ValueError(f"dataset.resolution={list(target_hw)} is not a multiple of the VAE factor {factor}")
        text = models.read_json(layout.text_encoder / "config.json")
        latents = (int(vae.get("latent_channels", 4)), target_hw[0] // factor, target_hw[1] // factor)
        return cls(latents=latents, hidden=int(text["hidden_size"]), target_hw=target_hw)

    def item_problem(self, t: dict[str, torch.Tensor]) -> str | None:
        shapes = {k: tuple(v.shape) for k, v in t.items()}
        want = {
            "latents": self.latents,
            "prompt_embeds": (MAX_SEQUENCE_LENGTH, self.hidden),
            "pooled_prompt_embeds": (self.hidden,),
            "add_time_ids": (6,),
        }
        if shapes != want:
            return f"shapes {shapes} != expected {want}"
        if [int(v) for v in t["add_time_ids"][4:].tolist()] != list(self.target_hw):
            return f"add_time_ids target {t['add_time_ids'][4:].tolist()} != {list(self.target_hw)}"
        return None

    def story_problem(self, t: dict[str, torch.Tensor], n: int) -> str | None:
        if tuple(t["prompt_embeds"].shape) != (n, MAX_SEQUENCE_LENGTH, self.hidden):
            return f"prompt_embeds {tuple(t['prompt_embeds'].shape)} != {(n, MAX_SEQUENCE_LENGTH, self.hidden)}"
        return None


@dataclass
class _Item:
    image: Path
    caption: str
    sha: str
    image_key: str
    text_key: str
    file: Path


def _select(cfg, key: str, default: Any = None) -> Any:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.select(cfg, key, default=default)
    node = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
        if node is None:
            return default
    return node


def _remove_stale_tmp(*folders: Path) -> None:
    """Temp files a killed writer left behind (io.atomic_path names them .<name>.<random>.tmp)."""
    now = time.time()
    for folder in folders:
        for p in folder.glob(".*.tmp"):
            try:
                if now - p.stat().st_mtime > STALE_TMP_SECONDS:
                    p.unlink()
            except OSError:
                pass  # another process finished or removed it


class _Disk:
    """Reads and validates cache files, deleting any that cannot be trusted."""

    def __init__(self, expected: _Expected):
        self.expected = expected
        self.bad: list[str] = []

    def _reject(self, path: Path, reason: str) -> None:
        log.warning("cache: %s is unusable (%s); it will be recomputed", path, reason)
        self.bad.append(f"{path.name}: {reason}")
        try:
            path.unlink()
        except OSError:
            pass

    def item(self, path: Path) -> dict[str, torch.Tensor] | None:
        if not path.is_file():
            return None
        try:
            t = load_cached_item(path)
        except CacheError as e:
            self._reject(path, str(e).split(". Rebuild")[0])
            return None
        problem = self.expected.item_problem(t)
        if problem:
            self._reject(path, problem)
            return None
        return t

    def story(self, path: Path, n: int) -> dict[str, torch.Tensor] | None:
        if not path.is_file():
            return None
        try:
            t = load_story_embeddings(path)
        except CacheError as e:
            self._reject(path, str(e).split(". Rebuild")[0])
            return None
        problem = self.expected.story_problem(t, n)
        if problem:
            self._reject(path, problem)
            return None
        return t


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _bar(total: int, desc: str, unit: str):
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=True)


@torch.no_grad()
def _encode_text(layout, dtype, device, captions: list[str], scenes, batch_size: int):
    """Prompt embeddings of ``captions`` (and the scenes' embeddings) with the pipeline's encode_prompt.

    Only the tokenizer and the text encoder are constructed (no UNet, no VAE); the encoder is
    released before returning.
    """
    from diffusers import KolorsPipeline

    from kolors_story.generation import encode_scenes

    text_encoder = models.load_text_encoder(layout, dtype).to(device)
    # Same construction as models.load_pipeline, minus the parts encode_prompt never touches.
    pipe = KolorsPipeline(
        vae=None, text_encoder=text_encoder, tokenizer=models.load_tokenizer(layout), unet=None,
        scheduler=None, force_zeros_for_empty_prompt=False,
    )
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    story = None
    try:
        if captions:
            with _bar(len(captions), "cache: prompt embeddings", "caption") as bar:
                for start in range(0, len(captions), batch_size):
                    part = captions[start : start + batch_size]
                    embeds, _, pooled, _ = pipe.encode_prompt(
                        prompt=part, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False,
                        max_sequence_length=MAX_SEQUENCE_LENGTH,
                    )
                    if not (torch.isfinite(embeds).all() and torch.isfinite(pooled).all()):
                        raise CacheError(
                            f"The text encoder produced NaN/inf embeddings for captions {part} "
                            f"(model.dtype={dtype}); try model.dtype=float32 or bfloat16."
                        )
                    for i, caption in enumerate(part):
                        out[caption] = (embeds[i].float().cpu().clone(), pooled[i].float().cpu().clone())
                    bar.update(len(part))
        if scenes:
            with _bar(len(scenes), "cache: story prompts", "scene") as bar:
                # One call for all scenes, exactly as generation.generate_story_from_config does.
                story = {k: v.float().cpu().contiguous() for k, v in encode_scenes(pipe, scenes, device=device).items()}
                bar.update(len(scenes))
    finally:
        pipe.text_encoder = None
        del pipe, text_encoder
        _release()
    return out, story


@torch.no_grad()
def _encode_images(layout, dtype, device, todo: list[_Item], target_hw, crop, seed, batch_size: int, on_batch):
    """Latents (posterior mean x scaling_factor) and add_time_ids of each distinct image, handed to
    ``on_batch({image_key: (latents, add_time_ids)})`` batch by batch; the VAE is released after."""
    vae = models.load_vae(layout, dtype).to(device).eval()
    scale = float(vae.config.scaling_factor)
    try:
        with _bar(len(todo), "cache: VAE latents", "img") as bar:
            for start in range(0, len(todo), batch_size):
                part = todo[start : start + batch_size]
                pixels, ids = zip(*(preprocess_image(it.image, target_hw, crop, seed, it.sha) for it in part))
                x = torch.stack(pixels).to(device=device, dtype=vae.dtype)
                latents = (vae.encode(x).latent_dist.mean * scale).float().cpu()
                for i, it in enumerate(part):
                    if not torch.isfinite(latents[i]).all():
                        raise CacheError(
                            f"The VAE produced NaN/inf latents for {it.image} (model.dtype={dtype}). The stock SDXL "
                            "VAE overflows in float16: use the sdxl-vae-fp16-fix (model.vae_path) or model.dtype=float32."
                        )
                on_batch({it.image_key: (latents[i].clone(), torch.tensor(ids[i], dtype=torch.float32))
                          for i, it in enumerate(part)})
                bar.update(len(part))
    finally:
        del vae
        _release()


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def build_cache(cfg, prepared=None, scenes=None) -> TrainingCache:
    """Make sure every training item (and the story, if ``scenes``) has a valid cache file.

    ``cfg`` is the full train config (model, dataset.resolution/crop, trainer.seed, data_dir and
    optionally cache.batch_size); ``prepared`` a ``PreparedDataset`` or the path of a processed
    folder (``<dir>/train/metadata.csv``), default ``cfg.data_dir``. Only what is missing or
    unusable is computed; nothing is loaded when everything is cached.
    """
    model_cfg = cfg.model
    model_path = models.ensure_model(model_cfg)
    vae_path = model_cfg.get("vae_path")
    layout = models.resolve_layout(model_path, vae_path)
    mhash = models.model_hash(model_path, vae_path)
    dtype = models.to_dtype(model_cfg.get("dtype", "float32"))
    dtype_name = str(dtype).removeprefix("torch.")
    device = str(model_cfg.get("device", "cpu"))
    target_hw = target_size(_select(cfg, "dataset.resolution"))
    crop = str(_select(cfg, "dataset.crop", "center"))
    if crop not in CROP_POLICIES:
        raise ValueError(f"dataset.crop={crop!r}: use one of {list(CROP_POLICIES)}")
    seed = int(_select(cfg, "trainer.seed", 0))
    batch_size = int(_select(cfg, "cache.batch_size", DEFAULT_BATCH_SIZE))
    if batch_size < 1:
        raise ValueError(f"cache.batch_size={batch_size}: must be >= 1")
    expected = _Expected.from_layout(layout, target_hw)

    data_dir = _select(cfg, "data_dir")
    pairs, dataset_hash = _dataset_items(prepared, data_dir)
    cache_dir = Path(data_dir) / "cache" if data_dir is not None else Path(pairs[0][0]).parent.parent / "cache"
    items_dir, story_dir = cache_dir / "items", cache_dir / "story"
    items_dir.mkdir(parents=True, exist_ok=True)
    story_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(cache_dir, items_dir, story_dir)

    # Each part is keyed by the component that produces it (VAE -> latents, text encoder ->
    # embeddings), not by the whole model, so swapping one component keeps the other part's cache.
    common = {"v": CACHE_VERSION, "dtype": dtype_name}
    vae_fp, text_fp = component_fingerprint(layout, "vae"), component_fingerprint(layout, "text")
    image_policy = {"size": list(target_hw), "crop": crop, "resample": "lanczos", "vae": vae_fp,
                    **({"seed": seed} if crop == "random" else {})}
    items: list[_Item] = []
    for image, caption in tqdm(pairs, desc="cache: hashing images", unit="img", dynamic_ncols=True):
        sha = file_sha256(image)
        ik = _key({**common, **image_policy, "image": sha})
        tk = _key({**common, "text": caption, "max_len": MAX_SEQUENCE_LENGTH, "text_encoder": text_fp})
        items.append(_Item(image, caption, sha, ik, tk, items_dir / f"{ik}-{tk}.safetensors"))

    disk = _Disk(expected)
    stats = {"items": len(items), "files_reused": 0, "latents_reused": 0, "embeds_reused": 0,
             "latents_computed": 0, "embeds_computed": 0, "story": None, "bad_files": disk.bad}

    # 1. Complete files that are already there and valid.
    targets = {it.file: it for it in items}
    todo: dict[Path, _Item] = {}
    for path, it in tqdm(targets.items(), desc="cache: checking", unit="file", dynamic_ncols=True):
        if disk.item(path) is not None:
            stats["files_reused"] += 1
        else:
            todo[path] = it

    # 2. Parts of missing files that other files carry (same image with another caption, or vice versa).
    latents: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    texts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if todo:
        by_image: dict[str, list[Path]] = {}
        by_text: dict[str, list[Path]] = {}
        for p in items_dir.glob("*.safetensors"):
            ik, _, tk = p.stem.partition("-")
            by_image.setdefault(ik, []).append(p)
            by_text.setdefault(tk, []).append(p)
        for it in todo.values():
            for key, index, store, names in (
                (it.image_key, by_image, latents, ("latents", "add_time_ids")),
                (it.text_key, by_text, texts, ("prompt_embeds", "pooled_prompt_embeds")),
            ):
                for p in index.get(key, []):
                    if key in store:
                        break
                    t = disk.item(p) if p.exists() else None
                    if t is not None:
                        store[key] = (t[names[0]], t[names[1]])
        stats["latents_reused"] = sum(1 for k in {it.image_key for it in todo.values()} if k in latents)
        stats["embeds_reused"] = sum(1 for k in {it.text_key for it in todo.values()} if k in texts)

    # 3. The story's embeddings.
    story_path = None
    story_tensors = None
    scenes = list(scenes) if scenes else []
    if scenes:
        sk = _key({**common, "scenes": [[s.prompt, s.negative] for s in scenes], "max_len": MAX_SEQUENCE_LENGTH,
                   "text_encoder": text_fp})
        story_path = story_dir / f"{sk}.safetensors"
        stats["story"] = "reused" if disk.story(story_path, len(scenes)) is not None else "computed"

    def write_ready() -> None:
        """Write every missing file whose two parts are known (called as parts arrive, so an
        interrupted run keeps what it finished)."""
        for path in [p for p, it in todo.items() if it.image_key in latents and it.text_key in texts]:
            it = todo.pop(path)
            lat, ids = latents[it.image_key]
            emb, pooled = texts[it.text_key]
            meta = {
                "cache_version": str(CACHE_VERSION), "kind": "item", "image_file": it.image.name,
                "image_sha256": it.sha, "caption": it.caption, "resolution": json.dumps(list(target_hw)),
                "crop": crop, "crop_top_left": json.dumps([int(ids[2]), int(ids[3])]), "model_hash": mhash,
                "dtype": dtype_name, "image_key": it.image_key, "text_key": it.text_key,
            }
            _write(path, {"latents": lat, "prompt_embeds": emb, "pooled_prompt_embeds": pooled, "add_time_ids": ids},
                   meta)

    # 4. Text encoder only if some embedding is missing; released before the VAE is loaded.
    need_text = sorted({it.text_key: it.caption for it in todo.values() if it.text_key not in texts}.items())
    if need_text or stats["story"] == "computed":
        encoded, story_tensors = _encode_text(
            layout, dtype, device, [c for _, c in need_text], scenes if stats["story"] == "computed" else None,
            batch_size,
        )
        for tk, caption in need_text:
            texts[tk] = encoded[caption]
        stats["embeds_computed"] = len(need_text)
        del encoded
        if story_tensors is not None:
            _write(story_path, story_tensors, {
                "cache_version": str(CACHE_VERSION), "kind": "story", "model_hash": mhash, "dtype": dtype_name,
                "prompts": json.dumps([s.prompt for s in scenes], ensure_ascii=False),
                "negatives": json.dumps([s.negative for s in scenes], ensure_ascii=False),
            })
    write_ready()

    # 5. VAE only if some latent is missing; files are written batch by batch.
    need_images = list({it.image_key: it for it in todo.values() if it.image_key not in latents}.values())
    if need_images:
        def on_batch(done: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
            latents.update(done)
            write_ready()

        _encode_images(layout, dtype, device, need_images, target_hw, crop, seed, batch_size, on_batch)
        stats["latents_computed"] = len(need_images)
    if todo:  # cannot happen: every part was found or computed
        raise CacheError(f"internal error: {len(todo)} cache file(s) were not written, e.g. {next(iter(todo))}")

    result = TrainingCache(cache_dir=cache_dir, items=[it.file for it in items], story=story_path,
                           model_hash=mhash, stats=stats)
    atomic_write_json(cache_dir / "manifest.json", {
        "model_hash": mhash, "dataset_hash": dataset_hash, "resolution": list(target_hw), "crop": crop,
        "items": [{"image": str(it.image), "caption": it.caption, "file": it.file.name} for it in items],
        "story": story_path.name if story_path else None, "stats": stats,
    })
    log.info(
        "cache: %d items in %s (%d files reused; latents %d reused / %d computed; embeddings %d reused / %d "
        "computed; story %s; %d bad files replaced)", len(items), cache_dir, stats["files_reused"],
        stats["latents_reused"], stats["latents_computed"], stats["embeds_reused"], stats["embeds_computed"],
        stats["story"], len(disk.bad),
    )
    return result
