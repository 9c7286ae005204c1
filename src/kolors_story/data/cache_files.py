"""The cache's files: what a valid one holds, reading it back, and writing one atomically.

An item file holds ``latents`` [4, H/8, W/8], ``prompt_embeds`` [256, D], ``pooled_prompt_embeds``
[D] and ``add_time_ids`` [6] (float32); the story file holds the scenes' prompt + negative
embeddings (``models.prompts.STORY_KEYS``). Nothing on disk is trusted: a file that fails to load,
lacks a key, has a wrong shape or dtype or holds NaN/inf is reported (training) or deleted and
recomputed (the cache build).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors_bytes

from kolors_story.errors import SettingsError, UserError
from kolors_story.files import atomic_path, save_safetensors
from kolors_story.models.loading import KolorsLayout, read_json
from kolors_story.models.prompts import MAX_SEQUENCE_LENGTH, STORY_KEYS

log = logging.getLogger(__name__)

ITEM_KEYS = ("latents", "prompt_embeds", "pooled_prompt_embeds", "add_time_ids")
REBUILD_HINT = "Rebuild it with `python train.py stage=data` (bad cache files are recomputed)."


class CacheError(UserError, RuntimeError):
    """A cache file or the dataset feeding the cache is unusable; the message names it."""


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
    """The scenes' embeddings, same keys and shapes as ``models.prompts.encode_scenes`` returns."""
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


EMPTY_KEYS = ("prompt_embeds", "pooled_prompt_embeds")


def load_empty_prompt(path: str | Path) -> dict[str, torch.Tensor]:
    """The empty caption's embeddings (caption dropout): ``prompt_embeds`` [L, D], ``pooled_prompt_embeds`` [D]."""
    return _load(path, EMPTY_KEYS)


def read_cache_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a cache file's header (caption, image hash, crop, model hash ...)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


@dataclass
class ExpectedShapes:
    """Shapes a valid cache file must have for this model and resolution (read from config files)."""

    latents: tuple[int, int, int]
    hidden: int
    target_hw: tuple[int, int]
    factor: int = 8  # image pixels per latent pixel
    buckets: tuple[tuple[int, int], ...] | None = None  # dataset.buckets: the sizes an item may have

    @classmethod
    def from_layout(cls, layout: KolorsLayout, target_hw: tuple[int, int], buckets=None) -> ExpectedShapes:
        vae_cfg = layout.vae / "config.json"
        if not vae_cfg.exists():
            vae_cfg = layout.root / "vae" / "config.json"
        vae = read_json(vae_cfg)
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        if target_hw[0] % factor or target_hw[1] % factor:
            raise SettingsError(f"dataset.resolution={list(target_hw)} is not a multiple of the VAE factor {factor}")
        text = read_json(layout.text_encoder / "config.json")
        latents = (int(vae.get("latent_channels", 4)), target_hw[0] // factor, target_hw[1] // factor)
        bad = [list(b) for b in (buckets or []) if b[0] % factor or b[1] % factor]
        if bad:
            raise SettingsError(f"dataset.buckets {bad} are not multiples of the VAE factor {factor}")
        return cls(latents=latents, hidden=int(text["hidden_size"]), target_hw=target_hw, factor=factor,
                   buckets=tuple(tuple(b) for b in buckets) if buckets else None)

    def item_problem(self, t: dict[str, torch.Tensor]) -> str | None:
        shapes = {k: tuple(v.shape) for k, v in t.items()}
        target = tuple(int(v) for v in t["add_time_ids"][4:].tolist()) if "add_time_ids" in t else self.target_hw
        if self.buckets is not None and target not in self.buckets:
            return f"size {list(target)} is not one of the buckets"
        size = target if self.buckets is not None else self.target_hw
        want = {
            "latents": (self.latents[0], size[0] // self.factor, size[1] // self.factor),
            "prompt_embeds": (MAX_SEQUENCE_LENGTH, self.hidden),
            "pooled_prompt_embeds": (self.hidden,),
            "add_time_ids": (6,),
        }
        if shapes != want:
            return f"shapes {shapes} != expected {want}"
        if list(target) != list(size):
            return f"add_time_ids target {list(target)} != {list(size)}"
        return None

    def empty_problem(self, t: dict[str, torch.Tensor]) -> str | None:
        want = {"prompt_embeds": (MAX_SEQUENCE_LENGTH, self.hidden), "pooled_prompt_embeds": (self.hidden,)}
        shapes = {k: tuple(v.shape) for k, v in t.items()}
        return None if shapes == want else f"shapes {shapes} != expected {want}"

    def story_problem(self, t: dict[str, torch.Tensor], n: int) -> str | None:
        if tuple(t["prompt_embeds"].shape) != (n, MAX_SEQUENCE_LENGTH, self.hidden):
            return f"prompt_embeds {tuple(t['prompt_embeds'].shape)} != {(n, MAX_SEQUENCE_LENGTH, self.hidden)}"
        return None


class CacheDisk:
    """Reads and validates cache files, deleting any that cannot be trusted."""

    def __init__(self, expected: ExpectedShapes):
        self.expected = expected
        self.bad: list[str] = []

    def _reject(self, path: Path, reason: str) -> None:
        log.warning("cache: %s is unusable (%s); it will be recomputed", path, reason)
        self.bad.append(f"{path.name}: {reason}")
        try:
            path.unlink()
        except OSError:
            pass

    def _checked(self, path: Path, load, problem_of) -> dict[str, torch.Tensor] | None:
        """The file's tensors if it exists, loads and fits; otherwise None (a bad file is deleted)."""
        if not path.is_file():
            return None
        try:
            t = load(path)
        except CacheError as e:
            self._reject(path, str(e).split(". Rebuild")[0])
            return None
        problem = problem_of(t)
        if problem:
            self._reject(path, problem)
            return None
        return t

    def item(self, path: Path) -> dict[str, torch.Tensor] | None:
        return self._checked(path, load_cached_item, self.expected.item_problem)

    def empty(self, path: Path) -> dict[str, torch.Tensor] | None:
        return self._checked(path, load_empty_prompt, self.expected.empty_problem)

    def story(self, path: Path, n: int) -> dict[str, torch.Tensor] | None:
        return self._checked(path, load_story_embeddings, lambda t: self.expected.story_problem(t, n))


def write_cache_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_safetensors(tensors, tmp, metadata)
