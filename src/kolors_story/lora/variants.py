"""Adapter variants (``lora.type``): LoRA, DoRA, LoHa and LoKr through peft, with or without the
convolution layers (LoCon, ``lora.conv_rank``), and what each file format can hold of them.

One adapter, one set of names per key space (``<m>`` = a module path of the diffusers UNet):

======  =========================================  ============================================
type    peft (``get_peft_model_state_dict``)       kohya / LyCORIS (ComfyUI, A1111)
======  =========================================  ============================================
lora    ``<m>.lora_A.weight``, ``lora_B.weight``    ``lora_unet_<m_>.lora_down.weight``, ``lora_up``
dora    + ``<m>.lora_magnitude_vector``             + ``.dora_scale`` (shape ``(out, 1[, 1, 1])``)
loha    ``<m>.hada_w1_a`` ... ``hada_w2_b``         the same names (LyCORIS' own)
lokr    ``<m>.lokr_w1`` / ``lokr_w2[_a|_b]``        the same names
======  =========================================  ============================================

plus ``.alpha`` per module in the kohya file. Two values differ between peft and LyCORIS, not only
names: DoRA's magnitude is ``(out,)`` (linear) or ``(1, out, 1, 1)`` (conv) in peft and an
``(out, 1, ...)`` column in LyCORIS (ComfyUI decides the axis from ``dora_scale.shape[0]``); and a
LoKr module whose two Kronecker factors are both full matrices is scaled by ``alpha / r`` in peft
but by 1 in LyCORIS/ComfyUI (there is no rank to divide by), so that scale is baked into
``lokr_w1`` on export and read back with ``alpha = r``.
"""

from __future__ import annotations

import math

import torch

from kolors_story.errors import SettingsError

LORA_TYPES = ("lora", "dora", "loha", "lokr")
# Convolutions of the ResNet blocks and the down/upsamplers: the layers kohya's LoCon adds
# ("conv" is the down/upsampler's own convolution; conv_in/conv_out stay untouched).
CONV_TARGETS = ("conv1", "conv2", "conv_shortcut", "conv")

# peft parameter name (normalised: no adapter name) -> kohya/LyCORIS name, per adapter type
KOHYA_PARAM_NAMES = {
    "lora": {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"},
    "dora": {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
             "lora_magnitude_vector": "dora_scale"},
    "loha": {n: n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
    "lokr": {n: n for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")},
}
PARAM_NAMES = sorted({p.split(".")[0] for names in KOHYA_PARAM_NAMES.values() for p in names})
# Which file formats can hold each type; the reason is written into the checkpoint and the model card.
DIFFUSERS_SKIP = ("diffusers' load_lora_weights reads LoRA and DoRA only (no LoHa/LoKr loader); "
                  "use lora_kohya.safetensors (ComfyUI, this repository)")
DIFFSYNTH_SKIP_TYPE = ("the competition's DiffSynth load_lora() injects a plain LoRA on to_q/to_k/to_v/to_out; "
                       "a {type} adapter cannot be written in it without changing the result")
DIFFSYNTH_SKIP_CONV = ("the competition's DiffSynth load_lora() targets to_q/to_k/to_v/to_out only; the "
                       "convolution (LoCon) weights would be dropped silently")


def check_type(kind: str) -> str:
    kind = str(kind).lower()
    if kind not in LORA_TYPES:
        raise SettingsError(f"lora.type={kind!r} is not supported; use one of {list(LORA_TYPES)}")
    return kind


def type_of_params(params) -> str:
    """The adapter type of a set of normalised peft parameter names (``lora_A.weight``, ``hada_w1_a`` ...)."""
    names = {p.split(".")[0] for p in params}
    if names & {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}:
        return "loha"
    if any(n.startswith("lokr_") for n in names):
        return "lokr"
    return "dora" if "lora_magnitude_vector" in names else "lora"


def adapter_type(modules: dict[str, dict]) -> str:
    """The adapter type of a ``{module: {parameter: tensor}}`` state (``keys.by_module``)."""
    return type_of_params({param for params in modules.values() for param in params})


def layer_alphas(layer) -> dict:
    """adapter name -> alpha of a peft layer (LoRA/DoRA layers call it ``lora_alpha``, LoHa/LoKr ``alpha``)."""
    return getattr(layer, "lora_alpha", None) or getattr(layer, "alpha", None) or {}


def conv_patterns(conv_rank, conv_alpha, alpha: float) -> tuple[list[str], dict, dict]:
    """(extra targets, rank_pattern, alpha_pattern) for ``lora.conv_rank``; nothing when it is null/0."""
    if conv_rank in (None, 0):
        return [], {}, {}
    try:
        conv_rank = int(conv_rank)
        conv_alpha = float(alpha if conv_alpha is None else conv_alpha)
    except (TypeError, ValueError):
        raise SettingsError(f"lora.conv_rank={conv_rank!r}, lora.conv_alpha={conv_alpha!r}: give numbers") from None
    if conv_rank < 0 or not (math.isfinite(conv_alpha) and conv_alpha > 0):
        raise SettingsError(f"lora.conv_rank={conv_rank}, lora.conv_alpha={conv_alpha}: rank >= 1 and alpha > 0 "
                            "(conv_rank null or 0 leaves the convolutions alone)")
    return list(CONV_TARGETS), {t: conv_rank for t in CONV_TARGETS}, {t: conv_alpha for t in CONV_TARGETS}


def peft_config(kind: str, rank: int, alpha: float, targets: list[str], *, init=True, dropout: float = 0.0,
                rank_pattern: dict | None = None, alpha_pattern: dict | None = None, decompose_both: bool = False):
    """The peft config of one adapter type (``init`` and ``dropout`` are LoRA/DoRA-only)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    patterns = {"rank_pattern": dict(rank_pattern or {}), "alpha_pattern": dict(alpha_pattern or {})}
    if kind in ("lora", "dora"):
        return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=init,
                          lora_dropout=dropout, use_dora=kind == "dora", **patterns)
    if dropout:
        raise SettingsError(f"lora.dropout={dropout} applies to lora/dora only; set it to 0 for lora.type={kind}")
    if kind == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=targets, init_weights=init is not False, **patterns)
    return LoKrConfig(r=rank, alpha=alpha, target_modules=targets, init_weights=init is not False,
                      decompose_both=decompose_both, **patterns)


def skipped_exports(kind: str, conv_modules: bool) -> dict[str, str]:
    """File formats that cannot hold this adapter -> why (the kohya file holds every type)."""
    skipped = {}
    if kind in ("loha", "lokr"):
        skipped["diffusers"] = DIFFUSERS_SKIP
    if kind != "lora":
        skipped["diffsynth"] = DIFFSYNTH_SKIP_TYPE.format(type=kind)
    elif conv_modules:
        skipped["diffsynth"] = DIFFSYNTH_SKIP_CONV
    return skipped


# ---------------------------------------------------------------------------------------------
# per-module rank and the value conversions peft <-> LyCORIS


def module_rank(params: dict[str, torch.Tensor]) -> int | None:
    """The rank of one module's adapter from its weights (None: a LoKr with two full factors)."""
    for name, axis in (("lora_A.weight", 0), ("hada_w1_b", 0), ("lokr_w2_b", 0), ("lokr_w1_b", 0)):
        if name in params:
            return int(params[name].shape[axis])
    return None


def full_lokr_rank(params: dict[str, torch.Tensor]) -> int:
    """The smallest rank at which peft keeps both LoKr factors full (as in this module)."""
    w2 = params["lokr_w2"]
    return math.ceil(max(int(w2.shape[0]), int(w2.shape[1])) / 2)


def is_full_lokr(params) -> bool:
    return "lokr_w1" in params and "lokr_w2" in params


def to_lycoris_values(params: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """One module's peft tensors with LyCORIS' value conventions (DoRA column, baked full-LoKr scale)."""
    out = dict(params)
    mag = out.get("lora_magnitude_vector")
    if mag is not None:
        out["lora_magnitude_vector"] = mag.reshape(-1, *([1] * (mag.dim() - 1 if mag.dim() > 1 else 1)))
    if is_full_lokr(out):
        out["lokr_w1"] = out["lokr_w1"] * scaling
    return out


def from_lycoris_values(params: dict[str, torch.Tensor], weight_dim: int) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_lycoris_values` for the tensors (a full LoKr is then read with alpha = r)."""
    out = dict(params)
    mag = out.get("lora_magnitude_vector")
    if mag is not None:
        out["lora_magnitude_vector"] = mag.reshape(-1) if weight_dim == 2 else mag.reshape(1, -1, *([1] * (weight_dim - 2)))
    return out
