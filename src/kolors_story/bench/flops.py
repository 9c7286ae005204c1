"""Section ``flops``: real-scale accounting on the meta device (no weights, no memory): FLOPs of a
LoRA training step at 1024x1024 (UNet forward / forward+backward, with and without gradient
checkpointing), of ChatGLM3-6B prompt encoding (256 tokens) and of the SDXL VAE encode; the UNet
step's peak activation memory; the parameter bytes resident in fp16. Shows what the latent/embedding
cache saves per step against a trainer that encodes every step (the reference DiffSynth one)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kolors_story import tiny
from kolors_story.accounting import FlopCount, PeakTensorMemory
from kolors_story.bench.timing import GB, TFLOP, BenchContext
from kolors_story.models import architectures as configs
from kolors_story.models.checkpointing import set_gradient_checkpointing
from kolors_story.plan.count import build_on, scripted_on_meta, unet_inputs


def count_unet_step(unet, resolution: int, tokens: int, gradient_checkpointing: bool) -> dict:
    """FLOPs of a LoRA training step's UNet forward and forward+backward, and its peak activation
    bytes (on the meta device: shapes only, so real sizes cost no memory)."""
    set_gradient_checkpointing(unet, gradient_checkpointing)
    unet.train()
    p = next(unet.parameters())
    x, t, enc, added = unet_inputs(unet, 1, resolution, resolution, tokens, p.dtype, p.device)
    with PeakTensorMemory() as mem, FlopCount() as flops:
        # Called exactly as the trainer calls it (KolorsLoraModule.compute_loss).
        out = unet(x, t, encoder_hidden_states=enc, added_cond_kwargs=added, return_dict=False)[0]
        forward = flops.total
        out.float().square().mean().backward()
        total = flops.total
    for p in unet.parameters():
        p.grad = None
    return {"forward": forward, "forward_backward": total, "peak_activation_bytes": mem.peak}


def count_text_encoder(config: dict, tokens: int, device: str = "meta") -> int:
    """FLOPs of one prompt through ChatGLM as ``KolorsPipeline.encode_prompt`` calls it."""
    from diffusers.pipelines.kolors import ChatGLMModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig
    from torch.utils.flop_counter import FlopCounterMode

    te = build_on(device, lambda: ChatGLMModel(ChatGLMConfig(**config), empty_init=False))
    ids = torch.zeros(1, tokens, dtype=torch.long, device=device)
    # No attention mask: ChatGLM branches on ``mask.all()``, which needs data the meta device does
    # not have; the FLOP counter counts attention over all positions either way.
    with torch.no_grad(), scripted_on_meta(), FlopCounterMode(display=False) as flops:
        te(input_ids=ids, position_ids=torch.arange(tokens, device=device)[None], output_hidden_states=True)
    return flops.get_total_flops()


def count_vae_encode(config: dict, resolution: int, device: str = "meta") -> int:
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    vae = build_on(device, lambda: AutoencoderKL(**config))
    x = torch.randn(1, 3, resolution, resolution, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        _ = vae.encode(x).latent_dist.mean
    return flops.get_total_flops()


def _count_params(make: Callable[[], torch.nn.Module]) -> int:
    return sum(p.numel() for p in build_on("meta", make).parameters())


def section_flops(ctx: BenchContext) -> dict:
    """Real-scale FLOPs and resident bytes of one LoRA training step, counted on the meta device
    (``--quick``: the tiny configs). The meta device matters beyond saving memory: there SDPA runs
    its math decomposition, whose matmuls the FLOP counter sees; the CPU's fused attention kernel
    is not in its registry, so counting on the CPU would leave attention out."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.kolors import ChatGLMModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

    from kolors_story.lora import DEFAULT_TARGETS, add_lora

    if ctx.quick:
        unet_cfg, te_cfg, vae_cfg, res = (tiny.architecture("unet"), tiny.architecture("text_encoder"),
                                         tiny.architecture("vae"), tiny.resolution())
    else:
        unet_cfg, te_cfg, vae_cfg, res = (configs.KOLORS_UNET_CONFIG, configs.KOLORS_TEXT_ENCODER_CONFIG,
                                         configs.SDXL_VAE_CONFIG, 1024)
    device, dtype = "meta", torch.float16  # fp16 activations, as a 16-mixed step on a GPU
    tokens, rank = 256, 16
    ctx.log(f"flops: UNet LoRA step at {res}x{res} on the {device} device ...")
    unet = build_on(device, lambda: UNet2DConditionModel(**unet_cfg), dtype)
    unet.requires_grad_(False)
    add_lora(unet, rank=rank, alpha=rank, target_modules=DEFAULT_TARGETS)
    lora_params = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    unet_params = sum(p.numel() for p in unet.parameters()) - lora_params
    plain = count_unet_step(unet, res, tokens, gradient_checkpointing=False)
    ckpt = count_unet_step(unet, res, tokens, gradient_checkpointing=True)
    del unet
    ctx.log("flops: ChatGLM prompt encoding and VAE encode ...")
    te_flops = count_text_encoder(te_cfg, tokens, device)
    vae_flops = count_vae_encode(vae_cfg, res, device)
    te_params = _count_params(lambda: ChatGLMModel(ChatGLMConfig(**te_cfg), empty_init=False))
    vae_params = _count_params(lambda: AutoencoderKL(**vae_cfg))
    vae_encoder_params = _count_params(lambda: AutoencoderKL(**vae_cfg).encoder)

    return _flops_table(ctx, res, tokens, rank, device, dtype, plain, ckpt, te_flops, vae_flops,
                        {"unet": unet_params, "lora": lora_params, "text_encoder": te_params, "vae": vae_params,
                         "vae_encoder": vae_encoder_params})


def _flops_table(ctx: BenchContext, res: int, tokens: int, rank: int, device: str, dtype, plain: dict, ckpt: dict,
                 te_flops: float, vae_flops: float, params: dict) -> dict:
    """The section's numbers: TFLOPs, parameters, resident weights, activations and what the cache saves."""
    from kolors_story.lora import DEFAULT_TARGETS

    # Resident during a step, fp16 weights; the LoRA trains in fp32: weight + grad + AdamW's 2 moments.
    lora_state = params["lora"] * (4 + 4 + 8)
    cached = params["unet"] * 2 + lora_state
    reference = cached + params["text_encoder"] * 2 + params["vae"] * 2
    encode = te_flops + vae_flops
    return {
        "resolution": res, "tokens": tokens, "lora_rank": rank, "lora_targets": list(DEFAULT_TARGETS),
        "real_scale": not ctx.quick, "device": device, "activation_dtype": str(dtype).removeprefix("torch."),
        "tflop": {
            "unet_forward": plain["forward"] / TFLOP,
            "unet_forward_backward": plain["forward_backward"] / TFLOP,
            "unet_forward_backward_checkpointed": ckpt["forward_backward"] / TFLOP,
            "text_encoder_256_tokens": te_flops / TFLOP,
            "vae_encode": vae_flops / TFLOP,
        },
        "params": dict(params),
        "resident_gb": {"cached": cached / GB, "encode_every_step": reference / GB, "saved": (reference - cached) / GB,
                        "unet_fp16": params["unet"] * 2 / GB, "lora_fp32_with_adamw": lora_state / GB,
                        "text_encoder_fp16": params["text_encoder"] * 2 / GB, "vae_fp16": params["vae"] * 2 / GB},
        "activation_gb": {"no_checkpointing": plain["peak_activation_bytes"] / GB,
                          "checkpointing": ckpt["peak_activation_bytes"] / GB},
        "cache_saving": {
            "flops_pct_no_checkpointing": 100 * encode / (encode + plain["forward_backward"]),
            "flops_pct_checkpointing": 100 * encode / (encode + ckpt["forward_backward"]),
            "gb_resident": (reference - cached) / GB,
        },
        "step_ratio": {
            "forward_backward_over_forward": plain["forward_backward"] / plain["forward"],
            "checkpointed_over_forward": ckpt["forward_backward"] / plain["forward"],
        },
    }
