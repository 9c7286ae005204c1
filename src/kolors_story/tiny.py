"""A tiny randomly initialised Kolors, built offline and saved in the real release layouts.

Same classes as the real model (ChatGLM text encoder with the real ChatGLM3 tokenizer shipped in
the diffsynth wheel, UNet2DConditionModel with Kolors' text_proj/text_time wiring, an SDXL-style
AutoencoderKL with 8x downsampling, Kolors' scheduler config), only narrower and shallower, so
every code path that touches real weights can run on a CPU in seconds. The folder it writes is
loaded by :func:`kolors_story.models.load_pipeline`, exactly like downloaded weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

# Bump when the architecture below changes, so cached tiny models are rebuilt.
TINY_VERSION = 1

# Real Kolors scheduler config (scheduler/scheduler_config.json of the release).
KOLORS_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.014,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995,
    "interpolation_type": "linear",
    "num_train_timesteps": 1100,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_spacing": "leading",
    "timestep_type": "discrete",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# Real Kolors UNet config (unet/config.json of the release): SDXL's UNet fed by ChatGLM3 (4096-d).
KOLORS_UNET_CONFIG = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "encoder_hid_dim": 4096,
    "encoder_hid_dim_type": "text_proj",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 5632,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": True,
}

# Real ChatGLM3-6B config (text_encoder/config.json of the release).
KOLORS_TEXT_ENCODER_CONFIG = {
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False,
    "attention_dropout": 0.0,
    "attention_softmax_in_fp32": True,
    "bias_dropout_fusion": True,
    "ffn_hidden_size": 13696,
    "fp32_residual_connection": False,
    "hidden_dropout": 0.0,
    "hidden_size": 4096,
    "kv_channels": 128,
    "layernorm_epsilon": 1e-05,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "num_attention_heads": 32,
    "num_layers": 28,
    "original_rope": True,
    "padded_vocab_size": 65024,
    "post_layer_norm": True,
    "rmsnorm": True,
    "seq_length": 32768,
    "use_cache": True,
}

# SDXL VAE config (vae/config.json of the release and of sdxl-vae-fp16-fix).
SDXL_VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "force_upcast": True,
}

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


def diffsynth_tokenizer_dir() -> Path:
    """The real ChatGLM3 tokenizer files shipped inside the diffsynth wheel."""
    import importlib.util

    spec = importlib.util.find_spec("diffsynth")  # located, not imported: importing diffsynth is slow
    root = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else Path("?")
    folder = root / "tokenizer_configs" / "kolors" / "tokenizer"
    if not (folder / "tokenizer.model").exists():
        raise FileNotFoundError(
            f"The ChatGLM3 tokenizer is not at {folder}; reinstall diffsynth==1.1.9 (pip install -e .)"
        )
    return folder


def init_parameters(model: torch.nn.Module, generator: torch.Generator, std: float = 0.05,
                    fan_in_scaled: bool = True) -> None:
    """Deterministic initialisation independent of the global RNG and of each library's defaults.

    Norm weights 1, biases 0 (ChatGLM leaves its norm weights uninitialised: NaN images otherwise),
    the rest normal with ``std`` (capped at 1/sqrt(fan_in) when ``fan_in_scaled``).
    """
    for name, p in model.named_parameters():
        with torch.no_grad():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                scale = min(std, fan_in**-0.5) if fan_in_scaled else std
                p.copy_(torch.randn(p.shape, generator=generator) * scale)


def build_tiny_components(seed: int = 0, text_encoder_config: dict | None = None,
                          unet_config: dict | None = None, vae_config: dict | None = None) -> dict:
    """Random Kolors components in memory (fp32, CPU), deterministic for ``seed``: the tiny
    model's sizes unless other configs (e.g. the bench model's) are given."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers.pipelines.kolors import ChatGLMModel, ChatGLMTokenizer
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

    gen = torch.Generator().manual_seed(seed)
    text_encoder = ChatGLMModel(ChatGLMConfig(**(text_encoder_config or tiny_text_encoder_config())),
                                empty_init=False)
    init_parameters(text_encoder, gen, std=0.02, fan_in_scaled=False)
    unet = UNet2DConditionModel(**(unet_config or tiny_unet_config()))
    init_parameters(unet, gen)
    vae = AutoencoderKL(**(vae_config or tiny_vae_config()))
    init_parameters(vae, gen)
    scheduler = EulerDiscreteScheduler.from_config(
        {k: v for k, v in KOLORS_SCHEDULER_CONFIG.items() if not k.startswith("_")}
    )
    tokenizer = ChatGLMTokenizer.from_pretrained(str(diffsynth_tokenizer_dir()))
    return dict(text_encoder=text_encoder, unet=unet, vae=vae, scheduler=scheduler, tokenizer=tokenizer)


def save_release(components: dict, folder: Path, layout: str = "kolors") -> None:
    """Write components in the Kwai-Kolors/Kolors (``kolors``) or Kolors-diffusers (``diffusers``) layout."""
    if layout not in ("kolors", "diffusers"):
        raise ValueError(f"model.tiny.layout={layout!r}: use 'kolors' or 'diffusers'")
    folder.mkdir(parents=True, exist_ok=True)
    te_dir = folder / "text_encoder"
    if layout == "kolors":
        # The Kolors release ships ChatGLM3 as several pytorch .bin shards with the tokenizer beside it.
        components["text_encoder"].save_pretrained(te_dir, safe_serialization=False, max_shard_size="1MB")
        components["tokenizer"].save_pretrained(te_dir)
    else:
        components["text_encoder"].save_pretrained(te_dir, safe_serialization=True)
        components["tokenizer"].save_pretrained(folder / "tokenizer")
    # The tokenizer's python file is not needed (the class lives in diffusers) but the release has it.
    for name in ("tokenizer_config.json",):
        src = diffsynth_tokenizer_dir() / name
        if src.exists() and layout == "kolors" and not (te_dir / name).exists():
            shutil.copy(src, te_dir / name)
    if layout == "diffusers":
        # Kolors-diffusers ships fp16 variant files holding fp16 tensors: do the same.
        import copy

        copy.deepcopy(components["unet"]).half().save_pretrained(folder / "unet", variant="fp16")
        copy.deepcopy(components["vae"]).half().save_pretrained(folder / "vae", variant="fp16")
    else:
        components["unet"].save_pretrained(folder / "unet")
        components["vae"].save_pretrained(folder / "vae")
    components["scheduler"].save_pretrained(folder / "scheduler")
    if layout == "diffusers":
        index = {
            "_class_name": "KolorsPipeline",
            "_diffusers_version": "0.30.0",
            "force_zeros_for_empty_prompt": False,
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["kolors", "ChatGLMModel"],
            "tokenizer": ["kolors", "ChatGLMTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    (folder / "TINY_MODEL.txt").write_text(
        f"Tiny randomly initialised Kolors (kolors-story tiny v{TINY_VERSION}). Not a real model: "
        "outputs are noise-like and exist only to exercise the code paths.\n"
    )


def build_model_folder(folder: str | Path, stamp: dict, stamp_name: str, build, layout: str = "kolors",
                       note: str | None = None) -> Path:
    """Save ``build()``'s components into ``folder`` unless its stamp file already says ``stamp``.

    Built in a temp folder beside the target and renamed into place, so an interrupted build
    never leaves a half-written model that later loads.
    """
    folder = Path(folder).expanduser()
    try:
        if json.loads((folder / stamp_name).read_text()) == stamp:
            return folder
    except (OSError, ValueError):
        pass
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_release(build(), tmp, layout)
        if note:
            (tmp / "TINY_MODEL.txt").write_text(note)
        (tmp / stamp_name).write_text(json.dumps(stamp))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def ensure_tiny_model(folder: str | Path, seed: int = 0, layout: str = "kolors") -> Path:
    """Build the tiny model into ``folder`` unless a complete one of this spec is already there."""
    return build_model_folder(folder, {"version": TINY_VERSION, "seed": seed, "layout": layout},
                              "TINY_MODEL.json", lambda: build_tiny_components(seed), layout)
