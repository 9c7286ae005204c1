"""Validation loss: a held-out split of the training items, scored at every checkpoint.

The split is fixed by ``trainer.seed``; each held-out item is noised at the same timesteps
(``trainer.validation_timesteps``) with the same noise every time (a generator per item and
timestep), and the unweighted denoising loss is averaged. So the number depends only on the LoRA:
comparable between checkpoints and between runs (``val_loss`` in metrics.jsonl, W&B and the
leaderboard), unlike the training loss, whose timesteps are drawn at random.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kolors_story.data.cache_files import ITEM_KEYS, load_cached_item
from kolors_story.errors import SettingsError


def held_out_count(n_items: int, split: float) -> int:
    if not split:
        return 0
    k = int(round(n_items * split)) if split < 1 else int(split)
    if not 1 <= k < n_items:
        raise SettingsError(f"trainer.validation_split={split} holds out {k} of {n_items} items: keep at least one "
                            "for training and one for validation (a share < 1 or a count), or 0 for none")
    return k


def split_items(items: Sequence, split: float, seed: int) -> tuple[list, list]:
    """``(training items, held-out items)``, both in their original order."""
    k = held_out_count(len(items), split)
    held = set(np.random.default_rng([int(seed), 0x5A11]).permutation(len(items))[:k].tolist())
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def _batch(item, device, dtype) -> dict:
    item = load_cached_item(item) if not isinstance(item, dict) else item
    return {k: item[k][None].to(device=device, dtype=dtype if item[k].is_floating_point() else item[k].dtype)
            for k in ITEM_KEYS}


@torch.no_grad()
def held_out_loss(module, items: Sequence, timesteps: Sequence[int], seed: int) -> float:
    """Mean denoising loss of ``items`` at ``timesteps`` with fixed noise (the LoRA in eval mode)."""
    was_training = module.training
    module.eval()
    device = next(module.unet.parameters()).device
    losses = []
    try:
        for i, item in enumerate(items):
            batch = _batch(item, device, torch.float32)
            for t in timesteps:
                g = torch.Generator().manual_seed(int(seed) * 1_000_003 + i * 10_007 + int(t))
                noise = torch.randn(batch["latents"].shape[1:], generator=g)[None].to(device)
                steps = torch.tensor([int(t)], device=device)
                losses.append(float(module.per_sample_loss(batch, noise, steps)[0]))
    finally:
        module.train(was_training)
    return float(np.mean(losses))
