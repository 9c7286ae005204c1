"""The optimiser and learning-rate schedule of a training run (``optim.*``).

Optimisers: AdamW (torch, the default and DiffSynth's), AdamW 8-bit (bitsandbytes, CUDA only),
Prodigy (``prodigyopt``: adapts its own step size, use ``optim.lr=1``), Adafactor (transformers,
with a fixed learning rate). Schedules, all after ``warmup_steps`` of linear warmup: constant and
cosine (the project's own, unchanged), and linear, polynomial and cosine with restarts from
transformers' ``get_scheduler``. Every optimiser keeps its state in ``state_dict`` (Prodigy's
``d`` estimate included), so resuming continues exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from kolors_story.config import OptimSettings
from kolors_story.errors import SettingsError

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor")
SCHEDULES = ("constant", "cosine", "linear", "polynomial", "cosine_with_restarts")
_TRANSFORMERS_SCHEDULES = {"linear": "linear", "polynomial": "polynomial", "cosine_with_restarts": "cosine_with_restarts"}


def check_optimizer(o: OptimSettings, device: str) -> None:
    """The optimiser can run here: names, and the 8-bit one only on CUDA with bitsandbytes installed."""
    if o.name not in OPTIMIZERS:
        raise SettingsError(f"optim.name={o.name!r}: use one of {', '.join(OPTIMIZERS)}")
    if o.schedule not in SCHEDULES:
        raise SettingsError(f"optim.schedule={o.schedule!r}: use one of {', '.join(SCHEDULES)}")
    if int(o.cycles) < 1:
        raise SettingsError(f"optim.cycles={o.cycles}: cosine_with_restarts needs at least 1 cycle")
    if o.name == "adamw8bit":
        if not str(device).startswith("cuda"):
            raise SettingsError(f"optim.name=adamw8bit runs on CUDA GPUs only (bitsandbytes), not on model.device={device}; "
                                "use optim.name=adamw here")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise SettingsError("optim.name=adamw8bit needs bitsandbytes: pip install bitsandbytes") from None


def _adamw8bit(params, o: OptimSettings, extra: dict):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=float(o.lr), betas=tuple(o.betas), eps=float(o.eps),
                               weight_decay=float(o.weight_decay), **extra)


def _prodigy(params, o: OptimSettings, extra: dict):
    from prodigyopt import Prodigy

    return Prodigy(params, lr=float(o.lr), betas=tuple(float(b) for b in o.betas), eps=float(o.eps),
                   weight_decay=float(o.weight_decay), **extra)


def _adafactor(params, o: OptimSettings, extra: dict):
    from transformers.optimization import Adafactor

    # Fixed learning rate (the schedule drives it), no relative step or parameter scaling.
    return Adafactor(params, lr=float(o.lr), weight_decay=float(o.weight_decay), scale_parameter=False,
                     relative_step=False, warmup_init=False, **extra)


def _fusable(params: list) -> bool:
    """torch's fused AdamW takes these: floating-point tensors, all on one CPU or CUDA device."""
    tensors = [t for group in params for t in (group["params"] if isinstance(group, dict) else [group])]
    devices = {t.device.type for t in tensors}
    return bool(tensors) and len(devices) == 1 and devices <= {"cpu", "cuda"} and all(t.is_floating_point() for t in tensors)


def build_optimizer(params, o: OptimSettings) -> torch.optim.Optimizer:
    extra = dict(o.kwargs or {})
    if o.name == "adamw":
        params = list(params)
        if "foreach" not in extra and _fusable(params):
            extra.setdefault("fused", True)  # one kernel for all tensors: a third of the for-loop's time on a CPU
        return torch.optim.AdamW(params, lr=float(o.lr), betas=tuple(float(b) for b in o.betas), eps=float(o.eps),
                                 weight_decay=float(o.weight_decay), **extra)
    builders = {"adamw8bit": _adamw8bit, "prodigy": _prodigy, "adafactor": _adafactor}
    if o.name not in builders:
        raise SettingsError(f"optim.name={o.name!r}: use one of {', '.join(OPTIMIZERS)}")
    return builders[o.name](params, o, extra)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step ``step``: linear warmup, then constant or cosine.

    A closure (not a callable object), so LambdaLR does not store it in the checkpoint: a resumed
    run with a longer ``max_steps`` stretches the cosine to the new length.
    """
    if schedule not in ("constant", "cosine"):
        raise SettingsError(f"optim.schedule={schedule!r}: use constant or cosine")
    warmup_steps = max(0, int(warmup_steps))
    total_steps = max(1, int(total_steps))

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_schedule(opt: torch.optim.Optimizer, o: OptimSettings, total_steps: int):
    """The per-step learning-rate schedule over ``total_steps`` optimizer steps."""
    if o.schedule in _TRANSFORMERS_SCHEDULES:
        from transformers import get_scheduler

        specific = {"num_cycles": int(o.cycles)} if o.schedule == "cosine_with_restarts" else {}
        if o.schedule == "polynomial":
            specific = {"power": float(o.power)}
        return get_scheduler(_TRANSFORMERS_SCHEDULES[o.schedule], opt, num_warmup_steps=int(o.warmup_steps or 0),
                             num_training_steps=max(1, int(total_steps)), scheduler_specific_kwargs=specific)
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(str(o.schedule), int(o.warmup_steps or 0), total_steps))
