"""A LoRA adapter on the Kolors UNet (peft through diffusers): adding one to train (any
``lora.type``, see :mod:`~kolors_story.lora.variants`), loading one or several from files to render
with, and their strengths.

Stacked LoRAs are separate peft adapters on the same UNet, each with its own scale (``scale`` =
strength; the update is scale x alpha / rank x B A, and likewise for DoRA/LoHa/LoKr).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path

from kolors_story.config import LoraSettings
from kolors_story.errors import SettingsError
from kolors_story.lora.files import LoraFile
from kolors_story.lora.keys import LoraFormatError, arch_index, check_shapes
from kolors_story.lora.reader import read_lora
from kolors_story.lora.variants import (
    PARAM_NAMES,
    check_type,
    conv_patterns,
    layer_alphas,
    peft_config,
)

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# lora.init values -> peft's init_lora_weights ("kaiming" is what DiffSynth calls peft's default).
INIT_CHOICES = {"gaussian": "gaussian", "default": True, "kaiming": True}


def _peft_init(init) -> str | bool:
    if init is True:
        return True
    key = str(init).lower()
    if key not in INIT_CHOICES:
        raise SettingsError(f"lora.init={init!r} is not supported; use one of {sorted(INIT_CHOICES)}")
    return INIT_CHOICES[key]


def check_lora(rank, alpha, target_modules, init, dropout) -> list[str]:
    """The LoRA settings checked (``lora.*`` named in the error); returns the target list."""
    try:
        rank, alpha, dropout = int(rank), float(alpha), float(dropout)
    except (TypeError, ValueError):
        raise SettingsError(f"lora.rank={rank!r}, lora.alpha={alpha!r}, lora.dropout={dropout!r}: give numbers") from None
    if rank < 1:
        raise SettingsError(f"lora.rank={rank}: must be >= 1")
    if not (math.isfinite(alpha) and alpha > 0):
        raise SettingsError(f"lora.alpha={alpha}: must be > 0")
    if not 0.0 <= dropout < 1.0:
        raise SettingsError(f"lora.dropout={dropout}: must be in [0, 1)")
    targets = [str(t) for t in ([target_modules] if isinstance(target_modules, str) else target_modules)]
    if not targets:
        raise SettingsError("lora.target_modules is empty; e.g. [to_q, to_k, to_v, to_out.0]")
    _peft_init(init)
    return targets


def check_targets(targets: list[str], unet_config) -> None:
    """Every ``lora.target_modules`` entry names modules of this UNet (peft matches name suffixes)."""
    modules = arch_index(unet_config).weight_shapes
    unmatched = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
    if unmatched:
        raise SettingsError(f"lora.target_modules {unmatched} name no module of this UNet; "
                            "e.g. [to_q, to_k, to_v, to_out.0] (the attention projections)")


def add_lora(unet, rank: int, alpha: float, target_modules=DEFAULT_TARGETS, init="gaussian",
             dropout: float = 0.0, adapter_name: str = "default", type: str = "lora", conv_rank: int | None = None,
             conv_alpha: float | None = None):
    """Add a peft adapter of ``type`` (lora, dora, loha, lokr) to ``unet`` and make only it trainable;
    ``conv_rank`` also adapts the ResNet/down/upsampler convolutions (LoCon) with that rank.

    Returns the UNet. ``init="gaussian"`` (DiffSynth/baseline) draws lora_A from N(0, 1/rank);
    lora_B starts at zero in every init (LoHa/LoKr: peft's own init, also zero), so a fresh adapter
    does not change the output.
    """
    targets = check_lora(rank, alpha, target_modules, init, dropout)
    rank, alpha, dropout, kind = int(rank), float(alpha), float(dropout), check_type(type)
    conv_targets, rank_pattern, alpha_pattern = conv_patterns(conv_rank, conv_alpha, alpha)
    targets += [t for t in conv_targets if t not in targets]
    if adapter_name in (getattr(unet, "peft_config", None) or {}):
        raise SettingsError(f"the UNet already has a LoRA adapter named {adapter_name!r}")
    config = peft_config(kind, rank, alpha, targets, init=_peft_init(init), dropout=dropout,
                         rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    try:
        unet.add_adapter(config, adapter_name=adapter_name)
    except ValueError as e:
        if "not found" in str(e) or "Target module" in str(e):
            raise SettingsError(f"lora.target_modules={targets} does not fit this UNet: {e}") from e
        raise
    # Train only this adapter: the base UNet (and any other adapter) stays frozen.
    for name, p in unet.named_parameters():
        parts = name.split(".")
        p.requires_grad_(adapter_name in parts and any(part in PARAM_NAMES for part in parts))
    return unet


def add_lora_from_settings(unet, lora: LoraSettings, adapter_name: str = "default"):
    """``add_lora`` with the ``lora`` settings group (type, rank, alpha, target_modules, conv_rank, ...)."""
    return add_lora(unet, rank=lora.rank, alpha=lora.alpha, target_modules=list(lora.target_modules),
                    init=lora.init, dropout=lora.dropout, adapter_name=adapter_name, type=lora.type,
                    conv_rank=lora.conv_rank, conv_alpha=lora.conv_alpha)


def _unet_of(pipe_or_unet):
    return getattr(pipe_or_unet, "unet", pipe_or_unet)


def lora_scales(pipe_or_unet) -> dict[str, float]:
    """The active adapters of the UNet and their strengths (``scale`` of load_lora_into_pipeline)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    unet = _unet_of(pipe_or_unet)
    active = list(unet.active_adapters()) if getattr(unet, "peft_config", None) else []
    scales = {}
    for name in active:
        for m in unet.modules():
            alphas = layer_alphas(m) if isinstance(m, BaseTunerLayer) else {}
            if name in getattr(m, "scaling", {}) and alphas.get(name):
                scales[name] = float(m.scaling[name] * m.r[name] / alphas[name])
                break
        else:
            scales[name] = 1.0
    return scales


def set_lora_scales(pipe_or_unet, scales: Mapping[str, float]) -> None:
    """Activate exactly the adapters in ``scales`` with those strengths (0 -> the base model's output)."""
    unet = _unet_of(pipe_or_unet)
    names = list(scales)
    missing = [n for n in names if n not in (getattr(unet, "peft_config", None) or {})]
    if missing:
        raise SettingsError(f"no LoRA adapter named {missing} on this UNet (it has {sorted(unet.peft_config)})")
    unet.set_adapters(names, weights=[float(scales[n]) for n in names])


def _adapter_name_for(unet, path: Path | None) -> str:
    base = re.sub(r"[^0-9A-Za-z_]", "_", path.stem if path else "lora").strip("_") or "lora"
    if base[0].isdigit():
        base = "lora_" + base
    taken = set(getattr(unet, "peft_config", None) or {})
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def load_lora_into_pipeline(pipe, path, scale: float = 1.0, adapter_name: str | None = None,
                            default_alpha: float | None = None) -> str:
    """Add the LoRA in ``path`` (any supported format, or a :class:`LoraFile`) to ``pipe.unet``.

    rank/alpha come from the file. LoRAs already loaded stay active with their own scales, so
    calling this several times stacks them; ``scale=0`` leaves the output equal to the base model.
    Returns the adapter name (for :func:`set_lora_scales`).
    """
    from peft.utils import set_peft_model_state_dict

    unet = _unet_of(pipe)
    lf = path if isinstance(path, LoraFile) else read_lora(path, unet_config=unet.config, default_alpha=default_alpha)
    what = str(lf.path or "LoRA")
    check_shapes(lf.state_dict, arch_index(unet.config), what)
    existing = getattr(unet, "peft_config", None) or {}
    if adapter_name is None:
        adapter_name = _adapter_name_for(unet, lf.path)
    elif adapter_name in existing:
        raise SettingsError(f"a LoRA adapter named {adapter_name!r} is already loaded; pick another adapter_name")
    if "." in adapter_name:
        raise SettingsError(f"adapter_name={adapter_name!r} must not contain '.'")
    previous = lora_scales(unet) if existing else {}

    # Exact module paths as targets: the adapter lands on precisely the modules the file has weights for.
    config = peft_config(lf.type, lf.rank, lf.alpha, lf.modules, init=False, rank_pattern=lf.rank_pattern,
                         alpha_pattern=lf.alpha_pattern, decompose_both=lf.decompose_both)
    unet.add_adapter(config, adapter_name=adapter_name)
    try:
        result = set_peft_model_state_dict(unet, lf.state_dict, adapter_name=adapter_name)
    except RuntimeError as e:  # a size mismatch: e.g. a LoKr factorised differently from peft's
        unet.delete_adapters(adapter_name)
        raise LoraFormatError(f"{what}: the {lf.type} weights do not fit the adapter peft builds for them ({e})") from e
    mine = [k for k in getattr(result, "missing_keys", []) if adapter_name in k.split(".")
            and any(part in PARAM_NAMES for part in k.split("."))]
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if any(p in PARAM_NAMES for p in k.split("."))]
    if unexpected or mine:
        unet.delete_adapters(adapter_name)
        raise LoraFormatError(f"{what}: LoRA keys did not land (unexpected {unexpected[:3]}, missing {mine[:3]})")
    set_lora_scales(unet, {**previous, adapter_name: float(scale)})
    log.info("Loaded LoRA %s (%s %s, rank %d, alpha %g) as %r at scale %g",
             what, lf.format, lf.type, lf.rank, lf.alpha, adapter_name, scale)
    return adapter_name
