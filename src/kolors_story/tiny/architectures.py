"""Architecture dicts of the stand-in models, derived from the real ones (``models.architectures``).

- tiny: narrower and shallower, same classes and wiring; every code path runs on a CPU in seconds.
- bench: between tiny and real, sized for a few hundred ms per LoRA step here (``python -m
  kolors_story.bench``).
"""

from __future__ import annotations

from kolors_story.models.architectures import (
    KOLORS_TEXT_ENCODER_CONFIG,
    KOLORS_UNET_CONFIG,
    REAL_CLIP_CONFIG,
    REAL_IP_ENCODER_CONFIG,
    REAL_PREDICTOR_CONFIG,
    SDXL_VAE_CONFIG,
)

# ------------------------------------------------------------------------------------- tiny

TINY_TEXT_HIDDEN = 32
TINY_TIME_EMBED = 8


def tiny_text_encoder_config() -> dict:
    cfg = dict(KOLORS_TEXT_ENCODER_CONFIG)
    cfg.update(
        hidden_size=TINY_TEXT_HIDDEN,
        ffn_hidden_size=64,
        kv_channels=8,
        num_attention_heads=4,
        num_layers=2,
        multi_query_group_num=2,
        seq_length=512,
    )
    return cfg


def tiny_unet_config() -> dict:
    cfg = dict(KOLORS_UNET_CONFIG)
    cfg.update(
        attention_head_dim=[2, 4, 4],
        block_out_channels=[32, 64, 64],
        cross_attention_dim=32,
        encoder_hid_dim=TINY_TEXT_HIDDEN,
        addition_time_embed_dim=TINY_TIME_EMBED,
        # 6 micro-conditioning numbers (original size, crop, target size) x time embed + pooled text
        projection_class_embeddings_input_dim=6 * TINY_TIME_EMBED + TINY_TEXT_HIDDEN,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=8,
        transformer_layers_per_block=[1, 1, 1],
    )
    return cfg


def tiny_vae_config() -> dict:
    cfg = dict(SDXL_VAE_CONFIG)
    cfg.update(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8, sample_size=64)
    return cfg


def pretrained_unet_config() -> dict:
    """The pre-trained tiny UNet: the tiny one with 8 channels per GroupNorm group (4 lose colour)."""
    return {**tiny_unet_config(), "norm_num_groups": 4}


def pretrained_vae_config() -> dict:
    """The pre-trained tiny VAE: the tiny one with 2 GroupNorm groups. With 8 groups of 8-16
    channels (1-2 per group) the norms remove each channel's mean and the VAE cannot learn flat
    colours (measured: reconstruction MSE stuck near 0.2 vs 0.1 with 2 groups after 400 steps)."""
    return {**tiny_vae_config(), "norm_num_groups": 2}


# Tiny vision tower: same input size/patching as the real one (so the real preprocessing applies
# unchanged), but 32-d and 2 layers: ~0.2 M parameters, a few ms per image on a CPU.
TINY_PREDICTOR_OVERRIDES = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": 16,
}


def tiny_predictor_config() -> dict:
    cfg = dict(REAL_PREDICTOR_CONFIG)
    cfg.update(TINY_PREDICTOR_OVERRIDES)
    return cfg


def tiny_ip_encoder_config() -> dict:
    """The IP-Adapter's CLIP vision tower at 32-d, 2 layers, real 336² / 14 patches."""
    cfg = dict(REAL_IP_ENCODER_CONFIG)
    cfg.update(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, projection_dim=16)
    return cfg


TINY_IP_RESAMPLER = {"hidden_dims": 64, "heads": 1, "num_queries": 16, "depth": 4, "ffn_ratio": 4}


def tiny_clip_config() -> dict:
    """CLIP with both towers at 32-d, 2 layers, the real vocabulary and 224² / 14 patches."""
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in REAL_CLIP_CONFIG.items()}
    cfg["projection_dim"] = 16
    cfg["text_config"].update(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                              projection_dim=16)
    cfg["vision_config"].update(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                                projection_dim=16)
    return cfg


# ------------------------------------------------------------------------------------ bench
# Same classes and wiring as Kolors (ChatGLM text_proj into an SDXL UNet with text_time
# micro-conditioning, SDXL-style VAE), sized between tiny and real: ~9 M UNet parameters at 128x128
# (16x16 latents), a few hundred ms per LoRA training step on a 2-core CPU.

BENCH_RESOLUTION = 128
BENCH_TEXT_HIDDEN = 256
BENCH_TIME_EMBED = 32


def bench_unet_config() -> dict:
    cfg = dict(KOLORS_UNET_CONFIG)
    cfg.update(
        block_out_channels=[32, 64, 128],
        attention_head_dim=[1, 2, 4],  # 32-d heads, as Kolors' 64-d heads scaled down
        cross_attention_dim=128,
        encoder_hid_dim=BENCH_TEXT_HIDDEN,
        addition_time_embed_dim=BENCH_TIME_EMBED,
        projection_class_embeddings_input_dim=6 * BENCH_TIME_EMBED + BENCH_TEXT_HIDDEN,
        layers_per_block=2,
        norm_num_groups=16,
        sample_size=BENCH_RESOLUTION // 8,
        transformer_layers_per_block=[1, 1, 2],
    )
    return cfg


def bench_text_encoder_config() -> dict:
    cfg = dict(KOLORS_TEXT_ENCODER_CONFIG)
    cfg.update(hidden_size=BENCH_TEXT_HIDDEN, ffn_hidden_size=3 * BENCH_TEXT_HIDDEN, kv_channels=32,
               num_attention_heads=8, num_layers=6, multi_query_group_num=2, seq_length=512)
    return cfg


def bench_vae_config() -> dict:
    cfg = dict(SDXL_VAE_CONFIG)
    cfg.update(block_out_channels=[16, 32, 64, 64], norm_num_groups=16, sample_size=BENCH_RESOLUTION)
    return cfg


# ------------------------------------------------------------------------------------ the peers model
# What the bench's ``peers`` section runs this project and its peers (DiffSynth's trainer, the seeds'
# diffusers loop) on: Kolors' real UNet and VAE, and ChatGLM3 at its real width with 2 of its 28
# layers (the prompt-encoding share of a step stays visible without 12.5 GB of encoder).

PEERS_TEXT_LAYERS = 2


def peers_text_encoder_config() -> dict:
    return {**KOLORS_TEXT_ENCODER_CONFIG, "num_layers": PEERS_TEXT_LAYERS}
