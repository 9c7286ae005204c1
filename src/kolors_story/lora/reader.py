"""Reading any LoRA file back: the three formats :func:`~kolors_story.lora.files.save_lora` writes
(every adapter type), plain peft state dicts, kohya/LyCORIS files from other trainers, and the
competition trainer's ``epoch=..-step=..ckpt`` (DiffSynth names, possibly under a module prefix or
inside a Lightning ``state_dict``). Such trainer files carry no alpha: it falls back to
``default_alpha`` or the DiffSynth trainer's default (4.0), with a warning.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from kolors_story.errors import MissingFileError
from kolors_story.lora.files import (
    CKPT_META_PREFIX,
    DIFFSYNTH_DEFAULT_ALPHA,
    INFO_KEY,
    LoraFile,
)
from kolors_story.lora.keys import (
    DIFFUSERS_PREFIX,
    DIFFUSERS_TOP,
    KOHYA_PREFIX,
    LoraFormatError,
    arch_index,
    by_module,
    detect_key_space,
    diffsynth_to_peft,
    is_adapter_key,
    kohya_to_peft,
    normalise_peft,
    peft_modules,
    short_target,
    strip_to_top,
)
from kolors_story.lora.variants import (
    adapter_type,
    from_lycoris_values,
    full_lokr_rank,
    is_full_lokr,
    module_rank,
)

log = logging.getLogger(__name__)


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
    except Exception:  # noqa: BLE001 - torch's own text advises weights_only=False: never repeated here
        raise LoraFormatError(
            f"{path}: not a plain tensor file: it holds pickled Python objects, which the safe loader "
            "(torch.load with weights_only=True) refuses, and a file you did not write is never unpickled here. "
            "If you trust it, convert it once on your own machine: load it in Python and save its tensors with "
            "safetensors.torch.save_file(...) as a .safetensors file"
        ) from None
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


def _from_kohya(tensors: dict, config, what: str) -> tuple[dict, dict]:
    ignored = sorted({"_".join(k.split("_")[:2]) for k in tensors if not k.startswith(KOHYA_PREFIX)})
    if ignored:
        log.warning("%s: ignoring non-UNet LoRA weights (%s); only the UNet LoRA is loaded", what, ignored)
    index = arch_index(config)
    sd, alphas = kohya_to_peft(tensors, index, what)
    out = {}
    for module, params in by_module(sd).items():
        dims = len(index.weight_shapes[module])
        out.update({f"{module}.{p}": v for p, v in from_lycoris_values(params, dims).items()})
    return out, alphas


def _to_peft(tensors: dict, space: str, config, path: Path) -> tuple[dict, dict]:
    """The adapter weights in peft key names of the diffusers UNet, and any per-module alphas (kohya)."""
    what = str(path)
    if space == "kohya":
        return _from_kohya(tensors, config, what)
    lora = {k: v for k, v in tensors.items() if is_adapter_key(k)}
    if space == "diffsynth":
        lora = {k: v for k, v in lora.items() if ".lora_A." in k or ".lora_B." in k}
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


def _module_ranks(modules: dict, info: dict, path: Path) -> dict[str, int]:
    """Each module's rank from its weights (a LoRA needs both halves, agreeing). A LoKr with two full
    factors shows no rank: the recorded one when it rebuilds the same shapes, else the smallest that does."""
    ranks = {}
    for module, params in modules.items():
        a, b = params.get("lora_A.weight"), params.get("lora_B.weight")
        if (a is None) != (b is None):
            raise LoraFormatError(f"{path}: module {module} has only one of lora_A/lora_B")
        if a is not None and a.shape[0] != b.shape[1]:
            raise LoraFormatError(f"{path}: {module} lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} disagree")
        rank = module_rank(params)
        if rank is None:
            if not is_full_lokr(params):
                raise LoraFormatError(f"{path}: module {module} has adapter weights {sorted(params)} of no known type")
            recorded = (info.get("rank_pattern") or {}).get(module, info.get("rank"))
            least = full_lokr_rank(params)
            rank = int(recorded) if recorded is not None and int(recorded) >= least else least
        ranks[module] = int(rank)
    return ranks


def _base_alpha(info: dict, header: dict, adapter_meta: dict, file_alphas: dict, default_alpha, space: str,
                rank: int, path: Path) -> tuple[float, str]:
    """(alpha, where it came from): our info block, diffusers' or kohya's metadata, the argument,
    else the fallback DiffSynth/diffusers would assume (with a warning)."""
    alpha = info.get("alpha")
    if alpha is None:
        alpha = adapter_meta.get(DIFFUSERS_PREFIX + "lora_alpha")
    if alpha is None and file_alphas:
        alpha = Counter(file_alphas.values()).most_common(1)[0][0]
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


def _module_alphas(modules: dict, ranks: dict, base: float, info: dict, adapter_meta: dict, file_alphas: dict,
                   space: str) -> dict[str, float]:
    """Each module's alpha: the kohya file's own, else the recorded pattern, else the base alpha.
    A full LoKr read from a LyCORIS file has its scale baked into lokr_w1: alpha = rank (scale 1)."""
    pattern = info.get("alpha_pattern") or adapter_meta.get(DIFFUSERS_PREFIX + "alpha_pattern") or {}
    alphas = {}
    for module, params in modules.items():
        if space == "kohya" and is_full_lokr(params):
            alphas[module] = float(ranks[module])
        else:
            alphas[module] = float(file_alphas.get(module, pattern.get(module, base)))
    return alphas


def _main(values: dict, preferred=None):
    """The value most modules share (``preferred`` when some module has it): the rest becomes a pattern."""
    if preferred is not None and preferred in values.values():
        return preferred
    return Counter(values.values()).most_common(1)[0][0] if values else preferred


def _adapter_metadata(header: dict) -> dict:
    try:
        return json.loads(header.get("lora_adapter_metadata") or "{}")
    except json.JSONDecodeError:
        return {}


def read_lora(path, unet_config=None, default_alpha: float | None = None) -> LoraFile:
    """Read a LoRA file in any supported format into peft key names of the diffusers UNet.

    ``unet_config`` is the config of the UNet the LoRA is meant for (needed to translate kohya and
    DiffSynth names); default: the config recorded in the file, else the real Kolors UNet.
    ``default_alpha`` is used only when the file records no alpha (DiffSynth trainer checkpoints).
    """
    from kolors_story.models.architectures import KOLORS_UNET_CONFIG

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"LoRA file {path} does not exist")
    tensors, header = _load_tensors(path)
    info = _info_from(tensors, header, path)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(CKPT_META_PREFIX)}
    space = detect_key_space(list(tensors))
    config = unet_config if unet_config is not None else info.get("unet_config") or KOLORS_UNET_CONFIG
    sd, file_alphas = _to_peft(tensors, space, config, path)
    modules = by_module(sd)
    ranks = _module_ranks(modules, info, path)
    rank = int(_main(ranks, info.get("rank")))
    adapter_meta = _adapter_metadata(header)
    base, source = _base_alpha(info, header, adapter_meta, file_alphas, default_alpha, space, rank, path)
    alphas = _module_alphas(modules, ranks, base, info, adapter_meta, file_alphas, space)
    alpha = float(_main(alphas, base))
    targets = info.get("target_modules") or adapter_meta.get(DIFFUSERS_PREFIX + "target_modules")
    if not targets:
        targets = sorted({short_target(m) for m in peft_modules(sd)})
    return LoraFile(state_dict=sd, rank=rank, alpha=alpha, target_modules=list(targets),
                    metadata=dict(info.get("metadata") or {}),
                    format={"diffsynth": "diffsynth" if info else "diffsynth_trainer"}.get(space, space),
                    path=path, alpha_source=source, info=info, type=adapter_type(modules),
                    rank_pattern={m: r for m, r in ranks.items() if r != rank},
                    alpha_pattern={m: a for m, a in alphas.items() if a != alpha},
                    decompose_both=any("lokr_w1_a" in p for p in modules.values()))

