"""Kolors-IP-Adapter-Plus on disk: the folder layout, the weight file's keys and shapes, and a tiny
random one built in that layout for tests (``model=tiny``).

The release folder holds ``image_encoder/`` (CLIP ViT-L/14-336 vision tower + projection, loaded
with ``CLIPVisionModelWithProjection``) and ``ip_adapter_plus_general.safetensors``: the resampler
under ``image_proj.*`` (IP-Adapter-Plus' own key names) and, per cross-attention layer of the UNet
in diffusers' processor order, ``ip_adapter.<1,3,5,...>.to_k_ip.weight`` / ``to_v_ip.weight``.
diffusers' ``load_ip_adapter`` converts those keys itself; :func:`adapter_shapes` lists them, so
the tiny file and the memory planner agree with the loader.
"""

from __future__ import annotations

import json
import re
import shutil
from functools import lru_cache
from pathlib import Path

import torch

from kolors_story.errors import SettingsError, UserError
from kolors_story.files import file_sha256
from kolors_story.models.configs import (
    TINY_IP_RESAMPLER,
    tiny_ip_encoder_config,
    tiny_unet_config,
)

WEIGHT_NAME = "ip_adapter_plus_general.safetensors"
ENCODER_FOLDER = "image_encoder"
TINY_IP_VERSION = 1
TINY_IP_STAMP = "TINY_IP_ADAPTER.json"
PRETRAINED_IP_DIR = Path(__file__).parent / "tiny_pretrained" / "ip_adapter"  # made by train/pretrain_tiny_ip.py
PRETRAINED_IP_RECORD = "PRETRAINED_IP.json"
REBUILD_IP = "rebuild it with `python -m kolors_story.train.pretrain_tiny_ip` (about 6 minutes on 2 CPU cores)"


class PretrainedIPAdapterError(UserError, RuntimeError):
    """The shipped pre-trained tiny IP-Adapter is missing or does not match its record."""


def pretrained_ip_hashes(folder: Path) -> dict[str, str]:
    """sha256 of the adapter file and of the image encoder's weights in ``folder``."""
    files = {"adapter": Path(folder) / WEIGHT_NAME, "image_encoder": Path(folder) / ENCODER_FOLDER / "model.safetensors"}
    return {name: file_sha256(path) if path.is_file() else "missing" for name, path in files.items()}


def pretrained_ip_record(folder: Path | None = None) -> dict:
    """The shipped adapter's record (or ``folder``'s): the command, the settings, the sha256 values."""
    path = (Path(folder) if folder is not None else PRETRAINED_IP_DIR) / PRETRAINED_IP_RECORD
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PretrainedIPAdapterError(f"{path} cannot be read ({exc}): the pre-trained tiny IP-Adapter is missing; "
                                       f"{REBUILD_IP}, or use coherence.reference.tiny.weights=random") from exc


def check_pretrained_ip(folder: Path | None = None) -> dict:
    """The shipped adapter's record (or ``folder``'s), after checking both weight files against it."""
    folder = Path(folder) if folder is not None else PRETRAINED_IP_DIR
    record = pretrained_ip_record(folder)
    got = pretrained_ip_hashes(folder)
    for name, digest in got.items():
        if digest != record.get("sha256", {}).get(name):
            raise PretrainedIPAdapterError(f"{folder}: the {name} weights' sha256 {digest[:16]} does not match the "
                                           f"recorded one in {PRETRAINED_IP_RECORD}; {REBUILD_IP}")
    return record


@lru_cache(maxsize=8)
def _attention_layers(unet_config_json: str) -> tuple[tuple[str, int, int], ...]:
    config = json.loads(unet_config_json)
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    out, levels = list(config["block_out_channels"]), len(config["block_out_channels"])
    layers = []
    for name in unet.attn_processors:
        if name.startswith("mid_block"):
            width, level = out[-1], levels - 1
        elif name.startswith("up_blocks"):
            level = levels - 1 - int(name[len("up_blocks.")])
            width = out[level]
        else:
            level = int(name[len("down_blocks.")])
            width = out[level]
        layers.append((name, width, 2 ** level))
    return tuple(layers)


def attention_layers(unet_config: dict) -> list[tuple[str, int, int]]:
    """Every attention processor of the UNet, in diffusers' order: ``(name, width, downsampling)``,
    where a layer sees (latent height / downsampling) x (latent width / downsampling) tokens."""
    return list(_attention_layers(json.dumps(unet_config, sort_keys=True)))


def adapter_shapes(unet_config: dict, embed_dims: int, resampler: dict) -> dict[str, tuple[int, ...]]:
    """Every key of the adapter file and its shape (IP-Adapter-Plus naming, before diffusers converts it)."""
    d, q, ff = int(resampler["hidden_dims"]), int(resampler["num_queries"]), int(resampler["ffn_ratio"])
    inner, o = int(resampler["heads"]) * 64, int(unet_config["cross_attention_dim"])
    shapes: dict[str, tuple[int, ...]] = {
        "image_proj.latents": (1, q, d), "image_proj.proj_in.weight": (d, embed_dims), "image_proj.proj_in.bias": (d,),
        "image_proj.proj_out.weight": (o, d), "image_proj.proj_out.bias": (o,),
        "image_proj.norm_out.weight": (o,), "image_proj.norm_out.bias": (o,),
    }
    for i in range(int(resampler["depth"])):
        p = f"image_proj.layers.{i}."
        shapes.update({
            p + "0.norm1.weight": (d,), p + "0.norm1.bias": (d,), p + "0.norm2.weight": (d,), p + "0.norm2.bias": (d,),
            p + "0.to_q.weight": (inner, d), p + "0.to_kv.weight": (2 * inner, d), p + "0.to_out.weight": (d, inner),
            p + "1.0.weight": (d,), p + "1.0.bias": (d,), p + "1.1.weight": (d * ff, d), p + "1.3.weight": (d, d * ff),
        })
    cross = [width for name, width, _ in attention_layers(unet_config) if not name.endswith("attn1.processor")]
    for n, width in enumerate(cross):
        shapes[f"ip_adapter.{2 * n + 1}.to_k_ip.weight"] = (width, o)
        shapes[f"ip_adapter.{2 * n + 1}.to_v_ip.weight"] = (width, o)
    return shapes


def file_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of a safetensors file, from its header (no weights read)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _random_tensor(key: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if "norm" in key or re.search(r"layers\.\d+\.1\.0\.", key):  # LayerNorms: weight 1, bias 0
        return torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
    if key.endswith("bias"):
        return torch.zeros(shape)
    return torch.randn(shape, generator=g) * 0.05


def check_tiny_ip_settings(seed: int, weights: str) -> None:
    if weights not in ("random", "pretrained"):
        raise SettingsError(f"coherence.reference.tiny.weights={weights!r}: use pretrained or random")
    if weights == "pretrained" and int(seed) != 0:
        raise SettingsError(f"coherence.reference.tiny.seed={seed}: the pre-trained tiny IP-Adapter exists for "
                            "seed 0 only; use seed 0 or coherence.reference.tiny.weights=random")


def ensure_tiny_ip_adapter(folder: str | Path, seed: int = 0, weights: str = "random") -> Path:
    """A tiny Kolors-IP-Adapter-Plus for the tiny Kolors, in the release layout: ``random`` (of
    ``seed``) or ``pretrained`` (the shipped one, trained on the pre-trained tiny Kolors; seed 0)."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from kolors_story.models.random_init import build_stamped_folder

    check_tiny_ip_settings(seed, weights)
    if weights == "pretrained":
        record = pretrained_ip_record()  # its hashes are in the stamp: new shipped weights -> a rebuilt folder

        def copy(tmp: Path) -> None:  # the files are hashed once, when a folder is built (as the model's are)
            check_pretrained_ip()
            shutil.copytree(PRETRAINED_IP_DIR / ENCODER_FOLDER, tmp / ENCODER_FOLDER)
            shutil.copy2(PRETRAINED_IP_DIR / WEIGHT_NAME, tmp / WEIGHT_NAME)

        stamp = {"version": TINY_IP_VERSION, "weights": "pretrained", "sha256": record["sha256"]}
        return build_stamped_folder(folder, stamp, TINY_IP_STAMP, copy)

    def write(tmp: Path) -> None:
        g = torch.Generator().manual_seed(int(seed))
        config = tiny_ip_encoder_config()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**{k: v for k, v in config.items()
                                                                          if k not in ("architectures", "model_type")}))
        encoder.save_pretrained(tmp / ENCODER_FOLDER)
        shapes = adapter_shapes(tiny_unet_config(), config["hidden_size"], TINY_IP_RESAMPLER)
        save_file({k: _random_tensor(k, s, g).contiguous() for k, s in shapes.items()}, str(tmp / WEIGHT_NAME))
        (tmp / "TINY_IP_ADAPTER.txt").write_text("Tiny randomly initialised Kolors-IP-Adapter-Plus (kolors-story): "
                                                 "plumbing only.\n")

    return build_stamped_folder(folder, {"version": TINY_IP_VERSION, "seed": int(seed)}, TINY_IP_STAMP, write)
