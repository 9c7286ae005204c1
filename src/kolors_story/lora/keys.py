"""Key names of a UNet LoRA in each file format, derived from the UNet architecture itself.

One LoRA, four key spaces (``<m>`` is a module path of the diffusers ``UNet2DConditionModel``):

- peft (what ``get_peft_model_state_dict`` returns; :class:`~kolors_story.lora.LoraFile` uses it):
  ``<m>.lora_A.weight`` / ``<m>.lora_B.weight``
- diffusers file (``KolorsPipeline.load_lora_weights``): ``unet.<m>.lora_A.weight`` ...
- kohya (ComfyUI, A1111): ``lora_unet_<m with . -> _>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``
- DiffSynth-Studio (the competition's ``load_lora`` and trainer ``.ckpt``):
  ``<d>.lora_A.default.weight`` where ``<d>`` is the same module in diffsynth's ``SDXLUNet``
  (``blocks.N. ...``, ``to_out`` instead of ``to_out.0``).

The diffusers -> DiffSynth module map is not typed by hand: it is what diffsynth's own
``SDXLUNetStateDictConverter.from_diffusers`` does to the parameter names of a UNet built from the
same config on the meta device (no weights are allocated, even for the 2.6 B-parameter Kolors UNet).
"""

from __future__ import annotations

import functools
import json

import torch

from kolors_story.errors import UserError
from kolors_story.lora.variants import KOHYA_PARAM_NAMES, PARAM_NAMES


class LoraFormatError(UserError, ValueError):
    """A LoRA file that cannot be read or does not fit the UNet; the message names file and key."""


# Top-level module names of each UNet flavour (used to recognise a key space and strip prefixes).
DIFFUSERS_TOP = (
    "down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "add_embedding", "encoder_hid_proj",
)
DIFFSYNTH_TOP = (
    "blocks", "conv_in", "conv_out", "conv_norm_out", "time_embedding", "add_time_embedding",
    "text_intermediate_proj",
)
KOHYA_PREFIX = "lora_unet_"
DIFFUSERS_PREFIX = "unet."
# The adapter name DiffSynth's trainer and the competition's load_lora() use (peft's default).
DIFFSYNTH_ADAPTER = "default"

_PRIVATE_CONFIG_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


def clean_unet_config(config) -> dict:
    """A JSON-able copy of a UNet config without diffusers' bookkeeping keys."""
    out = {}
    for k, v in dict(config).items():
        if k in _PRIVATE_CONFIG_KEYS or k.startswith("_"):
            continue
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def config_key(config) -> str:
    return json.dumps(clean_unet_config(config), sort_keys=True, default=list)


class ArchIndex:
    """Module names of one UNet architecture and their names in the other key spaces."""

    def __init__(self, weight_shapes: dict[str, tuple], param_names: list[str]):
        self.weight_shapes = weight_shapes  # diffusers module path -> shape of its .weight
        self.param_names = param_names
        # kohya module name (without the lora_unet_ prefix) -> diffusers module path
        self.kohya_names = {m.replace(".", "_"): m for m in weight_shapes}
        if len(self.kohya_names) != len(weight_shapes):
            raise LoraFormatError("two UNet modules share one kohya name; kohya keys would be ambiguous")

    @functools.cached_property
    def to_diffsynth(self) -> dict[str, str]:
        """diffusers module path -> DiffSynth SDXLUNet module path (built on first use)."""
        return _diffsynth_module_map(list(self.weight_shapes), self.param_names)

    @functools.cached_property
    def from_diffsynth(self) -> dict[str, str]:
        return {v: k for k, v in self.to_diffsynth.items()}


class _Name(str):
    """A parameter name standing in for its tensor: diffsynth's converter only calls .squeeze()."""

    def squeeze(self, *args):
        return self


def _diffsynth_module_map(modules: list[str], param_names: list[str]) -> dict[str, str]:
    """diffusers module path -> DiffSynth SDXLUNet module path, by diffsynth's own converter."""
    try:
        from diffsynth.models.sdxl_unet import SDXLUNetStateDictConverter
    except ImportError as e:  # pragma: no cover - diffsynth is a dependency
        raise LoraFormatError(f"diffsynth==1.1.9 is needed for the DiffSynth LoRA format: {e}") from e
    try:
        out = SDXLUNetStateDictConverter().from_diffusers({p: _Name(p) for p in param_names})
    except (ValueError, KeyError) as e:
        raise LoraFormatError(
            f"This UNet is not an SDXL/Kolors UNet that DiffSynth-Studio understands ({e}); "
            "the DiffSynth LoRA format cannot be used with it."
        ) from e
    renamed = out[0] if isinstance(out, tuple) else out
    param_map = {str(src): dst for dst, src in renamed.items()}
    mapping = {}
    for module in modules:
        dst = param_map.get(module + ".weight")
        if dst is None or not dst.endswith(".weight"):
            raise LoraFormatError(f"diffsynth's converter gave no name for module {module!r}")
        mapping[module] = dst[: -len(".weight")]
    if len(set(mapping.values())) != len(mapping):
        raise LoraFormatError("diffsynth's converter maps two modules of this UNet to one name")
    return mapping


@functools.lru_cache(maxsize=8)
def _arch_index_cached(config_json: str) -> ArchIndex:
    from diffusers import UNet2DConditionModel

    config = json.loads(config_json)
    with torch.device("meta"):  # names and shapes only: nothing is allocated
        unet = UNet2DConditionModel.from_config(config)
    params = dict(unet.named_parameters())
    shapes = {n[: -len(".weight")]: tuple(p.shape) for n, p in params.items() if n.endswith(".weight")}
    return ArchIndex(shapes, sorted(params))


def arch_index(unet_config) -> ArchIndex:
    """The (cached) :class:`ArchIndex` of a UNet config (``unet.config`` or a plain dict)."""
    return _arch_index_cached(config_key(unet_config))


# ---------------------------------------------------------------------------------------------
# peft key helpers


def split_lora_key(key: str) -> tuple[str, str, str]:
    """``<module>.lora_A[.<adapter>].weight`` -> (module, "lora_A"|"lora_B", "weight"|"bias")."""
    parts = key.split(".")
    for i, p in enumerate(parts):
        if p in ("lora_A", "lora_B"):
            tail = parts[i + 1 :]
            if len(tail) == 2:  # adapter name present: lora_A.default.weight
                tail = tail[1:]
            if len(tail) != 1:
                break
            return ".".join(parts[:i]), p, tail[0]
    raise LoraFormatError(f"key {key!r} is not a LoRA weight (<module>.lora_A/lora_B.weight)")


def split_adapter_key(key: str) -> tuple[str, str]:
    """Any adapter key of peft -> (module, normalised parameter): ``<m>.lora_A[.<adapter>].weight`` ->
    ``lora_A.weight``, ``<m>.lora_magnitude_vector[.<adapter>][.weight]`` / ``<m>.hada_w1_a[.<adapter>]`` ->
    the bare name."""
    parts = key.split(".")
    for i, p in enumerate(parts):
        if p in PARAM_NAMES:
            if p in ("lora_A", "lora_B"):
                module, _, kind = split_lora_key(key)
                return module, f"{p}.{kind}"
            tail = parts[i + 1 :]
            if tail and tail[-1] == "weight":
                tail = tail[:-1]
            if len(tail) > 1:
                break
            return ".".join(parts[:i]), p
    raise LoraFormatError(f"key {key!r} is not an adapter weight (LoRA/DoRA/LoHa/LoKr parameter of peft)")


def peft_modules(state_dict: dict) -> list[str]:
    return sorted({split_adapter_key(k)[0] for k in state_dict})


def by_module(state_dict: dict) -> dict[str, dict]:
    """``{module: {parameter: tensor}}`` of a normalised peft state dict."""
    out: dict[str, dict] = {}
    for k, v in state_dict.items():
        module, param = split_adapter_key(k)
        out.setdefault(module, {})[param] = v
    return out


def short_target(module: str) -> str:
    """The target_modules entry for a module path: last name, or last two when it ends in an index."""
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def normalise_peft(state_dict: dict, what: str) -> dict:
    """Drop adapter names from peft keys (``lora_A.default.weight`` -> ``lora_A.weight``)."""
    out = {}
    for k, v in state_dict.items():
        module, param = split_adapter_key(k)
        if param.endswith(".bias"):
            raise LoraFormatError(f"{what}: LoRA bias {k!r} is not supported")
        out[f"{module}.{param}"] = v
    return out


# ---------------------------------------------------------------------------------------------
# conversions between the key spaces (all take/return peft-keyed dicts on the diffusers side)


def peft_to_diffusers(state_dict: dict) -> dict:
    return {DIFFUSERS_PREFIX + k: v for k, v in state_dict.items()}


def peft_to_kohya(state_dict: dict, alphas: dict[str, float], kind: str = "lora") -> dict:
    """peft keys -> kohya/LyCORIS keys (``alphas``: module -> alpha; values already in LyCORIS' conventions)."""
    names = KOHYA_PARAM_NAMES[kind]
    out = {}
    for module, params in by_module(state_dict).items():
        prefix = KOHYA_PREFIX + module.replace(".", "_")
        for param, value in params.items():
            if param not in names:
                raise LoraFormatError(f"{module}.{param} is not a parameter of a {kind} adapter")
            out[f"{prefix}.{names[param]}"] = value
        out[f"{prefix}.alpha"] = torch.tensor(float(alphas[module]), dtype=torch.float32)
    return out


_FROM_KOHYA = {k: p for names in KOHYA_PARAM_NAMES.values() for p, k in names.items()}


def kohya_to_peft(state_dict: dict, index: ArchIndex, what: str) -> tuple[dict, dict[str, float]]:
    """kohya/LyCORIS keys -> peft keys, plus the per-module alphas found in the file."""
    out, alphas = {}, {}
    for key, value in state_dict.items():
        if not key.startswith(KOHYA_PREFIX):
            continue
        name, _, rest = key.partition(".")
        module = index.kohya_names.get(name[len(KOHYA_PREFIX) :])
        if module is None:
            raise LoraFormatError(
                f"{what}: kohya key {key!r} names no module of this UNet "
                "(a LoRA for another base model, or kohya's SGM block names which are not supported)"
            )
        if rest == "alpha":
            alphas[module] = float(value.item())
        elif rest in _FROM_KOHYA:
            out[f"{module}.{_FROM_KOHYA[rest]}"] = value
        else:
            raise LoraFormatError(f"{what}: unsupported kohya key {key!r} (LoRA lora_down/lora_up, DoRA dora_scale, "
                                  "LoHa hada_*, LoKr lokr_* and alpha are read)")
    return out, alphas


def peft_to_diffsynth(state_dict: dict, index: ArchIndex) -> dict:
    to_ds = index.to_diffsynth
    out = {}
    for k, v in state_dict.items():
        module, ab, kind = split_lora_key(k)
        if module not in to_ds:
            raise LoraFormatError(f"LoRA module {module!r} is not a module of this UNet")
        out[f"{to_ds[module]}.{ab}.{DIFFSYNTH_ADAPTER}.{kind}"] = v
    return out


def strip_to_top(key: str, tops: tuple[str, ...]) -> tuple[str, str] | None:
    """Split ``key`` into (prefix, rest) where rest starts at the first top-level UNet module name."""
    parts = key.split(".")
    for i, p in enumerate(parts):
        if p in tops:
            return ".".join(parts[:i]), ".".join(parts[i:])
    return None


def diffsynth_to_peft(state_dict: dict, index: ArchIndex, what: str) -> dict:
    """DiffSynth keys (optionally under one module prefix, e.g. ``pipe.unet.``) -> peft keys."""
    from_ds = index.from_diffsynth
    out, prefixes = {}, set()
    for key, value in state_dict.items():
        split = strip_to_top(key, DIFFSYNTH_TOP)
        if split is None:
            raise LoraFormatError(f"{what}: key {key!r} is not a DiffSynth UNet LoRA key")
        prefix, rest = split
        prefixes.add(prefix)
        module, ab, kind = split_lora_key(rest)
        if module not in from_ds:
            raise LoraFormatError(
                f"{what}: {key!r} names no module of this UNet (made for another base model?)"
            )
        out[f"{from_ds[module]}.{ab}.{kind}"] = value
    if len(prefixes) > 1:
        raise LoraFormatError(f"{what}: LoRA keys sit under several module prefixes {sorted(prefixes)}")
    return normalise_peft(out, what)


def is_adapter_key(key: str) -> bool:
    """A LoRA/DoRA/LoHa/LoKr weight of peft (any key space but kohya's)."""
    return any(part in PARAM_NAMES for part in key.split("."))


def detect_key_space(keys: list[str]) -> str:
    """'kohya', 'diffusers' (unet.-prefixed), 'peft' (bare diffusers names) or 'diffsynth'."""
    lora_keys = [k for k in keys if is_adapter_key(k) or k.startswith(KOHYA_PREFIX)]
    if not lora_keys:
        return "none"
    if any(k.startswith(KOHYA_PREFIX) for k in lora_keys):
        return "kohya"
    if any(k.startswith(DIFFUSERS_PREFIX) for k in lora_keys):
        return "diffusers"
    if any(strip_to_top(k, ("down_blocks", "mid_block", "up_blocks")) for k in lora_keys):
        return "peft"  # diffusers module names, bare or under a wrapper prefix
    if any(strip_to_top(k, ("blocks",)) for k in lora_keys):
        return "diffsynth"
    if all(strip_to_top(k, DIFFUSERS_TOP) for k in lora_keys):
        return "peft"
    return "unknown"


def check_shapes(state_dict: dict, index: ArchIndex, what: str) -> None:
    """Every adapter module exists in the UNet and the weights that show its size fit the module's weight
    (LoRA/DoRA A, B and magnitude, LoHa factors; a LoKr's Kronecker factors are checked when loaded)."""
    for k, v in state_dict.items():
        module, param = split_adapter_key(k)
        shape = index.weight_shapes.get(module)
        if shape is None:
            raise LoraFormatError(f"{what}: LoRA module {module!r} is not in this UNet (another base model?)")
        fan_in = int(torch.Size(shape[1:]).numel())
        expected = {"lora_A.weight": (1, shape[1]), "lora_B.weight": (0, shape[0]), "hada_w1_a": (0, shape[0]),
                    "hada_w2_a": (0, shape[0]), "hada_w1_b": (1, fan_in), "hada_w2_b": (1, fan_in)}.get(param)
        ok = expected is None or (v.dim() > expected[0] and v.shape[expected[0]] == expected[1])
        if param in ("hada_w1_b", "hada_w2_b"):  # flattened, or per input channel with a Tucker core
            ok = v.dim() == 2 and v.shape[1] in (fan_in, shape[1])
        if param == "lora_magnitude_vector":
            ok = v.numel() == shape[0]
        if not ok:
            raise LoraFormatError(
                f"{what}: {k} has shape {tuple(v.shape)} but the UNet's {module}.weight is {shape}: "
                "the LoRA was made for a different base model"
            )
