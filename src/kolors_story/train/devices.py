"""Where and how training runs: precision (16-mixed falls back to 32 on a CPU), the Lightning
strategy, how many processes, and whether this process is the one that writes files."""

from __future__ import annotations

import os
import warnings

import torch

from kolors_story.config import TrainerSettings
from kolors_story.errors import SettingsError, TrainingError


def cuda_like_available() -> bool:
    return torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())


def resolve_precision(precision, accelerator: str = "auto") -> str:
    """``16-mixed`` needs a GPU: on a CPU-only machine it falls back to ``32`` with a warning."""
    p = str(precision)
    if p in ("16", "16-mixed", "16-true") and (str(accelerator) == "cpu" or not cuda_like_available()):
        msg = (f"trainer.precision={p} needs a GPU; this run is on the CPU, so it uses precision 32 "
               "(set trainer.precision=32 or bf16-mixed to silence this)")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        print(f"WARNING: {msg}")
        return "32"
    if p not in ("32", "32-true", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64", "64-true", "bf16", "16"):
        raise SettingsError(f"trainer.precision={p!r}: use 32, 16-mixed or bf16-mixed")
    return p


def resolve_strategy(name: str) -> str:
    name = str(name)
    if name.startswith("deepspeed"):
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise TrainingError(
                f"trainer.strategy={name} needs DeepSpeed, which is not installed: `pip install deepspeed` "
                "on a CUDA machine, or use trainer=ddp"
            ) from None
    return name


def world_size(trainer: TrainerSettings) -> int:
    """Processes the run will use: devices x nodes (``auto``/-1: every visible GPU)."""
    devices = trainer.devices
    n = devices if isinstance(devices, int) else (len(devices) if isinstance(devices, (list, tuple)) else 1)
    if isinstance(devices, str):
        n = int(devices) if devices.isdigit() else (torch.cuda.device_count() if devices in ("auto", "-1") else 1)
    if n == -1:
        n = max(1, torch.cuda.device_count())
    return max(1, n) * int(trainer.num_nodes or 1)


def cache_processes(devices: int | None, model_device: str, trainer: TrainerSettings) -> int:
    """``cache.devices``: as given, or (null) this node's training GPUs for a CUDA model, else 1."""
    if devices is not None:
        return int(devices)
    return world_size(trainer) // int(trainer.num_nodes or 1) if str(model_device).startswith("cuda") else 1


def secondary_process() -> bool:
    """Not the global rank 0 of a distributed job (Lightning, torchrun and SLURM set these)."""
    for var in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "SLURM_PROCID"):
        if os.environ.get(var, "0") not in ("", "0"):
            return True
    return False
