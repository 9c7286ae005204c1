"""LoRA files: the three formats every checkpoint is written in, and reading any LoRA back.

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

``read_lora`` reads any of these, plain peft state dicts, and the competition trainer's
``epoch=..-step=..ckpt`` (DiffSynth names, possibly under a module prefix or inside a Lightning
``state_dict``). Such trainer files carry no alpha: it falls back to ``default_alpha`` or the
DiffSynth trainer's default (4.0), with a warning.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kolors_story.errors import MissingFileError
from kolors_story.files import atomic_path
from kolors_story.lora.keys import (
    DIFFUSERS_PREFIX,
    DIFFUSERS_TOP,
    KOHYA_PREFIX,
    LoraFormatError,
    arch_index,
    clean_unet_config,
    detect_key_space,
    diffsynth_to_peft,
    kohya_to_peft,
    normalise_peft,
    peft_modules,
    peft_to_diffsynth,
    peft_to_diffusers,
    peft_to_kohya,
    short_target,
    strip_to_top,
)

log = logging.getLogger(__name__)

FILE_NAMES = {
    "diffusers": "lora.safetensors",
    "kohya": "lora_kohya.safetensors",
    "diffsynth": "lora_diffsynth.ckpt",
}
FORMAT_VERSION = 1
INFO_KEY = "kolors_story"  # safetensors header key holding our JSON info block
CKPT_META_PREFIX = "_kolors_story."  # inline keys of the .ckpt (ignored by load_state_dict(strict=False))
# DiffSynth-Studio's trainer default --lora_alpha (also the competition baseline's value); its
# checkpoints do not record alpha, so this is what such a file was most likely trained with.
DIFFSYNTH_DEFAULT_ALPHA = 4.0
# target_modules of the competition's load_lora(): LoRAs on other modules are silently dropped there.
COMPETITION_TARGETS = ("to_q", "to_k", "to_v", "to_out")


# ---------------------------------------------------------------------------------------------
# saving


def _jsonable(metadata) -> dict:
    if metadata is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(metadata, DictConfig):
            metadata = OmegaConf.to_container(metadata, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(metadata, Mapping):
        raise TypeError(f"LoRA metadata must be a dict, got {type(metadata).__name__}")
    return json.loads(json.dumps(dict(metadata), default=str))


def _adapter_state(unet, adapter_name: str):
    from peft.utils import get_peft_model_state_dict

    configs = getattr(unet, "peft_config", None) or {}
    if adapter_name not in configs:
        raise ValueError(
            f"the UNet has no LoRA adapter {adapter_name!r} (it has {sorted(configs) or 'none'}); call add_lora first"
        )
    cfg = configs[adapter_name]
    unsupported = [n for n in ("use_dora", "use_rslora", "lora_bias") if getattr(cfg, n, False)]
    unsupported += [n for n in ("rank_pattern", "alpha_pattern") if getattr(cfg, n, None)]
    if unsupported:
        raise ValueError(f"LoRA adapter {adapter_name!r} uses {unsupported}: the export formats need one rank/alpha")
    sd = normalise_peft(get_peft_model_state_dict(unet, adapter_name=adapter_name), f"adapter {adapter_name!r}")
    out = {}
    for k, v in sd.items():
        if v.is_meta:
            raise ValueError(f"LoRA weight {k} is on the meta device: materialise the LoRA before saving")
        out[k] = v.detach().to("cpu").contiguous().clone()
    return cfg, out


def _diffusers_adapter_metadata(cfg, targets: list[str]) -> dict:
    """The LoraConfig fields diffusers' loader rebuilds the adapter from (``LoraConfig(**metadata)``)."""
    return {
        "r": int(cfg.r),
        "lora_alpha": float(cfg.lora_alpha),
        "target_modules": targets,
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_dropout": float(cfg.lora_dropout),
        "init_lora_weights": cfg.init_lora_weights,
        "use_dora": False,
        "use_rslora": False,
        "lora_bias": False,
    }


def save_lora(unet, folder, metadata: dict | None = None, adapter_name: str = "default",
              suffix: str = "") -> dict[str, Path]:
    """Write the adapter as ``lora.safetensors``, ``lora_kohya.safetensors`` and ``lora_diffsynth.ckpt``
    (``suffix`` before the extension: ``_ema`` gives ``lora_ema.safetensors`` ...).

    Each write is atomic (temp file + rename). All three carry rank, alpha, target modules, the UNet
    config and ``metadata`` (base_model_hash, dataset_hash, resolved config ...). Returns
    ``{"diffusers": path, "kohya": path, "diffsynth": path}``.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    cfg, sd = _adapter_state(unet, adapter_name)
    rank, alpha = int(cfg.r), float(cfg.lora_alpha)
    # Short names of the modules that really carry the LoRA (also right for adapters loaded with
    # exact module paths as targets).
    targets = sorted({short_target(m) for m in peft_modules(sd)})
    info = {
        "format_version": FORMAT_VERSION,
        "rank": rank,
        "alpha": alpha,
        "target_modules": targets,
        "unet_config": clean_unet_config(unet.config),
        "metadata": _jsonable(metadata),
    }
    # Convert everything first, so a conversion error leaves no file half-updated.
    index = arch_index(unet.config)
    diffsynth_sd = peft_to_diffsynth(sd, index)
    ds_targets = sorted({short_target(m) for m in peft_modules(diffsynth_sd)})
    if not set(ds_targets) <= set(COMPETITION_TARGETS):
        log.warning(
            "LoRA targets %s in DiffSynth names include modules outside the competition's load_lora() "
            "target_modules %s: those weights are ignored there", ds_targets, list(COMPETITION_TARGETS))
    files = {fmt: folder / with_suffix(name, suffix) for fmt, name in FILE_NAMES.items()}

    def header(fmt: str, extra: dict) -> dict:
        return {"format": "pt", INFO_KEY: json.dumps({**info, "format": fmt}, ensure_ascii=False), **extra}

    adapter_meta = {DIFFUSERS_PREFIX + k: v for k, v in _diffusers_adapter_metadata(cfg, targets).items()}
    with atomic_path(files["diffusers"]) as tmp:
        save_file(peft_to_diffusers(sd), str(tmp), metadata=header(
            "diffusers", {"lora_adapter_metadata": json.dumps(adapter_meta, indent=2, sort_keys=True)}))
    with atomic_path(files["kohya"]) as tmp:
        save_file(peft_to_kohya(sd, alpha), str(tmp), metadata=header(
            "kohya", {"ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
                      "ss_network_module": "networks.lora"}))
    ckpt = dict(diffsynth_sd)
    blob = json.dumps({**info, "format": "diffsynth", "diffsynth_target_modules": ds_targets},
                      ensure_ascii=False).encode("utf-8")
    ckpt[CKPT_META_PREFIX + "rank"] = torch.tensor(rank, dtype=torch.int64)
    ckpt[CKPT_META_PREFIX + "alpha"] = torch.tensor(alpha, dtype=torch.float64)
    ckpt[CKPT_META_PREFIX + "info"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()
    with atomic_path(files["diffsynth"]) as tmp:
        torch.save(ckpt, tmp)
    return files



def with_suffix(name: str, suffix: str) -> str:
    """``lora_kohya.safetensors`` + ``_ema`` -> ``lora_kohya_ema.safetensors``."""
    stem, dot, ext = name.partition(".")
    return f"{stem}{suffix}{dot}{ext}"


# ---------------------------------------------------------------------------------------------
# reading


@dataclass
class LoraFile:
    """A LoRA read from disk, in peft key names of the diffusers UNet (``<module>.lora_A.weight``)."""

    state_dict: dict[str, torch.Tensor]
    rank: int
    alpha: float
    target_modules: list[str]
    metadata: dict = field(default_factory=dict)  # the metadata given to save_lora ({} for foreign files)
    format: str = "diffusers"  # diffusers | kohya | diffsynth | diffsynth_trainer | peft
    path: Path | None = None
    alpha_source: str = "file"  # file | default_alpha argument | fallback default
    info: dict = field(default_factory=dict)  # the whole info block written by save_lora

    @property
    def modules(self) -> list[str]:
        """Full module paths of the UNet that carry this LoRA."""
        return peft_modules(self.state_dict)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def _load_tensors(path: Path) -> tuple[dict, dict]:
    """(tensors, header metadata) from a .safetensors file or a weights-only torch checkpoint."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as e:  # safetensors raises its own error types
            raise LoraFormatError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LoraFormatError(
            f"{path}: cannot be read as a plain tensor checkpoint with torch.load(weights_only=True) ({e}). "
            "Untrusted pickles are not executed; re-save the LoRA as a dict of tensors."
        ) from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # a full Lightning checkpoint
    if not isinstance(obj, Mapping):
        raise LoraFormatError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}


def _info_from(tensors: dict, header: dict, path: Path) -> dict:
    raw = header.get(INFO_KEY)
    blob = tensors.get(CKPT_META_PREFIX + "info")
    if raw is None and blob is not None:
        raw = bytes(blob.to(torch.uint8).tolist()).decode("utf-8")
    if raw is None:
        return {}
    try:
        info = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraFormatError(f"{path}: the {INFO_KEY} metadata block is not valid JSON ({e})") from e
    return info if isinstance(info, dict) else {}


def _one_value(values: dict, what: str, path: Path):
    distinct = sorted(set(values.values()))
    if len(distinct) > 1:
        raise LoraFormatError(f"{path}: modules have different {what} {distinct}; only one {what} is supported")
    return distinct[0] if distinct else None


def _to_peft(tensors: dict, space: str, config, path: Path) -> tuple[dict, dict]:
    """The LoRA weights in peft key names of the diffusers UNet, and any per-module alphas (kohya)."""
    what = str(path)
    if space == "kohya":
        ignored = sorted({"_".join(k.split("_")[:2]) for k in tensors if not k.startswith(KOHYA_PREFIX)})
        if ignored:
            log.warning("%s: ignoring non-UNet LoRA weights (%s); only the UNet LoRA is loaded", path, ignored)
        return kohya_to_peft(tensors, arch_index(config), what)
    lora = {k: v for k, v in tensors.items() if ".lora_A." in k or ".lora_B." in k}
    if space == "diffsynth":
        return diffsynth_to_peft(lora, arch_index(config), what), {}
    if space == "diffusers":
        others = sorted({k.split(".")[0] for k in lora if not k.startswith(DIFFUSERS_PREFIX)})
        if others:
            log.warning("%s: ignoring LoRA weights of %s; only the UNet LoRA is loaded", path, others)
        lora = {k[len(DIFFUSERS_PREFIX):]: v for k, v in lora.items() if k.startswith(DIFFUSERS_PREFIX)}
    elif space == "peft":  # peft names, possibly under a wrapper prefix such as PeftModel's base_model.model.
        stripped = {}
        for k, v in lora.items():
            split = strip_to_top(k, DIFFUSERS_TOP)
            if split is None:
                raise LoraFormatError(f"{path}: key {k!r} names no diffusers UNet module")
            stripped[split[1]] = v
        lora = stripped
    else:
        raise LoraFormatError(
            f"{path}: no UNet LoRA weights found (expected diffusers 'unet.*.lora_A.weight', kohya "
            f"'lora_unet_*.lora_down.weight' or DiffSynth 'blocks.*.lora_A.default.weight' keys; "
            f"first keys: {sorted(tensors)[:3]})"
        )
    return normalise_peft(lora, what), {}


def _rank(sd: dict, path: Path) -> int:
    """The rank, from the weights themselves; every module needs both halves."""
    ranks = {}
    for module in peft_modules(sd):
        a, b = sd.get(f"{module}.lora_A.weight"), sd.get(f"{module}.lora_B.weight")
        if a is None or b is None:
            raise LoraFormatError(f"{path}: module {module} has only one of lora_A/lora_B")
        if a.shape[0] != b.shape[1]:
            raise LoraFormatError(f"{path}: {module} lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} disagree")
        ranks[module] = int(a.shape[0])
    return int(_one_value(ranks, "ranks", path))


def _alpha(info: dict, header: dict, adapter_meta: dict, file_alphas: dict, default_alpha, space: str, rank: int,
           path: Path) -> tuple[float, str]:
    """(alpha, where it came from): our info block, diffusers' or kohya's metadata, the argument,
    else the fallback DiffSynth/diffusers would assume (with a warning)."""
    alpha = info.get("alpha")
    if alpha is None:
        alpha = adapter_meta.get(DIFFUSERS_PREFIX + "lora_alpha")
    if alpha is None and file_alphas:
        alpha = _one_value(file_alphas, "alphas", path)
    if alpha is None and header.get("ss_network_alpha"):
        alpha = float(header["ss_network_alpha"])
    if alpha is not None:
        return float(alpha), "file"
    if default_alpha is not None:
        return float(default_alpha), "default_alpha argument"
    # diffusers/kohya treat a missing alpha as alpha = rank; DiffSynth's trainer default is 4.0.
    alpha = DIFFSYNTH_DEFAULT_ALPHA if space == "diffsynth" else float(rank)
    log.warning(
        "%s records no LoRA alpha; using alpha=%s (%s). The strength is scale * alpha / rank: "
        "set the LoRA scale (or default_alpha) to match how it was trained.",
        path, alpha, "DiffSynth trainer default" if space == "diffsynth" else "alpha = rank")
    return float(alpha), "fallback default"


def read_lora(path, unet_config=None, default_alpha: float | None = None) -> LoraFile:
    """Read a LoRA file in any supported format into peft key names of the diffusers UNet.

    ``unet_config`` is the config of the UNet the LoRA is meant for (needed to translate kohya and
    DiffSynth names); default: the config recorded in the file, else the real Kolors UNet.
    ``default_alpha`` is used only when the file records no alpha (DiffSynth trainer checkpoints).
    """
    from kolors_story.models.configs import KOLORS_UNET_CONFIG

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"LoRA file {path} does not exist")
    tensors, header = _load_tensors(path)
    info = _info_from(tensors, header, path)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(CKPT_META_PREFIX)}
    space = detect_key_space(list(tensors))
    config = unet_config if unet_config is not None else info.get("unet_config") or KOLORS_UNET_CONFIG
    sd, file_alphas = _to_peft(tensors, space, config, path)
    rank = _rank(sd, path)
    adapter_meta = {}
    if header.get("lora_adapter_metadata"):
        try:
            adapter_meta = json.loads(header["lora_adapter_metadata"])
        except json.JSONDecodeError:
            adapter_meta = {}
    alpha, source = _alpha(info, header, adapter_meta, file_alphas, default_alpha, space, rank, path)
    targets = info.get("target_modules") or adapter_meta.get(DIFFUSERS_PREFIX + "target_modules")
    if not targets:
        targets = sorted({short_target(m) for m in peft_modules(sd)})
    return LoraFile(state_dict=sd, rank=rank, alpha=alpha, target_modules=list(targets),
                    metadata=dict(info.get("metadata") or {}),
                    format={"diffsynth": "diffsynth" if info else "diffsynth_trainer"}.get(space, space),
                    path=path, alpha_source=source, info=info)

