"""What keeping the characters consistent costs (``coherence``): the IP-Adapter's weights (image
encoder + resampler + per-layer key/value projections, on the device with the UNet) and the
reference tokens consistent self-attention keeps between its two passes (on the CPU by default,
else on the device next to the UNet).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from kolors_story import tiny
from kolors_story.config import CoherenceSettings, SamplerSettings
from kolors_story.models import architectures as real
from kolors_story.models.ip_adapter import (
    ENCODER_FOLDER,
    adapter_shapes,
    attention_layers,
    file_shapes,
)
from kolors_story.plan import count

VAE_FACTOR = 8  # latent pixels per image pixel side (Kolors' SDXL VAE)


def _encoder_config(coherence: CoherenceSettings) -> dict:
    ref = coherence.reference
    tiny.provide_ip_adapter(ref)  # a stand-in adapter is read from its folder like the real one
    file = Path(str(ref.path)).expanduser() / ENCODER_FOLDER / "config.json"
    config = json.loads(file.read_text()) if file.is_file() else dict(real.REAL_IP_ENCODER_CONFIG)
    keep = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "image_size",
            "patch_size", "projection_dim", "hidden_act", "num_channels")
    return {k: v for k, v in config.items() if k in keep}


def adapter_bytes(coherence: CoherenceSettings | None, unet_config: dict, dtype: str) -> int:
    """The IP-Adapter on the device (0 when no reference is used): from the files when present."""
    if coherence is None or not coherence.reference.used():
        return 0
    ref = coherence.reference
    encoder = _encoder_config(coherence)
    weight = Path(str(ref.path)).expanduser() / ref.weight_name
    if weight.is_file() and weight.suffix == ".safetensors":
        shapes = file_shapes(weight)
    else:
        shapes = adapter_shapes(unet_config, int(encoder["hidden_size"]), real.REAL_IP_RESAMPLER)
    adapter = sum(math.prod(s) for s in shapes.values()) * count.DTYPE_BYTES[dtype]
    return adapter + count.param_bytes("ip_encoder", count.key(encoder), dtype)


def shared_token_bytes(coherence: CoherenceSettings | None, unet_config: dict, sampler: SamplerSettings,
                       dtype: str, hires_size: tuple[int, int] | None = None) -> int:
    """The reference tokens recorded by consistent self-attention for one render (0 when off)."""
    if coherence is None or not coherence.sharing.used():
        return 0
    s = coherence.sharing
    refs = len(set(s.reference_scenes)) if s.reference_scenes else 1
    blocks = tuple(str(b) for b in s.blocks)
    layers = [(w, f) for name, w, f in attention_layers(unet_config)
              if name.endswith("attn1.processor") and name.startswith(blocks)]
    halves = 2 if sampler.cfg > 1 else 1
    window = float(s.end) - float(s.start)

    def per_call(height: int, width: int) -> int:
        tokens = [(height // VAE_FACTOR // f) * (width // VAE_FACTOR // f) for _, f in layers]
        return sum(max(1, round(t * float(s.token_ratio))) * w for t, (w, _) in zip(tokens, layers))

    total = per_call(sampler.height, sampler.width) * math.ceil(sampler.steps * window)
    if hires_size is not None:
        refine_calls = int(sampler.hires.steps * sampler.hires.strength)
        total += per_call(*hires_size) * math.ceil(refine_calls * window)
    return refs * halves * total * count.DTYPE_BYTES[dtype]
