"""Latent + prompt-embedding cache: what the trainer consumes instead of images and captions.

For every training image the cache holds one ``.safetensors`` file (see ``cache_files``); the
story's scenes get one file with their prompt + negative embeddings.

Design choices (why):
- Prompt embeddings come from the pipeline's own ``encode_prompt`` (``models.prompts``), so a
  cached embedding is exactly what generation computes.
- Latents are the VAE posterior's *mean* times ``vae.config.scaling_factor``: deterministic, so the
  cache is reproducible and its key means something. Sampling from the posterior (as some trainers
  do every step) adds noise of std ~exp(logvar/2), which for the SDXL VAE is tiny next to the
  diffusion noise; the trainer is free to treat the latents as fixed.
- An item file is named ``<image_key>-<text_key>.safetensors``. The image key hashes the image
  bytes, the resize/crop policy (``crop``), the dtype and a sampled fingerprint of the VAE weights;
  the text key hashes the caption, the dtype and a fingerprint of the text encoder + tokenizer
  files (a retrained model of the same shape must not reuse stale entries), and its quantization
  (``model.text_encoder_quant``: int8/nf4 embeddings are never mixed with fp16 ones). A changed caption
  therefore only needs a new text part: its latents are taken from the file that still carries the
  old caption (same image key), and vice versa. Superseded files are left in place (cheap to keep,
  and switching back to an old caption is then free); delete ``<data_dir>/cache`` to reclaim space.
- Writes are atomic (temp + rename), so a killed run leaves either no file or a complete one.
- The text encoder (the largest part of Kolors) is only constructed when some embedding is
  missing, the VAE only when some latent is missing (never the UNet), and both are released
  (del + gc) before ``build_cache`` returns, i.e. before the trainer loads the UNet. Files are
  written as soon as both their parts exist (batch by batch), so an interrupted run keeps its work.
- Embeddings are computed on ``model.device`` in ``model.dtype`` and stored as float32; the key
  includes the dtype but not the device (CPU and GPU kernels may differ in the last bits).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kolors_story.config import ModelSettings
from kolors_story.data.buckets import bucket_for, image_size, make_buckets
from kolors_story.data.cache_batches import (
    ImageJob,
    encode_latents,
    encode_text_batch,
    image_batches,
    text_batches,
)
from kolors_story.data.cache_files import (
    CacheDisk,
    CacheError,
    ExpectedShapes,
    write_cache_file,
)
from kolors_story.data.cache_shards import (
    ShardPlan,
    latents_in_shards,
    shard_devices,
    texts_in_shards,
)
from kolors_story.data.crop import CROP_POLICIES, target_size
from kolors_story.data.processed import dataset_items
from kolors_story.errors import SettingsError
from kolors_story.files import atomic_write_json, file_sha256, remove_stale_tmp
from kolors_story.models.loading import (
    component_fingerprint,
    ensure_model,
    load_vae,
    model_hash,
    resolve_layout,
    to_dtype,
)
from kolors_story.models.prompts import (
    MAX_SEQUENCE_LENGTH,
    encode_scenes,
    text_pipeline,
)
from kolors_story.models.quantization import check_text_encoder_quant
from kolors_story.story import Scene

log = logging.getLogger(__name__)

# Bump when what goes into a cache file changes (preprocessing, encoding): old files stop matching.
CACHE_VERSION = 1


@dataclass
class TrainingCache:
    cache_dir: Path
    items: list[Path]  # one file per training image (its caption as written), metadata.csv order
    story: Path | None  # the scenes' embeddings (None when no scenes were given)
    model_hash: str
    stats: dict = field(default_factory=dict)  # counts of reused / computed parts of this build
    variants: list[list[Path]] | None = None  # dataset.shuffle_tags: per image, one file per tag order
    empty: Path | None = None  # dataset.caption_dropout: the empty caption's embeddings

    @property
    def training_items(self) -> list:
        """What the trainer draws from: per image its file, or its list of caption variants."""
        return self.variants if self.variants is not None else self.items

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class _Item:
    image: Path
    caption: str
    sha: str
    image_key: str
    text_key: str
    file: Path
    target_hw: tuple[int, int] = (0, 0)  # the training size of this image (its bucket, or dataset.resolution)


def _key(material: dict) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:24]


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _bar(total: int, desc: str, unit: str):
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=True)


# ------------------------------------------------------------------------------------------ build


class _CacheBuild:
    """One ``build_cache`` call: which files exist, which parts can be reused, what to encode."""

    def __init__(self, model: ModelSettings, resolution, crop: str, crop_seed: int, batch_size: int, buckets=None,
                 devices: int = 1):
        if crop not in CROP_POLICIES:
            raise SettingsError(f"dataset.crop={crop!r}: use one of {list(CROP_POLICIES)}")
        if batch_size < 1:
            raise SettingsError(f"cache.batch_size={batch_size}: must be >= 1")
        model_path = ensure_model(model)
        self.layout = resolve_layout(model_path, model.vae_path)
        self.mhash = model_hash(model_path, model.vae_path)
        self.dtype = to_dtype(model.dtype)
        self.dtype_name = str(self.dtype).removeprefix("torch.")
        self.device = str(model.device)
        self.quant = model.text_encoder_quant  # ChatGLM3's weights: part of the text key and recorded in each file
        check_text_encoder_quant(self.quant, self.device)
        self.devices = shard_devices(self.device, devices)  # checked before any file is read
        self.shards: ShardPlan | None = None  # cache.devices > 1: set by open()
        self.target_hw = target_size(resolution)
        self.buckets = make_buckets(buckets, self.target_hw)
        self.crop, self.seed, self.batch_size = crop, int(crop_seed), int(batch_size)
        self.disk = CacheDisk(ExpectedShapes.from_layout(self.layout, self.target_hw, self.buckets))
        self.latents: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # image key -> (latents, add_time_ids)
        self.texts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # text key -> (embeds, pooled)
        self.todo: dict[Path, _Item] = {}  # files still to write
        self.stats = {"items": 0, "files_reused": 0, "latents_reused": 0, "embeds_reused": 0,
                      "latents_computed": 0, "embeds_computed": 0, "story": None, "bad_files": self.disk.bad}

    def open(self, cache_dir: Path) -> None:
        """Use ``cache_dir`` (items/ + story/), removing temp files a killed writer left there."""
        self.cache_dir = cache_dir
        self.items_dir, self.story_dir = cache_dir / "items", cache_dir / "story"
        self.items_dir.mkdir(parents=True, exist_ok=True)
        self.story_dir.mkdir(parents=True, exist_ok=True)
        self.parts_dir = cache_dir / "parts"  # cache.devices > 1: the workers' finished batches
        remove_stale_tmp(cache_dir, self.items_dir, self.story_dir, self.parts_dir)
        if len(self.devices) > 1:
            self.shards = ShardPlan(self.layout, self.dtype, self.devices, self.parts_dir, torch.get_num_threads(),
                                    self.quant)

    def plan(self, pairs: list[tuple[Path, str]]) -> list[_Item]:
        """Each item's keys, each part keyed by the component that produces it (VAE -> latents,
        text encoder -> embeddings): swapping one component keeps the other part's cache."""
        common = {"v": CACHE_VERSION, "dtype": self.dtype_name}
        # a quantized encoder's embeddings differ: their own keys (none keeps the keys it always had)
        text_fp = {"text_encoder": component_fingerprint(self.layout, "text"),
                   **({"text_encoder_quant": self.quant} if self.quant != "none" else {})}
        image_policy = {"crop": self.crop, "resample": "lanczos",
                        "vae": component_fingerprint(self.layout, "vae"),
                        **({"seed": self.seed} if self.crop == "random" else {})}
        items = []
        for image, caption in tqdm(pairs, desc="cache: hashing images", unit="img", dynamic_ncols=True):
            sha = file_sha256(image)
            hw = bucket_for(image_size(image), self.buckets) if self.buckets else self.target_hw
            ik = _key({**common, **image_policy, "size": list(hw), "image": sha})
            tk = _key({**common, "text": caption, "max_len": MAX_SEQUENCE_LENGTH, **text_fp})
            items.append(_Item(image, caption, sha, ik, tk, self.items_dir / f"{ik}-{tk}.safetensors", hw))
        self.story_material = {**common, "max_len": MAX_SEQUENCE_LENGTH, **text_fp}
        self.stats["items"] = len(items)
        return items

    def reuse_files(self, items: list[_Item]) -> None:
        """1. Complete files that are already there and valid."""
        for path, it in tqdm({it.file: it for it in items}.items(), desc="cache: checking", unit="file",
                             dynamic_ncols=True):
            if self.disk.item(path) is not None:
                self.stats["files_reused"] += 1
            else:
                self.todo[path] = it

    def reuse_parts(self) -> None:
        """2. Parts of missing files that other files carry (same image, other caption, or vice versa)."""
        if not self.todo:
            return
        by_image: dict[str, list[Path]] = {}
        by_text: dict[str, list[Path]] = {}
        for p in self.items_dir.glob("*.safetensors"):
            ik, _, tk = p.stem.partition("-")
            by_image.setdefault(ik, []).append(p)
            by_text.setdefault(tk, []).append(p)
        for it in self.todo.values():
            for key, index, store, names in (
                (it.image_key, by_image, self.latents, ("latents", "add_time_ids")),
                (it.text_key, by_text, self.texts, ("prompt_embeds", "pooled_prompt_embeds")),
            ):
                for p in index.get(key, []):
                    if key in store:
                        break
                    t = self.disk.item(p) if p.exists() else None
                    if t is not None:
                        store[key] = (t[names[0]], t[names[1]])
        self.stats["latents_reused"] = sum(1 for k in {it.image_key for it in self.todo.values()} if k in self.latents)
        self.stats["embeds_reused"] = sum(1 for k in {it.text_key for it in self.todo.values()} if k in self.texts)

    def empty_file(self) -> Path:
        """The empty caption's embeddings (caption dropout), a file of their own."""
        self.empty_key = _key({**self.story_material, "text": ""})
        path = self.story_dir / f"empty-{self.empty_key}.safetensors"
        self.empty_path = None if self.disk.empty(path) is not None else path  # still to write
        return path

    def story_file(self, scenes: list[Scene]) -> Path:
        """3. Where the story's embeddings live, and whether they are there already."""
        sk = _key({**self.story_material, "scenes": [[s.prompt, s.negative] for s in scenes]})
        path = self.story_dir / f"{sk}.safetensors"
        self.stats["story"] = "reused" if self.disk.story(path, len(scenes)) is not None else "computed"
        return path

    def write_ready(self) -> None:
        """Write every missing file whose two parts are known (called as parts arrive, so an
        interrupted run keeps what it finished)."""
        for path in [p for p, it in self.todo.items() if it.image_key in self.latents and it.text_key in self.texts]:
            it = self.todo.pop(path)
            lat, ids = self.latents[it.image_key]
            emb, pooled = self.texts[it.text_key]
            meta = {
                "cache_version": str(CACHE_VERSION), "kind": "item", "image_file": it.image.name,
                "image_sha256": it.sha, "caption": it.caption, "resolution": json.dumps(list(it.target_hw)),
                "crop": self.crop, "crop_top_left": json.dumps([int(ids[2]), int(ids[3])]), "model_hash": self.mhash,
                "dtype": self.dtype_name, "image_key": it.image_key, "text_key": it.text_key,
                "text_encoder_quant": self.quant,
            }
            write_cache_file(path, {"latents": lat, "prompt_embeds": emb, "pooled_prompt_embeds": pooled,
                                    "add_time_ids": ids}, meta)

    def _story_metadata(self, scenes: list[Scene]) -> dict:
        return {"cache_version": str(CACHE_VERSION), "kind": "story", "model_hash": self.mhash,
                "dtype": self.dtype_name, "text_encoder_quant": self.quant,
                "prompts": json.dumps([s.prompt for s in scenes], ensure_ascii=False),
                "negatives": json.dumps([s.negative for s in scenes], ensure_ascii=False)}

    @torch.no_grad()
    def encode_texts(self, scenes: list[Scene], story_path: Path | None) -> None:
        """4. The text encoder, only if some embedding (or the story) is missing; released after."""
        need = sorted({it.text_key: it.caption for it in self.todo.values() if it.text_key not in self.texts}.items())
        empty_needed = getattr(self, "empty_path", None) is not None
        if empty_needed and self.empty_key not in self.texts and self.empty_key not in dict(need):
            need.append((self.empty_key, ""))
        story_needed = story_path is not None and self.stats["story"] == "computed"
        story = (scenes, story_path, self._story_metadata(scenes)) if story_needed else None
        batches = text_batches(need, self.batch_size)
        if batches or story:
            with _bar(len(need), self._desc("cache: prompt embeddings"), "caption") as bar:
                for embeds in self._text_results(batches, story):
                    self.texts.update(embeds)
                    bar.update(len(embeds))
            self.stats["embeds_computed"] = len(need)
        if empty_needed:
            emb, pooled = self.texts[self.empty_key]
            write_cache_file(self.empty_path, {"prompt_embeds": emb, "pooled_prompt_embeds": pooled},
                             {"cache_version": str(CACHE_VERSION), "kind": "empty", "model_hash": self.mhash,
                              "dtype": self.dtype_name, "text_encoder_quant": self.quant})
        self.write_ready()

    def _desc(self, what: str) -> str:
        return f"{what} ({len(self.shards.devices)} processes)" if self.shards else what

    def _text_results(self, batches: list, story) -> Iterator[dict]:
        """Each caption batch's embeddings; the story's file is written on the way."""
        if self.shards and len(batches) + bool(story) > 1:
            yield from texts_in_shards(self.shards, batches, story)
            return
        pipe = text_pipeline(self.layout, self.dtype, self.device, self.quant)
        try:
            for batch in batches:
                yield encode_text_batch(pipe, batch, self.device, self.dtype)
            if story:
                scenes, path, metadata = story
                # One call for all scenes, exactly as generation encodes them.
                encoded = encode_scenes(pipe, scenes, self.device)
                write_cache_file(path, {k: v.float().cpu().contiguous() for k, v in encoded.items()}, metadata)
        finally:
            pipe.text_encoder = None
            del pipe
            _release()

    @torch.no_grad()
    def encode_images(self) -> None:
        """5. The VAE, only if some latent is missing; files are written batch by batch."""
        todo = {it.image_key: it for it in self.todo.values() if it.image_key not in self.latents}.values()
        jobs = [ImageJob(it.image, it.target_hw, it.sha, it.image_key) for it in todo]
        if not jobs:
            return
        with _bar(len(jobs), self._desc("cache: VAE latents"), "img") as bar:
            for latents in self._image_results(image_batches(jobs, self.batch_size)):
                self.latents.update(latents)
                bar.update(len(latents))
                self.write_ready()
        self.stats["latents_computed"] = len(jobs)

    def _image_results(self, batches: list[list[ImageJob]]) -> Iterator[dict]:
        if self.shards and len(batches) > 1:
            yield from latents_in_shards(self.shards, batches, self.crop, self.seed)
            return
        vae = load_vae(self.layout, self.dtype).to(self.device).eval()
        scale = float(vae.config.scaling_factor)
        try:
            for batch in batches:
                yield encode_latents(vae, scale, batch, self.crop, self.seed, self.device)
        finally:
            del vae
            _release()


def build_cache(model: ModelSettings, prepared, *, data_dir: str | Path | None = None, resolution=None,
                crop: str = "center", crop_seed: int = 0, batch_size: int = 4,
                scenes: list[Scene] | None = None, variants=None, empty_caption: bool = False,
                buckets=None, devices: int = 1) -> TrainingCache:
    """Make sure every training item (and the story, if ``scenes``) has a valid cache file.

    ``prepared`` is a ``PreparedDataset`` or a processed folder (``<dir>/train/metadata.csv``);
    the cache goes to ``<data_dir>/cache`` (default: beside the processed ``train/``).
    ``resolution`` (default ``model.resolution``), ``crop`` and ``crop_seed`` decide the pixels;
    ``batch_size`` images/captions go through the VAE/text encoder at a time. Only what is missing
    or unusable is computed; nothing is loaded when everything is cached. ``variants(caption)``
    gives the caption orders to cache per image (tag shuffling; the first is the caption as
    written); ``empty_caption`` caches the empty caption's embeddings (caption dropout);
    ``buckets`` (``dataset.buckets``: null, auto or [[h, w], ...]) gives each image its own size.
    ``devices`` > 1 (``cache.devices``) spreads the batches over that many processes (one GPU
    each, or CPU processes): the same files, byte for byte (``cache_shards``).
    """
    # 1. Settings and model checked before any file is read; 2. the dataset; 3. what is there.
    build = _CacheBuild(model, model.resolution if resolution is None else resolution, crop, crop_seed, batch_size,
                        buckets, devices)
    pairs, dataset_hash = dataset_items(prepared)
    cache_dir = Path(data_dir) / "cache" if data_dir is not None else Path(pairs[0][0]).parent.parent / "cache"
    build.open(cache_dir)
    orders = [variants(c) if variants else [c] for _, c in pairs]
    items = build.plan([(image, text) for (image, _), texts in zip(pairs, orders) for text in texts])
    build.reuse_files(items)
    build.reuse_parts()
    scenes = list(scenes or [])
    story_path = build.story_file(scenes) if scenes else None
    empty = build.empty_file() if empty_caption else None
    build.write_ready()
    build.encode_texts(scenes, story_path)
    build.encode_images()
    if build.todo:  # cannot happen: every part was found or computed
        raise CacheError(f"internal error: {len(build.todo)} cache file(s) were not written, e.g. {next(iter(build.todo))}")
    shutil.rmtree(build.parts_dir, ignore_errors=True)  # every part is in an item file now
    stats = build.stats
    atomic_write_json(cache_dir / "manifest.json", {
        "model_hash": build.mhash, "dataset_hash": dataset_hash, "resolution": list(build.target_hw), "crop": crop,
        "text_encoder_quant": build.quant,
        "buckets": [list(b) for b in build.buckets] if build.buckets else None,
        "items": [{"image": str(it.image), "caption": it.caption, "file": it.file.name} for it in items],
        "story": story_path.name if story_path else None, "stats": stats,
    })
    log.info(
        "cache: %d items in %s (%d files reused; latents %d reused / %d computed; embeddings %d reused / %d "
        "computed; story %s; %d bad files replaced)", len(items), cache_dir, stats["files_reused"],
        stats["latents_reused"], stats["latents_computed"], stats["embeds_reused"], stats["embeds_computed"],
        stats["story"], len(build.disk.bad),
    )
    groups, start = [], 0
    for texts in orders:
        groups.append([it.file for it in items[start : start + len(texts)]])
        start += len(texts)
    return TrainingCache(cache_dir=cache_dir, items=[g[0] for g in groups], story=story_path, model_hash=build.mhash,
                         stats=stats, variants=groups if variants else None, empty=empty)
