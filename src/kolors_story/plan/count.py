"""Counting what each piece of work allocates, on the meta device: no weights, no memory, real
Kolors sizes in about a second each.

Every count runs the same code path as the real work (diffusers' UNet / VAE / ChatGLM forward,
the trainer's LoRA step with backward) on models built from the configs on the meta device, under
:class:`~kolors_story.accounting.PeakTensorMemory`. Attention is counted the way the chosen
backend allocates it: PyTorch's SDPA on a GPU (flash / memory-efficient kernels) and on a CPU
(its fused kernel) never builds the N x N score matrix, while on the meta device SDPA would fall
back to its math decomposition; so for ``memory.attention=sdpa`` a stand-in allocates exactly
what the fused kernels do (the output and a float32 log-sum-exp per row; the same in backward).
``eager`` and ``sliced`` attention run their own processors and are counted as they are.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from unittest import mock

import torch

from kolors_story.accounting import PeakTensorMemory
from kolors_story.models.checkpointing import set_gradient_checkpointing
from kolors_story.models.prompt_projections import keep_across_steps, kept_across_steps

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class _FusedAttention(torch.autograd.Function):
    """What a fused SDPA kernel allocates: output + log-sum-exp forward, dq/dk/dv backward."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    return _FusedAttention.apply(query, key, value)


def scripted_on_meta():
    """TorchScript unoptimized, for running models on meta tensors: ChatGLM's scripted rotary
    embedding, profiled on meta tensors (or on CPU tensors and then called on meta ones), would ask
    its CPU fuser (on once DiffSynth is imported) for the meta device and fail."""
    return torch.jit.optimized_execution(False)


@contextmanager
def counting(attention: str = "sdpa"):
    """Count allocations inside the block, SDPA as the fused kernels allocate it (``attention=sdpa``)."""
    patch = (mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", fused_sdpa)
             if attention == "sdpa" else nullcontext())
    with patch, scripted_on_meta(), PeakTensorMemory() as mem:
        yield mem


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def build_on(device: str, make: Callable[[], torch.nn.Module], dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A model built directly on ``device`` (meta: shapes only, no memory) in ``dtype``."""
    old = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)  # built in the dtype, not cast after (diffusers warns on casts)
    try:
        with torch.device(device):
            return make()
    finally:
        torch.set_default_dtype(old)


@lru_cache(maxsize=16)
def meta_model(kind: str, config_json: str, dtype: str) -> torch.nn.Module:
    """``unet``, ``vae``, ``text_encoder``, ``scorer``, ``clip`` or ``ip_encoder`` of a config, on the meta device (cached)."""
    config = json.loads(config_json)
    if kind == "unet":
        from diffusers import UNet2DConditionModel

        make = lambda: UNet2DConditionModel(**config)  # noqa: E731
    elif kind == "vae":
        from diffusers import AutoencoderKL

        make = lambda: AutoencoderKL(**config)  # noqa: E731
    elif kind == "text_encoder":
        from diffusers.pipelines.kolors import ChatGLMModel
        from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

        from kolors_story.models.loading import as_prompt_encoder

        make = lambda: as_prompt_encoder(ChatGLMModel(ChatGLMConfig(**config), empty_init=False))  # noqa: E731 (as loaded)
    elif kind == "clip":
        from transformers import CLIPConfig, CLIPModel

        make = lambda: CLIPModel(CLIPConfig(**{k: v for k, v in config.items() if k != "architectures"}))  # noqa: E731
    elif kind == "ip_encoder":
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        make = lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**config))  # noqa: E731
    elif kind == "scorer":
        from aesthetics_predictor import AestheticsPredictorV2Linear
        from transformers import CLIPVisionConfig

        make = lambda: AestheticsPredictorV2Linear(CLIPVisionConfig(**config))  # noqa: E731
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    return build_on("meta", make, _dtype(dtype)).eval().requires_grad_(False)


def key(config: dict) -> str:
    """A hashable form of a config (the caches below are keyed by it)."""
    return json.dumps(config, sort_keys=True, default=list)


@lru_cache(maxsize=64)
def param_bytes(kind: str, config_json: str, dtype: str) -> int:
    return sum(p.numel() for p in meta_model(kind, config_json, dtype).parameters()) * DTYPE_BYTES[dtype]


@lru_cache(maxsize=64)
def largest_module_bytes(kind: str, config_json: str, dtype: str) -> int:
    """Weights of the largest leaf module: what sequential offload keeps on the device at a time."""
    model = meta_model(kind, config_json, dtype)
    sizes = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()]
    return max(sizes) * DTYPE_BYTES[dtype]


@lru_cache(maxsize=16)
def quantized_text_encoder_bytes(config_json: str, dtype: str, scheme: str) -> int:
    """ChatGLM3's weights as ``models.quantization`` loads them: the Linear layers of its blocks at
    the scheme's bytes (codes + scales), the embedding, norms and biases in ``dtype`` (no LM head, as
    ``meta_model`` builds it)."""
    from kolors_story.models.quantization import linear_bytes

    total = 0
    for module in meta_model("text_encoder", config_json, dtype).modules():
        own = dict(module.named_parameters(recurse=False))
        if isinstance(module, torch.nn.Linear):
            total += linear_bytes(scheme, module.out_features, module.in_features)
            own.pop("weight")
        total += sum(p.numel() for p in own.values()) * DTYPE_BYTES[dtype]
    return total


@lru_cache(maxsize=16)
def dequantized_layer_bytes(config_json: str, dtype: str) -> int:
    """The transient of a quantized encoder's matmul: its largest Linear weight dequantized to ``dtype``."""
    model = meta_model("text_encoder", config_json, dtype)
    return max(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) * DTYPE_BYTES[dtype]


def _set_attention(model, attention: str, slice_size="auto") -> None:
    from diffusers.models.attention_processor import (
        AttnProcessor,
        AttnProcessor2_0,
        SlicedAttnProcessor,
    )

    if attention == "eager":
        model.set_attn_processor(AttnProcessor())
    elif attention == "sliced":
        heads = max(1, min(getattr(m, "heads", 1) for m in model.modules() if hasattr(m, "heads")))
        size = 1 if slice_size == "max" else (heads // 2 if slice_size == "auto" else int(slice_size))
        model.set_attn_processor(SlicedAttnProcessor(max(1, size)))
    else:
        model.set_attn_processor(AttnProcessor2_0())


def unet_inputs(unet, batch: int, height: int, width: int, tokens: int, dtype: torch.dtype, device="meta") -> tuple:
    """What the pipeline and the trainer hand the UNet: latents, timesteps, text, micro-conditioning."""
    c = unet.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return (
        torch.empty(batch, c.in_channels, height // 8, width // 8, device=device, dtype=dtype),
        torch.zeros(batch, dtype=torch.long, device=device),
        torch.empty(batch, tokens, c.encoder_hid_dim, device=device, dtype=dtype),
        {"text_embeds": torch.empty(batch, pooled, device=device, dtype=dtype),
         "time_ids": torch.empty(batch, 6, device=device, dtype=dtype)},
    )


@lru_cache(maxsize=128)
def unet_call(config_json: str, batch: int, height: int, width: int, dtype: str, attention: str = "sdpa",
              tokens: int = 256, keep: bool = False) -> int:
    """Peak bytes of a UNet forward without gradients (a denoising step; CFG doubles ``batch``).
    ``keep``: with ``memory.keep_prompt_projections``, a later step's, the prompt projections held
    from the first one (two steps are run)."""
    unet = meta_model("unet", config_json, dtype)
    _set_attention(unet, attention)
    keep_across_steps(unet, keep)
    x, t, enc, added = unet_inputs(unet, batch, height, width, tokens, _dtype(dtype))
    with torch.no_grad(), counting(attention) as mem, kept_across_steps(unet):
        for _ in range(2 if keep else 1):
            unet(x, t, encoder_hidden_states=enc, added_cond_kwargs=added, return_dict=False)
    return mem.peak


@lru_cache(maxsize=4)
def _built_lora_unet(config_json: str, dtype: torch.dtype, rank: int, targets: tuple[str, ...], adapter: tuple):
    from diffusers import UNet2DConditionModel

    from kolors_story.lora.adapter import add_lora

    unet = build_on("meta", lambda: UNet2DConditionModel(**json.loads(config_json)), dtype)
    unet.requires_grad_(False)
    add_lora(unet, rank=rank, alpha=rank, target_modules=list(targets), type=adapter[0], conv_rank=adapter[1])
    return unet


def meta_lora_unet(config_json: str, dtype: torch.dtype, rank: int, targets: tuple[str, ...],
                   adapter: tuple = ("lora", None)):
    """The UNet on the meta device, frozen, with the trainer's adapter (its weights float32, as peft makes them).

    Built once per adapter (building and injecting it is a good part of a plan's time) and handed
    back as a new build would be: in train mode, without gradient checkpointing, without gradients
    (the gradients of an earlier count would otherwise exist before the next one and not be counted)."""
    unet = _built_lora_unet(config_json, dtype, rank, targets, tuple(adapter))
    set_gradient_checkpointing(unet, False)
    unet.train()
    unet.zero_grad(set_to_none=True)
    return unet


def _training_unet(config_json, batch, height, width, dtype, checkpointing, rank, targets, tokens, adapter):
    """The meta LoRA UNet in train mode as the trainer runs it, and a batch of its inputs."""
    unet = meta_lora_unet(config_json, _dtype(dtype), rank, targets, adapter)
    set_gradient_checkpointing(unet, checkpointing)
    unet.train()
    return unet, unet_inputs(unet, batch, height, width, tokens, _dtype(dtype))


@lru_cache(maxsize=64)
def train_step(config_json: str, batch: int, height: int, width: int, dtype: str, checkpointing: bool,
               rank: int, targets: tuple[str, ...], tokens: int = 256, adapter: tuple = ("lora", None)) -> int:
    """Peak bytes of a LoRA training step (forward, MSE loss, backward) with the LoRA in float32,
    as the trainer builds it; without the optimizer state (that is resident, counted apart).
    ``adapter``: (lora.type, lora.conv_rank); DoRA's weight norms and LoHa/LoKr's rebuilt weights count."""
    unet, (x, t, enc, added) = _training_unet(config_json, batch, height, width, dtype, checkpointing, rank, targets,
                                              tokens, adapter)
    with counting("sdpa") as mem:
        out = unet(x, t, encoder_hidden_states=enc, added_cond_kwargs=added, return_dict=False)[0]
        out.float().square().mean().backward()
    return mem.peak


@lru_cache(maxsize=64)
def train_forward_held(config_json: str, batch: int, height: int, width: int, dtype: str, checkpointing: bool,
                       rank: int, targets: tuple[str, ...], tokens: int = 256, adapter: tuple = ("lora", None)) -> int:
    """Bytes a training step's forward keeps for its backward (what stays alive while ``reward=aesthetic``
    renders, as the two losses are summed before one backward)."""
    unet, (x, t, enc, added) = _training_unet(config_json, batch, height, width, dtype, checkpointing, rank, targets,
                                              tokens, adapter)
    with counting("sdpa") as mem:
        loss = unet(x, t, encoder_hidden_states=enc, added_cond_kwargs=added, return_dict=False)[0].float().square().mean()
        held = mem.current
    del loss
    return held


@lru_cache(maxsize=64)
def lora_params(config_json: str, rank: int, targets: tuple[str, ...], adapter: tuple = ("lora", None)) -> int:
    unet = meta_lora_unet(config_json, torch.float16, rank, targets, adapter)
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


@lru_cache(maxsize=64)
def vae_decode(config_json: str, batch: int, height: int, width: int, dtype: str, slicing: bool = False,
               tiling: bool = False) -> int:
    """Peak bytes of decoding ``batch`` latents to images (diffusers' slicing / tiling as set)."""
    vae = meta_model("vae", config_json, dtype)
    vae.enable_slicing() if slicing else vae.disable_slicing()
    vae.enable_tiling() if tiling else vae.disable_tiling()
    z = torch.empty(batch, vae.config.latent_channels, height // 8, width // 8, device="meta", dtype=_dtype(dtype))
    with torch.no_grad(), counting() as mem:
        vae.decode(z)
    vae.disable_slicing()
    vae.disable_tiling()
    return mem.peak


@lru_cache(maxsize=64)
def vae_encode(config_json: str, batch: int, height: int, width: int, dtype: str) -> int:
    """Peak bytes of encoding ``batch`` images to latents (the cache build, the hires refine)."""
    vae = meta_model("vae", config_json, dtype)
    x = torch.empty(batch, 3, height, width, device="meta", dtype=_dtype(dtype))
    with torch.no_grad(), counting() as mem:
        _ = vae.encode(x).latent_dist.mean  # the posterior's mean: what the cache stores
    return mem.peak


@lru_cache(maxsize=64)
def text_encode(config_json: str, batch: int, dtype: str, tokens: int = 256) -> int:
    """Peak bytes of ChatGLM on ``batch`` prompts of ``tokens`` (as encode_prompt calls it; the
    attention mask is left out: ChatGLM branches on its values, which the meta device has not).
    One call: the story's negatives are encoded in a call of their own (``encode_scenes``)."""
    te = meta_model("text_encoder", config_json, dtype)
    ids = torch.zeros(batch, tokens, dtype=torch.long, device="meta")
    with torch.no_grad(), counting() as mem:
        te(input_ids=ids, position_ids=torch.arange(tokens, device="meta")[None].expand(batch, -1),
           output_hidden_states=True)
    return mem.peak


@lru_cache(maxsize=16)
def score_batch(config_json: str, batch: int) -> int:
    """Peak bytes of the aesthetic predictor (float32, as the competition runs it) on ``batch`` images."""
    model = meta_model("scorer", config_json, "float32")
    size = json.loads(config_json).get("image_size", 224)
    x = torch.empty(batch, 3, size, size, device="meta")
    with torch.no_grad(), counting() as mem:
        model(pixel_values=x)
    return mem.peak


# Qwen2.5-VL's windowed vision tower cannot run on the meta device (aten::unique_consecutive has no
# meta kernel): its activations are counted with Qwen2-VL's full-attention tower at the same patch
# count, widened by this factor (its SwiGLU MLP is 2 x 3420 wide against Qwen2-VL's 5120).
WINDOWED_VISION_FACTOR = 1.4


@lru_cache(maxsize=8)
def caption_batch(name: str, batch: int, side: int, new_tokens: int, dtype: str, prompt_tokens: int = 64) -> int:
    """Peak bytes of captioning ``batch`` images of ``side`` x ``side`` pixels: the vision tower on all
    patches, then the language model's prefill over image + prompt + generated tokens with its KV cache."""
    from kolors_story.models.captioner import meta_captioner

    model = meta_captioner(name).to(_dtype(dtype)).eval()
    patches = (side // 28 * 2) ** 2  # 14-px patches, merged 2x2 into one token each
    vision_model = meta_captioner("qwen2_vl").to(_dtype(dtype)).model.visual if name != "qwen2_vl" else model.model.visual
    x = torch.empty(batch * patches, 3 * 2 * 14 * 14, device="meta", dtype=_dtype(dtype))
    with torch.no_grad(), counting() as mem:
        grid = side // 28 * 2
        vision_model(x, grid_thw=torch.tensor([[1, grid, grid]] * batch))
    vision = mem.peak * (1.0 if name == "qwen2_vl" else WINDOWED_VISION_FACTOR)
    length = patches // 4 + prompt_tokens + new_tokens
    text_cfg = model.config.text_config
    embeds = torch.empty(batch, length, text_cfg.hidden_size, device="meta", dtype=_dtype(dtype))
    positions = torch.zeros(3, batch, length, dtype=torch.long, device="meta")
    # the rotary embedding forces float32 with torch.autocast, which has no meta device type
    with torch.no_grad(), mock.patch("torch.autocast", lambda *a, **k: nullcontext()), counting() as mem:
        out = model.model.language_model(inputs_embeds=embeds, position_ids=positions, use_cache=True)
        model.lm_head(out.last_hidden_state[:, -1:])
    return int(max(vision, mem.peak))


@lru_cache(maxsize=4)
def captioner_weights(name: str, dtype: str) -> int:
    from kolors_story.models.captioner import meta_captioner

    return sum(p.numel() for p in meta_captioner(name).parameters()) * DTYPE_BYTES[dtype]


@lru_cache(maxsize=16)
def reward_step(unet_json: str, vae_json: str, scorer_json: str, batch: int, size: int, dtype: str, checkpointing: bool,
                rank: int, targets: tuple[str, ...], grad_steps: int = 1, guided: bool = True,
                adapter: tuple = ("lora", None), tokens: int = 256) -> int:
    """Peak bytes of a reward step (train.reward) with gradient: ``grad_steps`` UNet calls (CFG doubles
    the batch; refl: 1, draft: K) on the LoRA UNet, the VAE decode and the float32 scorer, then the
    backward through all of them. The steps without gradient cost one ``unet_call`` each (less)."""
    import torch.nn.functional as F
    from diffusers import AutoencoderKL

    unet = meta_lora_unet(unet_json, _dtype(dtype), rank, targets, adapter)
    vae = build_on("meta", lambda: AutoencoderKL(**json.loads(vae_json)), _dtype(dtype)).requires_grad_(False)
    set_gradient_checkpointing(unet, checkpointing)
    if checkpointing:
        vae.enable_gradient_checkpointing()
    scorer = meta_model("scorer", scorer_json, "float32")
    n = batch * (2 if guided else 1)
    x, t, enc, added = unet_inputs(unet, n, size, size, tokens, _dtype(dtype))
    with counting() as mem:
        latents = x[:batch]
        for _ in range(int(grad_steps)):
            eps = unet(torch.cat([latents] * (n // batch)), t, encoder_hidden_states=enc, added_cond_kwargs=added,
                       return_dict=False)[0]
            latents = latents - eps[:batch]
        images = vae.decode(latents).sample.float()
        pixels = F.interpolate(images, size=(224, 224), mode="bilinear")
        out = scorer.visual_projection(scorer.vision_model(pixel_values=pixels).pooler_output)
        scorer.layers(out / out.norm(dim=-1, keepdim=True)).sum().backward()
    return mem.peak
