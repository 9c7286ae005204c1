"""LoRA on the Kolors UNet (peft through diffusers), its three export formats, and loading them back.

Every checkpoint is written three times, each file self-describing (rank, alpha, target modules,
the UNet config it was made for, and the caller's metadata such as base-model and dataset hashes):

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
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kolors_story.io import file_sha256
from kolors_story.io import atomic_path
from kolors_story.lora_formats import (
    DIFFUSERS_PREFIX,
    DIFFUSERS_TOP,
    KOHYA_PREFIX,
    LoraFormatError,
    arch_index,
    check_shapes,
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

__all__ = [
    "DEFAULT_TARGETS",
    "FILE_NAMES",
    "LoraFile",
    "LoraFormatError",
    "add_lora",
    "add_lora_from_config",
    "file_sha256",
    "load_lora_into_pipeline",
    "lora_scales",
    "read_lora",
    "save_lora",
    "set_lora_scales",
]

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
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
# lora.init values -> peft's init_lora_weights ("kaiming" is what DiffSynth calls peft's default).
INIT_CHOICES = {"gaussian": "gaussian", "default": True, "kaiming": True}


# ---------------------------------------------------------------------------------------------
# adding a LoRA for training


def _peft_init(init) -> str | bool:
    if init is True:
        return True
    key = str(init).lower()
    if key not in INIT_CHOICES:
        raise ValueError(f"lora.init={init!r} is not supported; use one of {sorted(INIT_CHOICES)}")
    return INIT_CHOICES[key]


def add_lora(unet, rank: int, alpha: float, target_modules=DEFAULT_TARGETS, init="gaussian",
             dropout: float = 0.0, adapter_name: str = "default"):
    """Add a peft LoRA adapter to ``unet`` (``unet.add_adapter(LoraConfig(...))``) and make only it trainable.

    Returns the UNet. ``init="gaussian"`` (DiffSynth/baseline) draws lora_A from N(0, 1/rank);
    lora_B starts at zero in every init, so a fresh LoRA does not change the output.
    """
    from peft import LoraConfig

    rank, alpha, dropout = int(rank), float(alpha), float(dropout)
    if rank < 1:
        raise ValueError(f"lora.rank={rank}: must be >= 1")
    if alpha <= 0:
        raise ValueError(f"lora.alpha={alpha}: must be > 0")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora.dropout={dropout}: must be in [0, 1)")
    targets = [str(t) for t in ([target_modules] if isinstance(target_modules, str) else target_modules)]
    if not targets:
        raise ValueError("lora.target_modules is empty; e.g. [to_q, to_k, to_v, to_out.0]")
    if adapter_name in (getattr(unet, "peft_config", None) or {}):
        raise ValueError(f"the UNet already has a LoRA adapter named {adapter_name!r}")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                        init_lora_weights=_peft_init(init), lora_dropout=dropout)
    try:
        unet.add_adapter(config, adapter_name=adapter_name)
    except ValueError as e:
        if "not found" in str(e) or "Target module" in str(e):
            raise ValueError(f"lora.target_modules={targets} does not fit this UNet: {e}") from e
        raise
    # Train only this adapter: the base UNet (and any other adapter) stays frozen.
    marker = f".{adapter_name}."
    for name, p in unet.named_parameters():
        p.requires_grad_((".lora_A" in name or ".lora_B" in name) and marker in name)
    return unet


def add_lora_from_config(unet, lora_cfg, adapter_name: str = "default"):
    """``add_lora`` driven by the ``lora`` config group (rank, alpha, target_modules, init, dropout)."""
    get = lora_cfg.get if hasattr(lora_cfg, "get") else lambda k, d=None: getattr(lora_cfg, k, d)
    return add_lora(
        unet,
        rank=get("rank"),
        alpha=get("alpha"),
        target_modules=list(get("target_modules", DEFAULT_TARGETS)),
        init=get("init", "gaussian"),
        dropout=get("dropout", 0.0),
        adapter_name=adapter_name,
    )


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


def save_lora(unet, folder, metadata: dict | None = None, adapter_name: str = "default") -> dict[str, Path]:
    """Write the adapter as ``lora.safetensors``, ``lora_kohya.safetensors`` and ``lora_diffsynth.ckpt``.

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
    files = {fmt: folder / name for fmt, name in FILE_NAMES.items()}

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


def read_lora(path, unet_config=None, default_alpha: float | None = None) -> LoraFile:
    """Read a LoRA file in any supported format into peft key names of the diffusers UNet.

    ``unet_config`` is the config of the UNet the LoRA is meant for (needed to translate kohya and
    DiffSynth names); default: the config recorded in the file, else the real Kolors UNet.
    ``default_alpha`` is used only when the file records no alpha (DiffSynth trainer checkpoints).
    """
    from kolors_story.tiny import KOLORS_UNET_CONFIG

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    tensors, header = _load_tensors(path)
    info = _info_from(tensors, header, path)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(CKPT_META_PREFIX)}
    space = detect_key_space(list(tensors))
    what = str(path)
    config = unet_config if unet_config is not None else info.get("unet_config") or KOLORS_UNET_CONFIG
    file_alphas: dict = {}
    if space == "kohya":
        ignored = sorted({"_".join(k.split("_")[:2]) for k in tensors if not k.startswith(KOHYA_PREFIX)})
        if ignored:
            log.warning("%s: ignoring non-UNet LoRA weights (%s); only the UNet LoRA is loaded", path, ignored)
        sd, file_alphas = kohya_to_peft(tensors, arch_index(config), what)
    elif space in ("diffusers", "peft"):
        lora = {k: v for k, v in tensors.items() if ".lora_A." in k or ".lora_B." in k}
        if space == "diffusers":
            others = sorted({k.split(".")[0] for k in lora if not k.startswith(DIFFUSERS_PREFIX)})
            if others:
                log.warning("%s: ignoring LoRA weights of %s; only the UNet LoRA is loaded", path, others)
            lora = {k[len(DIFFUSERS_PREFIX):]: v for k, v in lora.items() if k.startswith(DIFFUSERS_PREFIX)}
        else:  # peft names, possibly under a wrapper prefix such as PeftModel's base_model.model.
            stripped = {}
            for k, v in lora.items():
                split = strip_to_top(k, DIFFUSERS_TOP)
                if split is None:
                    raise LoraFormatError(f"{path}: key {k!r} names no diffusers UNet module")
                stripped[split[1]] = v
            lora = stripped
        sd = normalise_peft(lora, what)
    elif space == "diffsynth":
        lora = {k: v for k, v in tensors.items() if ".lora_A." in k or ".lora_B." in k}
        sd = diffsynth_to_peft(lora, arch_index(config), what)
    else:
        raise LoraFormatError(
            f"{path}: no UNet LoRA weights found (expected diffusers 'unet.*.lora_A.weight', kohya "
            f"'lora_unet_*.lora_down.weight' or DiffSynth 'blocks.*.lora_A.default.weight' keys; "
            f"first keys: {sorted(tensors)[:3]})"
        )
    fmt = {"diffsynth": "diffsynth" if info else "diffsynth_trainer"}.get(space, space)

    # rank: from the weights themselves; every module needs both halves.
    ranks = {}
    for module in peft_modules(sd):
        a, b = sd.get(f"{module}.lora_A.weight"), sd.get(f"{module}.lora_B.weight")
        if a is None or b is None:
            raise LoraFormatError(f"{path}: module {module} has only one of lora_A/lora_B")
        if a.shape[0] != b.shape[1]:
            raise LoraFormatError(f"{path}: {module} lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} disagree")
        ranks[module] = int(a.shape[0])
    rank = _one_value(ranks, "ranks", path)

    adapter_meta = {}
    if header.get("lora_adapter_metadata"):
        try:
            adapter_meta = json.loads(header["lora_adapter_metadata"])
        except json.JSONDecodeError:
            adapter_meta = {}
    alpha, source = info.get("alpha"), "file"
    if alpha is None:
        alpha = adapter_meta.get(DIFFUSERS_PREFIX + "lora_alpha")
    if alpha is None and file_alphas:
        alpha = _one_value(file_alphas, "alphas", path)
    if alpha is None and header.get("ss_network_alpha"):
        alpha = float(header["ss_network_alpha"])
    if alpha is None:
        if default_alpha is not None:
            alpha, source = float(default_alpha), "default_alpha argument"
        else:
            # diffusers/kohya treat a missing alpha as alpha = rank; DiffSynth's trainer default is 4.0.
            alpha = DIFFSYNTH_DEFAULT_ALPHA if space == "diffsynth" else float(rank)
            source = "fallback default"
            log.warning(
                "%s records no LoRA alpha; using alpha=%s (%s). The strength is scale * alpha / rank: "
                "set the LoRA scale (or default_alpha) to match how it was trained.",
                path, alpha, "DiffSynth trainer default" if space == "diffsynth" else "alpha = rank")

    targets = info.get("target_modules") or adapter_meta.get(DIFFUSERS_PREFIX + "target_modules")
    if not targets:
        targets = sorted({short_target(m) for m in peft_modules(sd)})
    return LoraFile(
        state_dict=sd,
        rank=int(rank),
        alpha=float(alpha),
        target_modules=list(targets),
        metadata=dict(info.get("metadata") or {}),
        format=fmt,
        path=path,
        alpha_source=source,
        info=info,
    )


# ---------------------------------------------------------------------------------------------
# loading into a pipeline, stacking, scales


def _unet_of(pipe_or_unet):
    return getattr(pipe_or_unet, "unet", pipe_or_unet)


def lora_scales(pipe_or_unet) -> dict[str, float]:
    """The active adapters of the UNet and their strengths (``scale`` of load_lora_into_pipeline)."""
    from peft.tuners.lora import LoraLayer

    unet = _unet_of(pipe_or_unet)
    active = list(unet.active_adapters()) if getattr(unet, "peft_config", None) else []
    scales = {}
    for name in active:
        for m in unet.modules():
            if isinstance(m, LoraLayer) and name in m.scaling and m.lora_alpha.get(name):
                scales[name] = float(m.scaling[name] * m.r[name] / m.lora_alpha[name])
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
        raise ValueError(f"no LoRA adapter named {missing} on this UNet (it has {sorted(unet.peft_config)})")
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
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    unet = _unet_of(pipe)
    lf = path if isinstance(path, LoraFile) else read_lora(path, unet_config=unet.config, default_alpha=default_alpha)
    what = str(lf.path or "LoRA")
    check_shapes(lf.state_dict, arch_index(unet.config), what)
    existing = getattr(unet, "peft_config", None) or {}
    if adapter_name is None:
        adapter_name = _adapter_name_for(unet, lf.path)
    elif adapter_name in existing:
        raise ValueError(f"a LoRA adapter named {adapter_name!r} is already loaded; pick another adapter_name")
    if "." in adapter_name:
        raise ValueError(f"adapter_name={adapter_name!r} must not contain '.'")
    previous = lora_scales(unet) if existing else {}

    # Exact module paths as targets: the adapter lands on precisely the modules the file has weights for.
    config = LoraConfig(r=lf.rank, lora_alpha=lf.alpha, target_modules=lf.modules, init_lora_weights=False)
    unet.add_adapter(config, adapter_name=adapter_name)
    result = set_peft_model_state_dict(unet, lf.state_dict, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if ".lora_" in k]
    missing = [k for k in getattr(result, "missing_keys", []) if f".{adapter_name}." in k and ".lora_" in k]
    if unexpected or missing:
        unet.delete_adapters(adapter_name)
        raise LoraFormatError(f"{what}: LoRA keys did not land (unexpected {unexpected[:3]}, missing {missing[:3]})")
    set_lora_scales(unet, {**previous, adapter_name: float(scale)})
    log.info("Loaded LoRA %s (%s, rank %d, alpha %g) as %r at scale %g",
             what, lf.format, lf.rank, lf.alpha, adapter_name, scale)
    return adapter_name


