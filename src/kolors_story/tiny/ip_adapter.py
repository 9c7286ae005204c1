"""The tiny Kolors-IP-Adapter-Plus for the tiny Kolors, in the release layout: random (of a seed)
or the shipped pre-trained one (``tiny/pretrained/ip_adapter/``, sha256-checked)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from kolors_story.errors import SettingsError
from kolors_story.models.ip_adapter import ENCODER_FOLDER, WEIGHT_NAME, adapter_shapes
from kolors_story.tiny import shipped
from kolors_story.tiny.architectures import TINY_IP_RESAMPLER, tiny_ip_encoder_config, tiny_unet_config
from kolors_story.tiny.folders import build_stamped_folder

TINY_IP_VERSION = 1
TINY_IP_STAMP = "TINY_IP_ADAPTER.json"


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

    check_tiny_ip_settings(seed, weights)
    if weights == "pretrained":
        record = shipped.pretrained_ip_record()  # its hashes are in the stamp: new shipped weights -> a rebuilt folder

        def copy(tmp: Path) -> None:  # the files are hashed once, when a folder is built (as the model's are)
            shipped.check_pretrained_ip()
            shutil.copytree(shipped.PRETRAINED_IP_DIR / ENCODER_FOLDER, tmp / ENCODER_FOLDER)
            shutil.copy2(shipped.PRETRAINED_IP_DIR / WEIGHT_NAME, tmp / WEIGHT_NAME)

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
