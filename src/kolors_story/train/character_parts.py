"""The pieces of the character LoRA loop (``train.character``): the character's prompts and their
embeddings, choosing the tightest cluster of renders, the training items made from it, the round
sheets, the settings check, and stacking the finished LoRA beside the style LoRA for a render.

Choosing the cluster (why this way):
- The renders' CLIP image embeddings (the aesthetic scorer's tower) are clustered by average
  linkage on cosine distance (scipy), after removing each phrasing's mean embedding: what is left
  is what the seed changed (the character's look), not what the phrasing fixed (pose, background).
  Average linkage is deterministic, unlike k-means' random starts.
- A cluster's similarity is the mean cosine of the plain embeddings over pairs rendered from
  *different* phrasings. Two renders of one phrasing can look alike through their shared pose and
  background alone; two renders of different phrasings look alike through the character.
- But two phrasings can share a background too (a white and a light grey one), and then any renders
  of those two look alike. So the choice ranks clusters by their *excess* similarity: each pair's
  cosine minus the mean cosine of all renders of the same two phrasings. A random group scores about
  0 whichever phrasings it holds; a group that shares a look scores above it. (Ranked by the plain
  similarity, a random group of renders was tighter than the chosen cluster on a tiny probe.)
- Every cluster of the tree (at every cut, from one cluster to one per render) is a candidate: the
  one of at least ``min_cluster`` renders (spanning two phrasings, when there are several) with the
  highest excess similarity wins. Not one cut at ``candidates // min_cluster`` clusters, as The
  Chosen One cuts k-means: average linkage splits off small clusters first, and at that cut the only
  cluster large enough can be looser than a random group of renders.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from kolors_story import tiny
from kolors_story.config import TrainSettings
from kolors_story.errors import SettingsError, TrainingError
from kolors_story.evaluate.scorer import check_scorer_folder
from kolors_story.generate.panel import FRAME, labelled_rows
from kolors_story.generate.sampler import check_sampler, check_size_for
from kolors_story.lora import load_lora_into_pipeline, lora_scales, set_lora_scales
from kolors_story.models.loading import ensure_model, model_configs, resolve_layout, to_dtype
from kolors_story.models.prompts import check_prompt_tokens, encode_scenes, text_pipeline
from kolors_story.story import Scene

CHARACTER_ADAPTER = "character"  # the peft adapter name of the character LoRA beside the style LoRA
CLUSTER_CHOICES = ("tightest", "random")  # character.cluster: the loop, or its control
CONTROL_NOTE = " picked at random (the control)"  # said after "N of M renders" of a control round
SLOT = "{character}"  # where a phrasing names the character


def _pick(value, language: str, key: str) -> str:
    """A text, or a {zh, en} mapping read in the story's language."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if language not in value:
        raise SettingsError(f"{key} has no '{language}' text (has: {sorted(value)}); set story.language to one of those")
    return str(value[language])


def character_text(job: TrainSettings) -> str:
    """How the phrasings name the character: ``character.prompt``, else ``story.character``."""
    language = str(job.story.language)
    text = _pick(job.character.prompt, language, "character.prompt").strip()
    text = text or _pick(job.story.character, language, "story.character").strip()
    if not text:
        raise SettingsError("character=auto needs the character's description: set story.character (the story "
                            "names its heroine there) or character.prompt")
    return text


def phrasing_scenes(job: TrainSettings) -> list[Scene]:
    """One scene per phrasing, the character put in; their embeddings render the candidates and train the LoRA."""
    c, language, text = job.character, str(job.story.language), character_text(job)
    negative = _pick(c.negative, language, "character.negative")
    scenes = []
    for i, raw in enumerate(c.phrasings):
        phrasing = _pick(raw, language, f"character.phrasings[{i}]")
        if SLOT not in phrasing:
            raise SettingsError(f"character.phrasings[{i}]={phrasing!r} does not name the character: put {SLOT} in it")
        scenes.append(Scene(index=i + 1, description=f"phrasing {i + 1}", prompt=phrasing.replace(SLOT, text),
                            negative=negative, seed=0))
    if not scenes:
        raise SettingsError("character.phrasings is empty: give at least one prompt with {character} in it")
    return scenes


def _whole(key: str, value, least: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise SettingsError(f"{key}={value!r}: must be a whole number >= {least}")
    return value


def check_character(job: TrainSettings) -> None:
    """``character.*`` and what the loop renders with (sampler, scorer, the phrasings' tokens),
    before any data or model work: a one-line SettingsError naming the key."""
    c = job.character
    if not c.enabled:
        return
    _whole("character.rounds", c.rounds)
    _whole("character.steps", c.steps)
    _whole("character.batch_size", c.batch_size)
    _whole("character.min_cluster", c.min_cluster, 2)
    if c.cluster not in CLUSTER_CHOICES:
        raise SettingsError(f"character.cluster={c.cluster!r}: use tightest (the loop) or random (a control that "
                            "trains on as many renders picked at random)")
    if _whole("character.candidates", c.candidates) < c.min_cluster:
        raise SettingsError(f"character.candidates={c.candidates} is below character.min_cluster={c.min_cluster}: "
                            "render at least as many candidates as the cluster needs")
    for key in ("lr", "alpha"):
        if not (np.isfinite(getattr(c, key)) and getattr(c, key) > 0):
            raise SettingsError(f"character.{key}={getattr(c, key)}: must be a number > 0")
    _whole("character.rank", c.rank)
    if not (np.isfinite(c.scale) and c.scale >= 0) or not np.isfinite(c.min_gain):
        raise SettingsError(f"character.scale={c.scale}, character.min_gain={c.min_gain}: give finite numbers, scale >= 0")
    scenes = phrasing_scenes(job)
    check_sampler(job.sampler)
    configs = model_configs(job.model)
    check_size_for(configs["unet"], configs["vae"], job.sampler)
    if not tiny.provides(job.scorer):  # the candidates are embedded with the scorer's CLIP tower
        check_scorer_folder(job.scorer.path)
    check_prompt_tokens(resolve_layout(ensure_model(job.model), job.model.vae_path), scenes)


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def encode_phrasings(job: TrainSettings, scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """The phrasings' prompt + negative embeddings (float32, CPU), by the text encoder alone, which
    is released before anything else loads (as the cache does)."""
    layout = resolve_layout(ensure_model(job.model), job.model.vae_path)
    device = str(job.model.device)
    pipe = text_pipeline(layout, to_dtype(job.model.dtype), device, job.model.text_encoder_quant)
    try:
        embeds = encode_scenes(pipe, scenes, device)
        return {k: v.float().cpu() for k, v in embeds.items()}
    finally:
        pipe.text_encoder = None
        del pipe
        release()


# ------------------------------------------------------------------------------ the cluster


@dataclass
class Cluster:
    members: list[int]  # indices of the chosen renders
    similarity: float  # their mean cosine over pairs of different phrasings
    clusters: int  # how many clusters the renders were split into
    excess: float  # that cosine above the mean of all renders of the same phrasings (what the choice maximises)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)


def pair_similarity(embeddings, labels, members=None) -> float:
    """Mean cosine of ``members`` (default: all) over pairs of different phrasings (``labels``);
    over all pairs when they share one phrasing."""
    e = _unit(np.asarray(embeddings, dtype=np.float64))
    idx = np.arange(len(e)) if members is None else np.asarray(members)
    lab = np.asarray(labels)[idx]
    sim = e[idx] @ e[idx].T
    mask = lab[:, None] != lab[None, :]
    if not mask.any():
        mask = ~np.eye(len(idx), dtype=bool)
    return float(sim[mask].mean()) if mask.any() else 1.0


def excess_similarity(embeddings, labels, members) -> float:
    """How much more alike ``members`` are than renders of their phrasings in general: the mean, over
    their pairs of different phrasings (all pairs when they share one), of the pair's cosine minus the
    mean cosine of every pair of renders of the same two phrasings."""
    e = _unit(np.asarray(embeddings, dtype=np.float64))
    _, lab = np.unique(np.asarray(labels), return_inverse=True)
    sim = e @ e.T
    other = ~np.eye(len(e), dtype=bool)  # a render is not paired with itself
    onehot = np.eye(lab.max() + 1)[lab]  # [renders, phrasings]
    base = (onehot.T @ (sim * other) @ onehot) / np.maximum(onehot.T @ other @ onehot, 1)  # [phrasing, phrasing]
    idx = np.asarray(members)
    excess = sim[np.ix_(idx, idx)] - base[np.ix_(lab[idx], lab[idx])]
    mask = lab[idx][:, None] != lab[idx][None, :]
    if not mask.any():
        mask = ~np.eye(len(idx), dtype=bool)
    return float(excess[mask].mean()) if mask.any() else 0.0


def choose_cluster(embeddings, labels, min_size: int) -> Cluster:
    """The tightest cluster of at least ``min_size`` renders (see the module docstring)."""
    from scipy.cluster.hierarchy import fcluster, linkage

    e = _unit(np.asarray(embeddings, dtype=np.float64))
    labels = np.asarray(labels)
    residual = e.copy()
    for label in np.unique(labels):  # what the phrasing fixed is removed; what the seed changed is left
        residual[labels == label] -= residual[labels == label].mean(0)
    tree = linkage(_unit(residual + 1e-9), method="average", metric="cosine")
    big: dict[tuple[int, ...], int] = {}  # each cluster of the tree that is large enough, and the first cut with it
    for k in range(1, len(e) + 1):
        groups = fcluster(tree, k, criterion="maxclust")
        for g in np.unique(groups):
            members = tuple(np.flatnonzero(groups == g).tolist())
            if len(members) >= min_size:
                big.setdefault(members, k)
    if not big:
        raise TrainingError(f"no cluster of {min_size} renders among {len(e)}: lower character.min_cluster")
    mixed = [m for m in big if len(np.unique(labels[list(m)])) > 1] if len(np.unique(labels)) > 1 else []
    excess, members = max((excess_similarity(e, labels, list(m)), m) for m in (mixed or big))
    return Cluster(members=list(members), similarity=pair_similarity(e, labels, list(members)), clusters=big[members],
                   excess=excess)


def random_group(embeddings, labels, size: int, seed) -> Cluster:
    """``size`` renders picked at random (``character.cluster=random``): the control that shows what
    choosing the tightest cluster adds over training on any of the loop's renders."""
    members = sorted(np.random.default_rng(seed).choice(len(labels), size, replace=False).tolist())
    return Cluster(members=members, similarity=pair_similarity(embeddings, labels, members), clusters=0,
                   excess=excess_similarity(embeddings, labels, members))


# ------------------------------------------------------------------------------ items and sheets


@torch.no_grad()
def training_items(vae, images: list[Image.Image], labels: list[int], embeds: dict[str, torch.Tensor],
                   members: list[int], batch_size: int) -> list[dict]:
    """The chosen renders as the trainer's items (the cache's keys): VAE posterior mean latents
    and the embeddings of the phrasing each was rendered from."""
    pixels = [torch.from_numpy(np.array(images[m].convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1 for m in members]
    latents = []
    for start in range(0, len(pixels), batch_size):
        x = torch.stack(pixels[start : start + batch_size]).to(device=vae.device, dtype=vae.dtype)
        latents.append((vae.encode(x).latent_dist.mean * vae.config.scaling_factor).float().cpu())
    latents = torch.cat(latents)
    if not torch.isfinite(latents).all():
        raise TrainingError(f"the VAE produced NaN/inf latents for the character's renders (vae dtype {vae.dtype}); "
                            "use the sdxl-vae-fp16-fix (model.vae_path) or model.dtype=float32")
    h, w = images[members[0]].height, images[members[0]].width
    ids = torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32)  # micro-conditioning: uncropped, at render size
    return [{"latents": latents[i].clone(), "prompt_embeds": embeds["prompt_embeds"][labels[m]].clone(),
             "pooled_prompt_embeds": embeds["pooled_prompt_embeds"][labels[m]].clone(), "add_time_ids": ids.clone()}
            for i, m in enumerate(members)]


def _framed(image: Image.Image, tile: int) -> Image.Image:
    inner = image.convert("RGB").resize((tile - 8, tile - 8), Image.Resampling.LANCZOS)
    return ImageOps.expand(inner, border=4, fill=FRAME)


def candidates_sheet(images: list[Image.Image], labels: list[int], chosen: list[int], title: str | None,
                     tile: int = 96, per_row: int = 16) -> Image.Image:
    """Every render of the round, one row (or more) per phrasing, the chosen cluster framed."""
    rows = []
    for p in sorted(set(labels)):
        idx = [i for i, label in enumerate(labels) if label == p]
        for start in range(0, len(idx), per_row):
            part = idx[start : start + per_row]
            shown = [_framed(images[i], tile) if i in chosen else images[i] for i in part]
            rows.append((f"phrasing {p + 1}: renders {part[0] + 1}..{part[-1] + 1} (framed: chosen)", shown))
    return labelled_rows(rows, tile, title)


def cluster_sheet(images: list[Image.Image], chosen: list[int], label: str, title: str | None,
                  tile: int = 96, per_row: int = 16) -> Image.Image:
    rows = [(label if start == 0 else "", [images[i] for i in chosen[start : start + per_row]])
            for start in range(0, len(chosen), per_row)]
    return labelled_rows(rows, tile, title)


# ------------------------------------------------------------------------------ stacking


def _adapters_off(unet) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(m.disable_adapters for m in unet.modules() if isinstance(m, BaseTunerLayer))


@contextmanager
def stacked_lora(pipe, path: Path | None, scale: float) -> Iterator[None]:
    """``path`` beside the UNet's adapters at ``scale`` while the block runs (a validation render),
    then removed: the other adapters, their strengths and which parameters train are as before.
    Nothing is stacked at scale 0, nor while the adapters are off (before_after's base row)."""
    unet = pipe.unet
    if path is None or not float(scale) or not getattr(unet, "peft_config", None) or _adapters_off(unet):
        yield
        return
    previous = lora_scales(unet)
    trains = {name: p.requires_grad for name, p in unet.named_parameters()}
    load_lora_into_pipeline(pipe, path, scale=float(scale), adapter_name=CHARACTER_ADAPTER)
    try:
        yield
    finally:
        unet.delete_adapters(CHARACTER_ADAPTER)
        set_lora_scales(unet, previous)
        for name, p in unet.named_parameters():
            p.requires_grad_(trains.get(name, False))
