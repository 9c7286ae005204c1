"""Feeding the trainer: the cached items as a dataset, and a resumable, rank-aware batch sampler
that gives every sample its own noise seed (so noise does not depend on batching or resumes)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from kolors_story.config import TrainerSettings
from kolors_story.data.cache_files import ITEM_KEYS, load_cached_item
from kolors_story.errors import TrainingError


class CachedItems(torch.utils.data.Dataset):
    """The training items: cache files (``data.cache_files.load_cached_item``) or in-memory dicts
    with the same keys, or per image a list of them (its caption variants). Indexed by ``(item
    index, noise seed)`` pairs from :class:`StreamBatchSampler`; the seed also picks the caption
    variant and, with probability ``caption_dropout``, swaps in the ``empty`` caption's embeddings."""

    def __init__(self, items: Sequence, caption_dropout: float = 0.0, empty: dict | None = None):
        if len(items) == 0:
            raise TrainingError("the training set is empty: the data stage kept no image (see <data_dir>/report.json)")
        if caption_dropout and empty is None:
            raise TrainingError("dataset.caption_dropout needs the empty caption's embeddings (the cache builds them)")
        self.items = list(items)
        self.caption_dropout, self.empty = float(caption_dropout or 0.0), empty

    def __len__(self) -> int:
        return len(self.items)

    def describe(self, index: int) -> str:
        item = self.items[index]
        item = item[0] if isinstance(item, (list, tuple)) else item
        return str(item) if isinstance(item, (str, Path)) else f"item {index}"

    def __getitem__(self, key):
        index, seed = key
        item = self.items[index]
        variants = isinstance(item, (list, tuple))
        rng = np.random.default_rng([int(seed), 0xCA9])  # the sample's own caption choice (resumes replay it)
        if variants:
            item = item[int(rng.integers(len(item)))]
        if isinstance(item, (str, Path)):
            item = load_cached_item(item)
        out = {k: item[k] for k in ITEM_KEYS}
        if self.caption_dropout:
            dropped = bool(rng.random() < self.caption_dropout)
            if dropped:
                out.update(prompt_embeds=self.empty["prompt_embeds"],
                           pooled_prompt_embeds=self.empty["pooled_prompt_embeds"])
            out["caption_dropped"] = torch.tensor(dropped)
        out["noise_seed"] = torch.tensor(int(seed), dtype=torch.int64)
        out["index"] = torch.tensor(int(index), dtype=torch.int64)
        return out


def _mix(*values: int) -> int:
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(1, np.uint64)[0] >> 1)


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class StreamBatchSampler:
    """``batches_per_epoch`` batches per epoch (DiffSynth's ``steps_per_epoch``), however many items.

    Epoch ``e`` walks a stream of seeded permutations of the dataset (cycling when an epoch is
    longer than the dataset, so every image is seen equally often); rank ``r`` of ``w`` takes
    every ``w``-th batch. Each sample carries its own noise seed, derived from (seed, epoch,
    position), so the noise does not depend on batching, resumes or the global RNG.

    Resumable: ``state_dict`` records the epoch and how many of its batches the trainer has
    processed; a resumed run continues with the next batch of the same stream.
    """

    def __init__(self, n_items: int, batch_size: int, batches_per_epoch: int | None, seed: int,
                 groups: list[int] | None = None):
        self.n_items = int(n_items)
        self.groups = groups  # per item its bucket: every batch is drawn from one (dataset.buckets)
        self.batch_size = max(1, int(batch_size))
        self.seed = int(seed)
        self._fixed = batches_per_epoch
        self.epoch = 0
        self._skip = 0
        self.trainer = None  # set once the Trainer exists: its progress counters are the state

    def __len__(self) -> int:
        if self._fixed:
            return int(self._fixed)
        _, world = _dist()
        return max(1, math.ceil(self.n_items / (self.batch_size * world)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def sampler(self):
        # Lightning calls set_epoch on ``loader.sampler`` and ``loader.batch_sampler.sampler``
        # only: exposing ourselves there is how each epoch gets its own order.
        return self

    def _permutation(self, epoch: int, k: int) -> list[int]:
        g = torch.Generator().manual_seed(_mix(self.seed, epoch, k, 0xDA7A))
        return torch.randperm(self.n_items, generator=g).tolist()

    def _bucket_chunks(self, epoch: int, k: int) -> list[list[int]]:
        """One pass over the items: each bucket's items in the pass's order, cut into batches, the
        batches shuffled (seeded), so one batch never mixes sizes."""
        by_bucket: dict[int, list[int]] = {}
        for i in self._permutation(epoch, k):
            by_bucket.setdefault(self.groups[i], []).append(i)
        chunks = [items[s : s + self.batch_size] for _, items in sorted(by_bucket.items())
                  for s in range(0, len(items), self.batch_size)]
        g = torch.Generator().manual_seed(_mix(self.seed, epoch, k, 0xB0C))
        return [chunks[c] for c in torch.randperm(len(chunks), generator=g).tolist()]

    def _bucket_batches(self, epoch: int, rank: int, world: int) -> list[list[tuple[int, int]]]:
        need = len(self) * world
        stream: list[list[int]] = []
        k = 0
        while len(stream) < need:
            stream.extend(self._bucket_chunks(epoch, k))
            k += 1
        out, position = [], 0
        for b, chunk in enumerate(stream[:need]):
            if b % world == rank:
                out.append([(i, _mix(self.seed, epoch, position + n, 0x401E)) for n, i in enumerate(chunk)])
            position += len(chunk)
        return out

    def batches(self, epoch: int, rank: int = 0, world: int = 1) -> list[list[tuple[int, int]]]:
        if self.groups is not None:
            return self._bucket_batches(epoch, rank, world)
        n_batches = len(self)
        need = n_batches * self.batch_size * world
        stream: list[int] = []
        k = 0
        while len(stream) < need:
            stream.extend(self._permutation(epoch, k))
            k += 1
        out = []
        for b in range(n_batches):
            start = (b * world + rank) * self.batch_size
            out.append([(stream[j], _mix(self.seed, epoch, j, 0x401E)) for j in range(start, start + self.batch_size)])
        return out

    def __iter__(self):
        rank, world = _dist()
        skip, self._skip = self._skip, 0
        yield from self.batches(self.epoch, rank, world)[skip:]

    def state_dict(self) -> dict:
        t = self.trainer
        if t is None:
            return {"epoch": self.epoch, "batches_done": 0}
        # ``processed`` counts batches whose training step completed: the next one to train is
        # this index both for checkpoints taken at on_train_batch_end and for interrupts.
        done = t.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": int(t.current_epoch), "batches_done": int(done)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state.get("epoch", 0))
        self._skip = int(state.get("batches_done", 0))
        if self._skip >= len(self):  # the checkpoint closed its epoch: start the next one
            self.epoch += 1
            self._skip = 0


class ResumableLoader(torch.utils.data.DataLoader):
    """A DataLoader Lightning treats as stateful, so mid-epoch resumes continue the same stream."""

    def state_dict(self) -> dict:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)


def latent_sizes(items: Sequence) -> list[tuple[int, ...]]:
    """Each item's latent shape (the first caption variant's), read from the file header only."""
    from safetensors import safe_open

    out = []
    for item in items:
        item = item[0] if isinstance(item, (list, tuple)) else item
        if isinstance(item, dict):
            out.append(tuple(item["latents"].shape))
        else:
            with safe_open(str(item), "pt") as f:
                out.append(tuple(f.get_slice("latents").get_shape()))
    return out


def make_loader(items: Sequence, trainer: TrainerSettings, caption_dropout: float = 0.0,
                empty: dict | None = None, by_size: bool = False) -> ResumableLoader:
    """The training loader; ``by_size``: batches of one latent size each (aspect-ratio buckets)."""
    dataset = CachedItems(items, caption_dropout, empty)
    groups = None
    if by_size:
        sizes = latent_sizes(dataset.items)
        index = {s: n for n, s in enumerate(sorted(set(sizes)))}
        groups = [index[s] for s in sizes]
    sampler = StreamBatchSampler(len(dataset), trainer.batch_size, trainer.steps_per_epoch, trainer.seed, groups)
    return ResumableLoader(dataset, batch_sampler=sampler, num_workers=int(trainer.num_workers or 0),
                           persistent_workers=False)
