"""LoRA files: the three formats every checkpoint is written in, and the record a file reads back
into (:class:`LoraFile`; reading lives in :mod:`kolors_story.lora.reader`).

Each file is self-describing (rank, alpha, target modules, the UNet config it was made for, and the
caller's metadata such as base-model and dataset hashes):

- ``lora.safetensors``: diffusers format (``unet.<module>.lora_A.weight``); the LoRA config sits in
  the safetensors header under ``lora_adapter_metadata`` (read by ``KolorsPipeline.load_lora_weights``)
  and ours under ``kolors_story``.
- ``lora_kohya.safetensors``: kohya keys (``lora_unet_<module_path>.lora_down/lora_up/alpha``), as read
  by ComfyUI and A1111; the header also carries ``ss_network_dim`` / ``ss_network_alpha``.
- ``lora_diffsynth.ckpt``: a flat ``torch.save`` dict with DiffSynth-Studio's SDXLUNet names
  (``blocks.N. ... to_q.lora_A.default.weight``), exactly what the competition's ``load_lora()``
  (peft ``inject_adapter_in_model`` + ``load_state_dict(strict=False)``) loads. rank/alpha/info are
  stored inline as three extra tensors under ``_kolors_story.`` (``rank``, ``alpha``, ``info`` = UTF-8
  JSON bytes): no module of the UNet has that name, so ``load_state_dict(strict=False)`` ignores them,
  DiffSynth's own ``ModelManager.load_lora`` skips them (it only reads ``lora_B`` keys), and the file
  still opens with ``torch.load(weights_only=True)``. No sidecar file that could get separated.

Adapter types other than plain LoRA (``lora.type``: DoRA, LoHa, LoKr; convolutions with
``lora.conv_rank``) are written where the format can hold them exactly: the kohya/LyCORIS file
always, the diffusers file for LoRA/DoRA, the DiffSynth file for plain attention LoRAs only. A
format that cannot is skipped, never written wrong; the reason is in every written file's info
block (``skipped``), the checkpoint record and the model card (see :mod:`kolors_story.lora.variants`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kolors_story.files import atomic_path, save_safetensors
from kolors_story.lora.keys import (
    DIFFUSERS_PREFIX,
    arch_index,
    by_module,
    clean_unet_config,
    normalise_peft,
    peft_modules,
    peft_to_diffsynth,
    peft_to_diffusers,
    peft_to_kohya,
    short_target,
)
from kolors_story.lora.variants import (
    adapter_type,
    layer_alphas,
    skipped_exports,
    to_lycoris_values,
)
from kolors_story.records.layout import FILE_NAMES, checkpoint_lora_file, with_suffix  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INFO_KEY = "kolors_story"  # safetensors header key holding our JSON info block
CKPT_META_PREFIX = "_kolors_story."  # inline keys of the .ckpt (ignored by load_state_dict(strict=False))
# DiffSynth-Studio's trainer default --lora_alpha (also the competition baseline's value); its
# checkpoints do not record alpha, so this is what such a file was most likely trained with.
DIFFSYNTH_DEFAULT_ALPHA = 4.0
# target_modules of the competition's load_lora(): LoRAs on other modules are silently dropped there.
COMPETITION_TARGETS = ("to_q", "to_k", "to_v", "to_out")


@dataclass
class LoraFile:
    """An adapter read from disk, in peft key names of the diffusers UNet (``<module>.lora_A.weight``,
    ``<module>.hada_w1_a`` ...). ``rank``/``alpha`` hold for every module except those in
    ``rank_pattern``/``alpha_pattern`` (full module path -> value; e.g. the convolutions of a LoCon)."""

    state_dict: dict[str, torch.Tensor]
    rank: int
    alpha: float
    target_modules: list[str]
    metadata: dict = field(default_factory=dict)  # the metadata given to save_lora ({} for foreign files)
    format: str = "diffusers"  # diffusers | kohya | diffsynth | diffsynth_trainer | peft
    path: Path | None = None
    alpha_source: str = "file"  # file | default_alpha argument | fallback default
    info: dict = field(default_factory=dict)  # the whole info block written by save_lora
    type: str = "lora"  # lora | dora | loha | lokr
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    decompose_both: bool = False  # LoKr: the first Kronecker factor is low-rank too

    @property
    def modules(self) -> list[str]:
        """Full module paths of the UNet that carry this adapter."""
        return peft_modules(self.state_dict)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


# ---------------------------------------------------------------------------------------------
# saving


class SavedFiles(dict):
    """``{format: path}`` of the files written, and ``skipped``: ``{format: why it was not written}``."""

    def __init__(self, files: dict, skipped: dict):
        super().__init__(files)
        self.skipped = dict(skipped)


@dataclass
class AdapterState:
    """One adapter of a UNet as plain tensors (normalised peft keys, on the CPU) and its per-module sizes."""

    type: str
    rank: int
    alpha: float
    state_dict: dict[str, torch.Tensor]
    ranks: dict[str, int]  # module -> rank
    alphas: dict[str, float]  # module -> alpha
    config: object  # the peft config

    @property
    def rank_pattern(self) -> dict[str, int]:
        return {m: r for m, r in self.ranks.items() if r != self.rank}

    @property
    def alpha_pattern(self) -> dict[str, float]:
        return {m: a for m, a in self.alphas.items() if a != self.alpha}

    def conv_modules(self, unet_config) -> list[str]:
        shapes = arch_index(unet_config).weight_shapes
        return [m for m in self.ranks if len(shapes.get(m, ())) == 4]


def _jsonable(metadata) -> dict:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"LoRA metadata must be a dict, got {type(metadata).__name__}")
    return json.loads(json.dumps(dict(metadata), default=str))


def adapter_state(unet, adapter_name: str = "default") -> AdapterState:
    """The adapter's weights and per-module rank/alpha (the layers' own, whatever strength is set)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import get_peft_model_state_dict

    configs = getattr(unet, "peft_config", None) or {}
    if adapter_name not in configs:
        raise ValueError(
            f"the UNet has no LoRA adapter {adapter_name!r} (it has {sorted(configs) or 'none'}); call add_lora first"
        )
    cfg = configs[adapter_name]
    unsupported = [n for n in ("use_rslora", "lora_bias", "use_effective_conv2d") if getattr(cfg, n, False)]
    if unsupported:
        raise ValueError(f"adapter {adapter_name!r} uses {unsupported}: no file format here can hold that")
    sd = normalise_peft(get_peft_model_state_dict(unet, adapter_name=adapter_name), f"adapter {adapter_name!r}")
    out = {}
    for k, v in sd.items():
        if v.is_meta:
            raise ValueError(f"LoRA weight {k} is on the meta device: materialise the LoRA before saving")
        out[k] = v.detach().to("cpu").contiguous().clone()
    ranks, alphas = {}, {}
    for name, module in unet.named_modules():
        if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "r", {}):
            ranks[name], alphas[name] = int(module.r[adapter_name]), float(layer_alphas(module)[adapter_name])
    kind = adapter_type(by_module(out))
    alpha = float(getattr(cfg, "lora_alpha", None) or cfg.alpha)
    return AdapterState(kind, int(cfg.r), alpha, out, ranks, alphas, cfg)


def _diffusers_adapter_metadata(state: AdapterState, targets: list[str]) -> dict:
    """The LoraConfig fields diffusers' loader rebuilds the adapter from (``LoraConfig(**metadata)``)."""
    cfg = state.config
    return {
        "r": state.rank,
        "lora_alpha": state.alpha,
        "target_modules": targets,
        "rank_pattern": state.rank_pattern,
        "alpha_pattern": state.alpha_pattern,
        "lora_dropout": float(cfg.lora_dropout),
        "init_lora_weights": cfg.init_lora_weights,
        "use_dora": state.type == "dora",
        "use_rslora": False,
        "lora_bias": False,
    }


def _kohya_tensors(state: AdapterState) -> dict:
    """The kohya/LyCORIS tensors: LyCORIS' value conventions per module, then its key names."""
    converted = {}
    for module, params in by_module(state.state_dict).items():
        scaling = state.alphas[module] / state.ranks[module]
        for param, value in to_lycoris_values(params, scaling).items():
            converted[f"{module}.{param}"] = value
    return peft_to_kohya(converted, state.alphas, state.type)


def _kohya_header(state: AdapterState, conv: bool) -> dict:
    """kohya's ``ss_*`` training metadata (LyCORIS' ``algo`` names for the non-LoRA types)."""
    header = {"ss_network_dim": str(state.rank), "ss_network_alpha": str(state.alpha)}
    if state.type == "lora" and not conv:
        return {**header, "ss_network_module": "networks.lora"}
    args = {"algo": {"dora": "lora"}.get(state.type, "locon" if state.type == "lora" else state.type)}
    if state.type == "dora":
        args["dora_wd"] = True
    if conv:
        conv_modules = [m for m in state.ranks if m in state.rank_pattern or m in state.alpha_pattern]
        if conv_modules:
            args["conv_dim"] = state.ranks[conv_modules[0]]
            args["conv_alpha"] = state.alphas[conv_modules[0]]
    return {**header, "ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)}


SAVE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def to_torch_dtype(name: str) -> torch.dtype:
    return SAVE_DTYPES[str(name)]


def check_save_settings(dtype: str, formats) -> None:
    """``trainer.save_dtype`` and ``trainer.save_formats``, before anything is written."""
    from kolors_story.errors import SettingsError

    if str(dtype) not in SAVE_DTYPES:
        raise SettingsError(f"trainer.save_dtype={dtype!r}: use one of {list(SAVE_DTYPES)}")
    unknown = [f for f in formats if f not in FILE_NAMES]
    if unknown or not formats:
        raise SettingsError(f"trainer.save_formats={list(formats)}: name one or more of {list(FILE_NAMES)}")


def _diffsynth_ckpt(state_dict: dict, info: dict, state) -> dict:
    """DiffSynth's flat state dict plus this project's info as inline tensors (rank, alpha and the
    JSON block), which ``load_state_dict(strict=False)`` ignores."""
    ckpt = dict(state_dict)
    blob = json.dumps({**info, "format": "diffsynth"}, ensure_ascii=False).encode("utf-8")
    ckpt[CKPT_META_PREFIX + "rank"] = torch.tensor(state.rank, dtype=torch.int64)
    ckpt[CKPT_META_PREFIX + "alpha"] = torch.tensor(state.alpha, dtype=torch.float64)
    ckpt[CKPT_META_PREFIX + "info"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()
    return ckpt


def save_lora(unet, folder, metadata: dict | None = None, adapter_name: str = "default",
              suffix: str = "", dtype: str = "float32", formats=tuple(FILE_NAMES)) -> SavedFiles:
    """Write the adapter as ``lora.safetensors``, ``lora_kohya.safetensors`` and ``lora_diffsynth.ckpt``
    (``suffix`` before the extension: ``_ema`` gives ``lora_ema.safetensors`` ...), each of ``formats``
    that can hold its type (see the module docstring); ``.skipped`` of the result says why a format
    was not written. ``dtype`` (``trainer.save_dtype``): the files' tensors, float16 halves their size.

    Each write is atomic (temp file + rename). Every file carries type, rank, alpha, target modules,
    the UNet config and ``metadata`` (base_model_hash, dataset_hash, resolved config ...).
    """

    folder = Path(folder)
    state = adapter_state(unet, adapter_name)
    check_save_settings(dtype, formats)
    state.state_dict = {k: v.to(to_torch_dtype(dtype)) for k, v in state.state_dict.items()}
    sd = state.state_dict
    # Short names of the modules that really carry the adapter (also right for adapters loaded with
    # exact module paths as targets).
    targets = sorted({short_target(m) for m in peft_modules(sd)})
    conv = bool(state.conv_modules(unet.config))
    skipped = skipped_exports(state.type, conv)
    info = {"format_version": FORMAT_VERSION, "type": state.type, "rank": state.rank, "alpha": state.alpha,
            "rank_pattern": state.rank_pattern, "alpha_pattern": state.alpha_pattern, "target_modules": targets,
            "unet_config": clean_unet_config(unet.config), "metadata": _jsonable(metadata), "skipped": skipped}
    # Convert everything first, so a conversion error leaves no file half-updated.
    index = arch_index(unet.config)
    diffsynth_sd = peft_to_diffsynth(sd, index) if "diffsynth" not in skipped else None
    ds_targets = sorted({short_target(m) for m in peft_modules(diffsynth_sd or {})})
    if not set(ds_targets) <= set(COMPETITION_TARGETS):
        log.warning(
            "LoRA targets %s in DiffSynth names include modules outside the competition's load_lora() "
            "target_modules %s: those weights are ignored there", ds_targets, list(COMPETITION_TARGETS))
    kohya_sd = _kohya_tensors(state)
    files = {fmt: folder / with_suffix(name, suffix) for fmt, name in FILE_NAMES.items()
             if fmt not in skipped and fmt in formats}

    def header(fmt: str, extra: dict) -> dict:
        return {"format": "pt", INFO_KEY: json.dumps({**info, "format": fmt}, ensure_ascii=False), **extra}

    if "diffusers" in files:
        adapter_meta = {DIFFUSERS_PREFIX + k: v for k, v in _diffusers_adapter_metadata(state, targets).items()}
        with atomic_path(files["diffusers"]) as tmp:
            save_safetensors(peft_to_diffusers(sd), tmp, header(
                "diffusers", {"lora_adapter_metadata": json.dumps(adapter_meta, indent=2, sort_keys=True)}))
    if "kohya" in files:
        with atomic_path(files["kohya"]) as tmp:
            save_safetensors(kohya_sd, tmp, header("kohya", _kohya_header(state, conv)))
    if "diffsynth" in files:
        with atomic_path(files["diffsynth"]) as tmp:
            torch.save(_diffsynth_ckpt(diffsynth_sd, {**info, "diffsynth_target_modules": ds_targets}, state), tmp)
    for fmt, why in skipped.items():
        log.info("%s: no %s file (%s)", folder, fmt, why)
    return SavedFiles(files, skipped)
