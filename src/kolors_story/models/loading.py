"""Load a Kolors pipeline component by component from either release layout, and name a model.

Layouts understood (see ARCHITECTURE.md):
- ``Kwai-Kolors/Kolors``: text_encoder/ holds the ChatGLM3 weights *and* the tokenizer files,
  plus unet/, vae/, scheduler/ (the ``.bin`` shards of the text encoder are read with
  ``weights_only`` loading by transformers).
- ``Kolors-diffusers``: the same plus model_index.json and a separate tokenizer/ folder, with
  ``.fp16`` weight variants.
An optional separate VAE (``sdxl-vae-fp16-fix``: the stock SDXL VAE overflows in fp16) replaces vae/.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kolors_story.config import ModelSettings
from kolors_story.errors import SettingsError, UserError
from kolors_story.models.quantization import check_text_encoder_quant, finish_quantized, loading_kwargs

DOWNLOAD_HINT = "Download the weights with `python -m kolors_story.download` (or run with model=tiny)."

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


class ModelLoadError(UserError, RuntimeError):
    """The model folder is missing parts; the message lists each missing component and path."""


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def to_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise SettingsError(f"model.dtype={name!r} is not a dtype; use one of {sorted(DTYPES)}") from None


@dataclass(frozen=True)
class KolorsLayout:
    """Where each component of a Kolors release lives on disk."""

    root: Path
    unet: Path
    vae: Path
    vae_file: Path | None  # a single .safetensors file for the VAE (fp16-fix given as a file)
    text_encoder: Path
    tokenizer: Path
    scheduler: Path
    kind: str  # "kolors" or "diffusers"


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(
        p.name.endswith(WEIGHT_SUFFIXES) for p in folder.iterdir() if p.is_file()
    )


def _variant(folder: Path, stem: str = "diffusion_pytorch_model") -> str | None:
    """'fp16' when the folder only has the fp16 variant file, as Kolors-diffusers ships."""
    if (folder / f"{stem}.safetensors").exists() or (folder / f"{stem}.bin").exists():
        return None
    if (folder / f"{stem}.fp16.safetensors").exists() or (folder / f"{stem}.fp16.bin").exists():
        return "fp16"
    return None


def resolve_layout(path: str | Path, vae_path: str | Path | None = None) -> KolorsLayout:
    """Find every component or raise one ModelLoadError naming all that are missing."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelLoadError(f"Kolors model folder {root} does not exist. {DOWNLOAD_HINT}")
    kind = "diffusers" if (root / "model_index.json").exists() else "kolors"
    tokenizer = root / "tokenizer"
    if not all((tokenizer / f).exists() for f in TOKENIZER_FILES):
        tokenizer = root / "text_encoder"  # the Kwai-Kolors/Kolors layout keeps it here

    vae_file = None
    if vae_path is not None:
        vae = Path(vae_path).expanduser()
        if vae.is_file():
            vae_file, vae = vae, vae.parent
    else:
        vae = root / "vae"

    missing = []
    checks = [
        ("unet", root / "unet", lambda p: (p / "config.json").exists() and _has_weights(p)),
        ("text_encoder", root / "text_encoder", lambda p: (p / "config.json").exists() and _has_weights(p)),
        ("tokenizer", tokenizer, lambda p: all((p / f).exists() for f in TOKENIZER_FILES)),
        ("scheduler", root / "scheduler", lambda p: (p / "scheduler_config.json").exists()),
    ]
    if vae_file is None:
        checks.append(("vae", vae, lambda p: (p / "config.json").exists() and _has_weights(p)))
    elif not (vae / "config.json").exists() and not (root / "vae" / "config.json").exists():
        missing.append(f"  - vae config: neither {vae / 'config.json'} nor {root / 'vae' / 'config.json'}")
    for name, folder, ok in checks:
        if not ok(folder):
            what = {
                "tokenizer": f"{', '.join(TOKENIZER_FILES)} in {root / 'tokenizer'} or {root / 'text_encoder'}",
                "scheduler": f"{folder / 'scheduler_config.json'}",
            }.get(name, f"config.json + weights ({'/'.join(WEIGHT_SUFFIXES)}) in {folder}")
            missing.append(f"  - {name}: {what}")
    if missing:
        raise ModelLoadError(
            f"Kolors model at {root} is incomplete; missing:\n" + "\n".join(missing) + f"\n{DOWNLOAD_HINT}"
        )
    return KolorsLayout(
        root=root,
        unet=root / "unet",
        vae=vae,
        vae_file=vae_file,
        text_encoder=root / "text_encoder",
        tokenizer=tokenizer,
        scheduler=root / "scheduler",
        kind=kind,
    )


def load_tokenizer(layout: KolorsLayout):
    from diffusers.pipelines.kolors import ChatGLMTokenizer

    return ChatGLMTokenizer.from_pretrained(str(layout.tokenizer))


def load_text_encoder(layout: KolorsLayout, dtype: torch.dtype, quant: str = "none", device=None):
    """ChatGLM3 in ``dtype``, its weights quantized by ``quant`` (``models.quantization``; a scheme
    that cannot run on ``device`` is refused before any weight is read)."""
    from diffusers.pipelines.kolors import ChatGLMModel

    check_text_encoder_quant(quant, str(device or "cpu"))
    # Loaded straight into the target dtype (no fp32 upcast copy: that is where peak memory goes).
    model = as_prompt_encoder(ChatGLMModel.from_pretrained(str(layout.text_encoder), dtype=dtype,
                                                         **loading_kwargs(quant, dtype, device)))
    return model if quant == "none" else finish_quantized(model)


def as_prompt_encoder(model):
    """ChatGLM3 as prompt encoding uses it, every output unchanged:

    - without its language-model head (``output_layer``, 0.53 GB in fp16): ``encode_prompt`` reads
      hidden states, never logits;
    - keeping only the two hidden states ``encode_prompt`` reads (the last block's input and output)
      when it asks for all of them: the other 27 would be held to the end of the call, 0.45 GB in
      fp16 for 8 prompts of 256 tokens, and no KV cache is built.

    The plan counts the same model (``plan.count.meta_model``)."""
    model.output_layer = None
    last = model.encoder.layers[-1]
    kept: dict = {}  # this call's: whether all states were asked for, and the two kept

    def ask_for_less(module, args, kwargs):
        kept.clear()  # nothing left from a call that raised
        if kwargs.get("output_hidden_states"):
            kept["wanted"] = True
            return args, {**kwargs, "output_hidden_states": False, "use_cache": False}
        return None

    def keep_input(module, args, kwargs):
        if kept.get("wanted"):
            kept["penultimate"] = args[0] if args else kwargs["hidden_states"]

    def keep_output(module, args, output):
        if kept.get("wanted"):
            kept["last"] = output[0]

    def hand_back(module, args, kwargs, output):
        if not kept.pop("wanted", False):
            return None
        # encode_prompt indexes [-2] and [-1]; the other places stay None (a read of them fails loudly)
        states = (None,) * (len(model.encoder.layers) - 1) + (kept.pop("penultimate"), kept.pop("last"))
        if isinstance(output, tuple):  # return_dict=False: (last_hidden_state, all_hidden_states)
            return (output[0], states)
        output.hidden_states = states
        return output

    model.register_forward_pre_hook(ask_for_less, with_kwargs=True)
    model.register_forward_hook(hand_back, with_kwargs=True)
    last.register_forward_pre_hook(keep_input, with_kwargs=True)
    last.register_forward_hook(keep_output)
    return model


def load_unet(layout: KolorsLayout, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(
        str(layout.unet), torch_dtype=dtype, variant=_variant(layout.unet)
    )


def load_vae(layout: KolorsLayout, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    if layout.vae_file is not None:
        config = layout.vae / "config.json"
        if not config.exists():
            config = layout.root / "vae" / "config.json"
        return AutoencoderKL.from_single_file(
            str(layout.vae_file), config=str(config.parent), torch_dtype=dtype
        )
    return AutoencoderKL.from_pretrained(str(layout.vae), torch_dtype=dtype, variant=_variant(layout.vae))


def load_scheduler(layout: KolorsLayout):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_pretrained(str(layout.scheduler))


def load_pipeline(
    path: str | Path,
    vae_path: str | Path | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    text_encoder: bool = True,
    text_encoder_quant: str = "none",
    quantize_on: str | torch.device | None = None,
    vae: bool = True,
):
    """Build a ``KolorsPipeline`` from a Kolors folder (either layout) and an optional separate VAE.

    ``text_encoder=False`` leaves the ChatGLM encoder out (it is the largest part; training from
    cached embeddings never needs it): the pipeline then only accepts precomputed embeddings.
    ``text_encoder_quant``: ChatGLM3's weights in int8 or nf4 (``models.quantization``), quantized
    on ``quantize_on`` (default ``device``; the GPU when the pipeline is loaded on the CPU to offload).
    ``vae=False`` leaves the VAE out (training that renders nothing).
    """
    from diffusers import KolorsPipeline

    layout = resolve_layout(path, vae_path)
    torch_dtype = to_dtype(dtype)
    quantize_on = quantize_on or device
    if text_encoder:
        check_text_encoder_quant(text_encoder_quant, str(quantize_on))  # before the VAE loads
    pipe = KolorsPipeline(
        vae=load_vae(layout, torch_dtype) if vae else None,
        text_encoder=load_text_encoder(layout, torch_dtype, text_encoder_quant, quantize_on) if text_encoder else None,
        tokenizer=load_tokenizer(layout),
        unet=load_unet(layout, torch_dtype),
        scheduler=load_scheduler(layout),
        force_zeros_for_empty_prompt=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


FINGERPRINT_CHUNK = 1 << 20


def file_fingerprint(path: str | Path) -> str:
    """Size + hash of the first, middle and last MiB: cheap on multi-GB weights, yet different
    for two checkpoints of the same architecture (whose names and sizes are identical)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, size // 2 - FINGERPRINT_CHUNK // 2), max(0, size - FINGERPRINT_CHUNK)}):
            f.seek(offset)
            h.update(f.read(FINGERPRINT_CHUNK))
    return h.hexdigest()


def component_files(layout: KolorsLayout, component: str) -> list[Path]:
    """The config + weight files that define one component (``vae`` honours a separate VAE file)."""
    if component == "vae" and layout.vae_file is not None:
        config = layout.vae / "config.json"
        return [layout.vae_file, config if config.exists() else layout.root / "vae" / "config.json"]
    folder = {"unet": layout.unet, "vae": layout.vae, "text_encoder": layout.text_encoder,
              "scheduler": layout.scheduler}[component]
    files = [p for p in sorted(folder.iterdir())
             if p.is_file() and (p.suffix == ".json" or p.name.endswith(WEIGHT_SUFFIXES))]
    if component == "text_encoder":
        files += [layout.tokenizer / name for name in TOKENIZER_FILES]
    return files


def model_hash(path: str | Path, vae_path: str | Path | None = None) -> str:
    """A short identity of a model: configs plus a sampled fingerprint of every weight file.

    Weights are multi-GB, so not every byte is read; names, sizes and three 1 MiB samples per file
    tell apart any two releases or fine-tunes, which is what caches and manifests need.
    """
    layout = resolve_layout(path, vae_path)
    h = hashlib.sha256()
    for component in ("unet", "vae", "text_encoder", "scheduler"):
        for f in component_files(layout, component):
            h.update(f"{component}/{file_fingerprint(f)}\n".encode())
    return h.hexdigest()[:16]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def model_configs(model: ModelSettings) -> dict[str, dict]:
    """The UNet and VAE ``config.json`` of ``model`` (a stand-in is built first): what checks
    need before any weight is loaded. A missing or partial folder raises :class:`ModelLoadError`."""
    layout = resolve_layout(ensure_model(model), model.vae_path)
    vae = layout.vae / "config.json"
    if not vae.exists():
        vae = layout.root / "vae" / "config.json"
    return {"unet": read_json(layout.unet / "config.json"), "vae": read_json(vae)}


def ensure_model(model: ModelSettings) -> Path:
    """The model folder of ``model``; a stand-in (``model=tiny``) is built there first."""
    from kolors_story import tiny

    return tiny.provide_model(model)


def run_device(pipe) -> torch.device:
    """Where latents and embeddings must go: the UNet's device, or the pipeline's execution device
    when offload hooks move the UNet on use (it may sit on the CPU or the meta device in between)."""
    unet = getattr(pipe, "unet", None)
    if unet is None:
        return torch.device(pipe._execution_device)
    device = unet.device
    if device.type == "meta" or hasattr(unet, "_hf_hook"):
        return torch.device(pipe._execution_device)
    return device


def component_fingerprint(layout: KolorsLayout, part: str) -> str:
    """Identity of the files that produce a cache part: ``vae`` (latents) or ``text`` (embeddings),
    so a new text encoder does not invalidate latents and a new VAE does not invalidate embeddings."""
    if part not in ("vae", "text"):
        raise ValueError(f"part={part!r}: use 'vae' or 'text'")
    files = component_files(layout, "vae" if part == "vae" else "text_encoder")
    h = hashlib.sha256()
    for f in files:
        h.update(file_fingerprint(f).encode())
    return h.hexdigest()[:16]
