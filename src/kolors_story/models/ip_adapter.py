"""Kolors-IP-Adapter-Plus on disk: the folder layout and the weight file's keys and shapes.

The release folder holds ``image_encoder/`` (CLIP ViT-L/14-336 vision tower + projection, loaded
with ``CLIPVisionModelWithProjection``) and ``ip_adapter_plus_general.safetensors``: the resampler
under ``image_proj.*`` (IP-Adapter-Plus' own key names) and, per cross-attention layer of the UNet
in diffusers' processor order, ``ip_adapter.<1,3,5,...>.to_k_ip.weight`` / ``to_v_ip.weight``.
diffusers' ``load_ip_adapter`` converts those keys itself; :func:`adapter_shapes` lists them, so
the stand-in file (``kolors_story.tiny``) and the memory planner agree with the loader.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

WEIGHT_NAME = "ip_adapter_plus_general.safetensors"
ENCODER_FOLDER = "image_encoder"


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
