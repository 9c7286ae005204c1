"""``cache.devices`` > 1: the cache's batches spread over N processes, one GPU each (CUDA) or N
CPU processes, with a result byte-identical to the one-process build.

Why it is identical:
- the parent cuts the batches exactly as the one-process build does (``cache_batches``) and a
  batch's result does not depend on the process that computes it;
- CPU workers use the parent's thread count (CPU kernels split reductions by thread count, which
  changes the last bits).
Each worker writes one part file per batch atomically (``<cache>/parts/<kind>-<hash of the batch's
keys>.safetensors``); the parent reads the parts and writes the item files as in the one-process
build, then deletes the parts. A killed build keeps its finished parts and reuses them next time.
The text phase and the image phase use separate pools, so a GPU never holds the text encoder and
the VAE at once (as in the one-process build, and as the memory plan assumes).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from kolors_story.data.cache_batches import ImageJob, encode_latents, encode_text_batch
from kolors_story.data.cache_files import CacheError, write_cache_file
from kolors_story.errors import SettingsError, UserError
from kolors_story.models.loading import KolorsLayout, load_vae
from kolors_story.models.prompts import encode_scenes, text_pipeline

TEXT_NAMES = ("prompt_embeds", "pooled_prompt_embeds")
IMAGE_NAMES = ("latents", "add_time_ids")


def shard_devices(device: str, count: int) -> list[str]:
    """The device of each of ``count`` processes: cuda:0..N-1 for a CUDA model, else N x cpu."""
    if int(count) < 1:
        raise SettingsError(f"cache.devices={count}: use 1 (this process) or more processes")
    device = str(device)
    if count == 1:
        return [device]
    if device.startswith("cuda"):
        visible = torch.cuda.device_count()
        if visible < count:
            raise SettingsError(f"cache.devices={count} but only {visible} CUDA device(s) are visible; "
                                f"use cache.devices<={visible}")
        return [f"cuda:{i}" for i in range(count)]
    if device != "cpu":
        raise SettingsError(f"cache.devices={count} needs model.device=cuda or cpu (got {device!r}); use cache.devices=1")
    return ["cpu"] * count


@dataclass(frozen=True)
class ShardPlan:
    """What every worker needs to load its model part."""

    layout: KolorsLayout
    dtype: torch.dtype
    devices: list[str]
    parts_dir: Path
    threads: int  # the parent's torch thread count (CPU results depend on it)
    text_encoder_quant: str = "none"  # model.text_encoder_quant: ChatGLM3's weights


def part_path(plan: ShardPlan, kind: str, keys: list[str]) -> Path:
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:24]
    return plan.parts_dir / f"{kind}-{digest}.safetensors"


def read_part(path: Path, keys: list[str], names: tuple[str, str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """A finished part's tensors by key, or None if it is missing or incomplete (then recomputed)."""
    from safetensors.torch import load as load_bytes

    if not path.is_file():
        return None
    try:
        tensors = load_bytes(path.read_bytes())
        return {k: (tensors[f"{k}/{names[0]}"], tensors[f"{k}/{names[1]}"]) for k in keys}
    except Exception:  # noqa: BLE001 - a part we cannot trust is computed again
        return None


def _write_part(path: Path, parts: dict[str, tuple[torch.Tensor, torch.Tensor]], names: tuple[str, str]) -> str:
    tensors = {f"{k}/{n}": t for k, pair in parts.items() for n, t in zip(names, pair)}
    write_cache_file(path, tensors, {"kind": "part"})
    return str(path)


# --------------------------------------------------------------------------- in the worker process

_worker: dict = {}


def _init_worker(devices, plan: ShardPlan) -> None:
    torch.set_num_threads(plan.threads)
    _worker.update(device=devices.get(), plan=plan)
    logging.getLogger("diffusers").setLevel(logging.ERROR)


def _text_pipe():
    if "pipe" not in _worker:
        plan = _worker["plan"]
        _worker["pipe"] = text_pipeline(plan.layout, plan.dtype, _worker["device"], plan.text_encoder_quant)
    return _worker["pipe"]


def _text_task(batch: list[tuple[str, str]], path: Path) -> str:
    embeds = encode_text_batch(_text_pipe(), batch, _worker["device"], _worker["plan"].dtype)
    return _write_part(path, embeds, TEXT_NAMES)


def _story_task(scenes, path: Path, metadata: dict) -> str:
    story = {k: v.float().cpu().contiguous() for k, v in encode_scenes(_text_pipe(), scenes, _worker["device"]).items()}
    write_cache_file(path, story, metadata)
    return str(path)


def _image_task(batch: list[ImageJob], crop: str, seed: int, path: Path) -> str:
    if "vae" not in _worker:
        vae = load_vae(_worker["plan"].layout, _worker["plan"].dtype).to(_worker["device"]).eval()
        _worker.update(vae=vae, scale=float(vae.config.scaling_factor))
    latents = encode_latents(_worker["vae"], _worker["scale"], batch, crop, seed, _worker["device"])
    return _write_part(path, latents, IMAGE_NAMES)


# ----------------------------------------------------------------------------- in the parent process


def _run(plan: ShardPlan, tasks: list[tuple[Callable, tuple]]) -> Iterator[tuple]:
    """Run ``(task function, args)`` in ``len(plan.devices)`` spawned processes; yield each task
    as it finishes. A worker's error is raised here; unfinished tasks are cancelled."""
    context = multiprocessing.get_context("spawn")  # no forked CUDA state or torch threads
    devices = context.Queue()
    for device in plan.devices:
        devices.put(device)
    pool = ProcessPoolExecutor(max_workers=len(plan.devices), mp_context=context, initializer=_init_worker,
                               initargs=(devices, plan))
    try:
        futures = {pool.submit(fn, *args): (fn, args) for fn, args in tasks}
        for future in as_completed(futures):
            future.result()
            yield futures[future]
    except UserError:  # a bad image, NaN embeddings: the worker's own message
        raise
    except Exception as exc:  # a crashed worker (out of memory, killed), a broken model file
        raise CacheError(f"A cache.devices worker failed ({type(exc).__name__}: {exc}). Finished batches are "
                         "kept; re-run, or use cache.devices=1 to see the error in this process.") from exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _in_shards(plan: ShardPlan, kind: str, batches: list, task: Callable, extra: tuple, names: tuple[str, str],
               keys_of: Callable, also: list | None = None) -> Iterator[dict]:
    """Each batch's tensors by key, as its part is found on disk or a worker finishes it."""
    tasks = list(also or [])
    for batch in batches:
        path = part_path(plan, kind, keys_of(batch))
        done = read_part(path, keys_of(batch), names)
        if done is not None:
            yield done
        else:
            tasks.append((task, (batch, *extra, path)))
    for fn, args in _run(plan, tasks):
        if fn is task:
            batch, path = args[0], args[-1]
            done = read_part(path, keys_of(batch), names)
            if done is None:
                raise CacheError(f"A cache worker's part file {path} cannot be read back; re-run the build.")
            yield done


def texts_in_shards(plan: ShardPlan, batches: list[list[tuple[str, str]]],
                    story: tuple[list, Path, dict] | None) -> Iterator[dict]:
    """The caption batches' embeddings ``{text key: (embeds, pooled)}``, batch by batch; ``story``
    (scenes, file, metadata) is encoded by one of the workers into its file."""
    also = [(_story_task, story)] if story is not None else []
    yield from _in_shards(plan, "text", batches, _text_task, (), TEXT_NAMES, lambda b: [k for k, _ in b], also)


def latents_in_shards(plan: ShardPlan, batches: list[list[ImageJob]], crop: str, seed: int) -> Iterator[dict]:
    """The image batches' ``{image key: (latents, add_time_ids)}``, batch by batch."""
    yield from _in_shards(plan, "image", batches, _image_task, (crop, seed), IMAGE_NAMES, lambda b: [j.key for j in b])
