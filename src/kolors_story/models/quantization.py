"""ChatGLM3 with quantized weights (``model.text_encoder_quant``): which library runs each scheme,
where it can run, the one-line refusal before anything loads, and what its weights cost.

- ``none``: the release's weights in ``model.dtype`` (12.0 GB for ChatGLM3-6B in fp16, without its LM head).
- ``int8``: torchao's int8 weight-only quantization (``Int8WeightOnlyConfig``: one float32 scale per
  output row) through transformers' ``quantization_config``; CPU and CUDA. About 6.2 GB.
- ``nf4``: bitsandbytes 4-bit NormalFloat (blocks of 64, double-quantized absmax, QLoRA's recipe)
  through the same door; CUDA only, ``pip install -e ".[gpu]"``. About 3.5 GB.

Both libraries quantize the Linear layers of the 28 transformer blocks; the token embedding and the
norms stay in ``model.dtype``, and each matmul runs in ``model.dtype`` on a dequantized copy of its
weight (one layer at a time: the plan counts it). ChatGLM's language-model head is dropped whatever
the scheme (``models.loading.load_text_encoder``).
The same prompts give slightly different embeddings than ``none``, so the cache keys and the
manifest carry the scheme.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from kolors_story.errors import SettingsError

SCHEMES = ("none", "int8", "nf4")
LIBRARY = {"int8": "torchao", "nf4": "bitsandbytes"}
NF4_BLOCK = 64  # weights per absmax
NF4_BLOCK2 = 256  # absmax values per second-level (float32) scale of the double quantization


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def check_text_encoder_quant(scheme: str, device: str, offload: str = "none") -> None:
    """Refuse, in one line and before any weight is read, a scheme that cannot run here."""
    key = f"model.text_encoder_quant={scheme}"
    if scheme not in SCHEMES:
        raise SettingsError(f"{key}: use one of {', '.join(SCHEMES)}")
    if scheme == "none":
        return
    on_cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    if scheme == "nf4" and not on_cuda:
        why = "no CUDA GPU is visible" if str(device).startswith("cuda") else f"model.device={device}"
        raise SettingsError(f"{key} runs only on a CUDA GPU (bitsandbytes' NF4 kernels) and {why}: "
                            "use model.text_encoder_quant=int8 (torchao, CPU and CUDA) or none")
    if not _installed(LIBRARY[scheme]):
        extra = " (pip install -e '.[gpu]')" if scheme == "nf4" else " (pip install -e '.[int8]', torch 2.14)"
        other = "int8 (torchao)" if scheme == "nf4" else "none"
        raise SettingsError(f"{key} needs {LIBRARY[scheme]}, which is not installed{extra}; "
                            f"or use model.text_encoder_quant={other}")
    if offload == "sequential":
        raise SettingsError(f"{key} and memory.offload=sequential do not combine (layer-by-layer offload streams "
                            "full-precision weights): use memory.offload=model, the quantized ChatGLM3 moves whole")


def available_schemes(device: str) -> tuple[str, ...]:
    """The quantized schemes that can run for ``device`` here (what ``memory=auto`` may pick)."""
    on_cuda = str(device).startswith("cuda")
    return tuple(s for s in SCHEMES[1:] if _installed(LIBRARY[s]) and (s != "nf4" or on_cuda))


def loading_kwargs(scheme: str, dtype: torch.dtype, device) -> dict:
    """The extra ``from_pretrained`` arguments of ``scheme`` (nothing for ``none``). On a GPU the
    weights are quantized there as they load (bitsandbytes needs that; torchao is faster there)."""
    if scheme == "none":
        return {}
    on_gpu = device is not None and str(device).startswith("cuda") and torch.cuda.is_available()
    place = {"device_map": {"": _gpu_index(device)}} if on_gpu else {}  # quantized on the GPU as it loads
    if scheme == "int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return {"quantization_config": TorchAoConfig(Int8WeightOnlyConfig()), **place}
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                bnb_4bit_use_double_quant=True)
    return {"quantization_config": config, **place}


def _gpu_index(device) -> int:
    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


def finish_quantized(model: torch.nn.Module) -> torch.nn.Module:
    """The loaded quantized encoder, ready to encode. On the CPU its full-precision tensors (norms,
    biases, the 0.53 GB embedding table) are views into the checkpoint shards as loading mapped them,
    and every page the quantizer read stays resident while those mappings live: at real size 16.8 GB
    of RSS for an int8 encoder of 6.2 GB. Each view is moved to a fresh mapping of its file (one per
    file), where only the pages read from then on count: of the embedding table, the rows of the
    tokens the prompts use, as in the unquantized encoder. A tensor that is no file view is copied."""
    fresh: dict[str, torch.UntypedStorage] = {}
    maps = _file_mappings()
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for t in tensors.values():
                if t is not None and type(t.data) is torch.Tensor and t.device.type == "cpu":
                    t.data = _freshly_mapped(t.data, maps, fresh)
    return model


def _file_mappings() -> list[tuple[int, int, int, str]]:
    """``(start, end, file offset, path)`` of this process's file mappings (Linux; none elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/") and not parts[5].endswith("(deleted)"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end, int(parts[2], 16), parts[5]))
    return out


def mapped_file(t: torch.Tensor, maps: list[tuple[int, int, int, str]] | None = None) -> tuple[str, int] | None:
    """The file ``t``'s first element is mapped from and its byte offset there, or None (memory of its own)."""
    ptr = t.data_ptr()
    for start, end, offset, path in maps if maps is not None else _file_mappings():
        if start <= ptr < end:
            return path, offset + ptr - start
    return None


def _freshly_mapped(t: torch.Tensor, maps, fresh: dict[str, torch.UntypedStorage]) -> torch.Tensor:
    where = mapped_file(t, maps) if t.numel() else None
    if where is None or where[1] % t.element_size() or not t.is_contiguous():
        return t.clone()
    path, byte = where
    if path not in fresh:  # private (copy-on-write) and lazy: a page counts once it is read
        fresh[path] = torch.UntypedStorage.from_file(path, False, os.path.getsize(path))
    return torch.empty(0, dtype=t.dtype).set_(fresh[path], byte // t.element_size(), t.size(), t.stride())


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes a model's parameters take as stored: a quantized tensor's codes and scales (a torchao
    tensor reports the dtype it stands for, not the int8 it holds), the others as they are."""
    total = 0
    for p in model.parameters():
        names = getattr(p.data, "tensor_data_names", None)
        total += sum(getattr(p.data, n).nbytes for n in names) if names else p.numel() * p.element_size()
    return total


def linear_bytes(scheme: str, out_features: int, in_features: int) -> int:
    """Bytes one quantized Linear weight takes: int8 codes + a float32 scale per row (torchao), or
    4-bit codes + an 8-bit absmax per block of 64 + a float32 scale per 256 absmax (bitsandbytes)."""
    n = out_features * in_features
    if scheme == "int8":
        return n + 4 * out_features
    blocks = -(-n // NF4_BLOCK)
    return n // 2 + blocks + 4 * -(-blocks // NF4_BLOCK2)
