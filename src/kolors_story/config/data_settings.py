"""The ``dataset``, ``filter`` and ``cache`` keys: where the images come from and how they are cleaned and cached.

Every key with its type, default and a one-line comment (see :mod:`kolors_story.config`)."""

# No ``from __future__ import annotations`` here: OmegaConf reads these annotations at runtime.
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import II, MISSING


@dataclass
class DatasetSettings:
    name: str = MISSING  # dataset name: the processed data goes to data/<name>
    source: str = "folder"  # folder | lowres_anime | demo
    path: str = "data/my_style"  # the folder of images (not searched recursively; metadata rows may name sub-folders)
    caption_prefix: str = ""  # fixed text put before every caption (trigger words, e.g. "二次元，")
    default_caption: Optional[str] = None  # caption for images without one (null: a missing caption is reported as a bad file)
    on_bad_file: str = "skip"  # skip: drop bad files and list them in report.json; fail: stop with the list
    max_pixels: Optional[int] = 100_000_000  # decompression-bomb guard: images declaring more pixels are rejected unread
    workers: int = 1  # preflight processes (decode + stage in parallel; same files, reasons and order as 1)
    allow_outside: bool = False  # false: files resolving outside `path` (../x, /abs, links out) are rejected unread
    rebuild: bool = False  # true: redo preflight + filtering even when sources, captions and recipe are unchanged
    resolution: Any = II("model.resolution")  # training size: an int (square) or [height, width]; resized to cover it, then cropped
    crop: str = "center"  # center or random (a random crop is drawn once per image from trainer.seed and cached)
    buckets: Optional[Any] = None  # aspect-ratio buckets: null (every image cropped to resolution), auto (~resolution² pixels, 1:2..2:1, sides x64) or [[h, w], ...]
    caption_dropout: float = 0.0  # share of samples trained with the empty caption (helps CFG; 0.05-0.1 is common); 0 -> off
    shuffle_tags: bool = False  # train on reordered comma-separated tags (caption_prefix and keep_tokens stay first)
    keep_tokens: int = 0  # shuffle_tags: tags after caption_prefix that keep their place
    shuffle_variants: int = 4  # shuffle_tags: tag orders cached per caption (the caption as written is one of them)
    captioner: str = "none"  # write captions with a vision-language model: none, qwen2_vl (Qwen2-VL-2B, small) or qwen2_5_vl (Qwen2.5-VL-7B, strong)
    caption_mode: str = "missing"  # missing (only images without a caption), replace (every caption) or append (after the existing one)
    caption_language: str = "zh"  # zh or en: the language the captioner writes (Kolors reads both)
    captioner_path: Optional[str] = None  # the captioner's folder; null -> models/<its release name> (python -m kolors_story.download captioner)
    captioner_device: str = II("model.device")  # device the captioner runs on (released before the cache is built)
    captioner_dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16 or float32
    captioner_batch_size: int = 4  # images per generate call
    captioner_max_tokens: int = 96  # longest generated caption, in tokens (Kolors reads 256 prompt tokens)
    captioner_tiny: bool = False  # build a tiny random captioner of the same class into captioner_path first (plumbing tests only)


@dataclass
class DemoDatasetSettings(DatasetSettings):
    source: str = "demo"  # drawn by code (kolors_story.tiny.demo)
    seed: int = 0  # drawing seed: same seed -> same images, bit for bit


@dataclass
class ModelScopeDatasetSettings(DatasetSettings):
    source: str = "lowres_anime"  # the baseline's ModelScope dataset
    repo: str = "AI-ModelScope/lowres_anime"  # ModelScope dataset id, loaded with MsDataset.load
    subset: str = "default"  # MsDataset subset_name
    split: str = "train"  # MsDataset split
    limit: Optional[int] = None  # take only the first N images (null: all)
    caption: Optional[str] = "二次元"  # caption of every image (the baseline's); null: use the dataset's own text column


# dataset.source -> the schema of that source's keys
DATASET_SCHEMAS = {"folder": DatasetSettings, "demo": DemoDatasetSettings, "lowres_anime": ModelScopeDatasetSettings}


@dataclass
class FilterSettings:
    name: str = MISSING  # recipe name, recorded in report.json
    process: List[Any] = field(default_factory=list)  # data-juicer ops, passed to dj-process as they are (batch_size 1 is added per op)
    np: int = 1  # dj-process worker processes (1 is fastest for a few hundred images)
    executor: str = "default"  # default (data-juicer's own executor, np processes) or ray (its Ray executor, for large sets)
    ray_address: Optional[str] = None  # executor=ray: null -> a Ray instance started for the run (and stopped with it); auto or <host:port> -> that cluster
    timeout: Optional[float] = None  # seconds before dj-process is stopped (null: no limit)
    min_aesthetic: Optional[float] = None  # drop images the competition's aesthetic predictor scores below this (e.g. 5.0); null -> off
    dedup: bool = False  # drop near-duplicates (perceptual hash), keeping the best-scored / largest of each group
    dedup_distance: int = 6  # pHash Hamming distance (of 64 bits) at or below which two images are near-duplicates


@dataclass
class CacheSettings:
    batch_size: int = 4  # images / captions per VAE / text-encoder call when building the latent/embedding cache
    devices: Optional[int] = None  # processes building the cache, one GPU each on CUDA (same files as 1); null -> trainer.devices on CUDA, 1 on CPU


# dataset.source -> the schema of that source's keys
DATASET_SCHEMAS = {"folder": DatasetSettings, "demo": DemoDatasetSettings, "lowres_anime": ModelScopeDatasetSettings}
