"""Architecture dicts of the real Kolors release: UNet, ChatGLM3-6B, SDXL VAE, scheduler, the
aesthetic predictor's CLIP ViT-L/14, CLIP with both towers and the IP-Adapter's image encoder.

They are what the memory plan and the bench count on the meta device when no weights are on disk;
the tiny and bench stand-ins (``kolors_story.tiny``) are derived from them.
"""

from __future__ import annotations

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


# The real predictor's config.json: OpenAI CLIP ViT-L/14's vision tower (what
# AestheticsPredictorV2Linear subclasses) with a 768-d projection feeding the MLP head.
REAL_PREDICTOR_CONFIG = {
    "architectures": ["AestheticsPredictorV2Linear"],
    "model_type": "clip_vision_model",
    "attention_dropout": 0.0,
    "hidden_act": "quick_gelu",
    "hidden_size": 1024,
    "image_size": 224,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "num_attention_heads": 16,
    "num_channels": 3,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 768,
}


# OpenAI CLIP ViT-L/14 preprocessing (openai/clip-vit-large-patch14's preprocessor_config.json):
# shortest edge -> 224 (bicubic), center crop 224x224, scale to [0, 1], normalise with CLIP's stats.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


REAL_PREPROCESSOR_SETTINGS = {
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "resample": 3,  # PIL.Image.BICUBIC
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD,
}


# OpenAI CLIP ViT-L/14 with both towers (openai/clip-vit-large-patch14's config.json): the image
# side is the tower inside the aesthetic predictor; the text side scores prompt alignment (CLIP-T).
REAL_CLIP_CONFIG = {
    "architectures": ["CLIPModel"],
    "model_type": "clip",
    "projection_dim": 768,
    "logit_scale_init_value": 2.6592,
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
                    "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 768, "hidden_act": "quick_gelu"},
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
                      "image_size": 224, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu"},
}


# Kolors-IP-Adapter-Plus: its image encoder is OpenAI CLIP ViT-L/14 at 336 px (image_encoder/config.json);
# its resampler is IP-Adapter-Plus-XL's (1280 wide, 20 heads of 64, depth 4, 16 image tokens, ff x4),
# projecting the encoder's penultimate hidden states to the UNet's cross-attention width. The planner
# reads the real file's shapes when it is there; these are what it assumes otherwise.
REAL_IP_ENCODER_CONFIG = {
    "architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model", "hidden_size": 1024,
    "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24, "image_size": 336,
    "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu",
}
REAL_IP_RESAMPLER = {"hidden_dims": 1280, "heads": 20, "num_queries": 16, "depth": 4, "ffn_ratio": 4}
