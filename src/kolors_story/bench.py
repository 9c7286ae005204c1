"""``python -m kolors_story.bench``: where time and memory go, at real Kolors scale and measured here.

Sections (``--only`` picks some; the others already in ``bench.json`` are kept):

- ``flops``: real-scale accounting on the meta device (no weights): FLOPs of a LoRA training step
  at 1024x1024 (UNet forward / forward+backward, with and without gradient checkpointing), of
  ChatGLM3-6B prompt encoding (256 tokens) and of the SDXL VAE encode; the UNet step's peak
  activation memory; the parameter bytes resident in fp16. Shows what the latent/embedding cache
  saves per step against a trainer that encodes every step (the reference DiffSynth one).
- ``train``: LoRA training steps/s and peak step memory on the ``bench`` model (same classes as
  Kolors, sized for a few hundred ms per step here), from the cache vs encoding every step, and
  with vs without gradient checkpointing. Uses the trainer's own loss (``KolorsLoraModule``).
- ``generate``: the 8-scene story, prompts encoded once and scenes batched vs one pipeline call per
  scene (the seeds' loop); the images must be identical.
- ``score``: the aesthetic score at the real CLIP ViT-L/14 size (random weights), batched vs one
  image per call (the competition's loop); the scores must be identical.
- ``data``: data stage throughput (preflight, data-juicer recipe, cache build, cache reuse).

Every comparison runs A and B alternately after a warm-up and reports medians and their ratio
from the same run, so machine load drifts hit both sides. ``--quick`` uses the tiny model and one
repeat (for tests). Results: a table on the console and ``bench.json`` (written atomically).
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # Before torch loads OpenMP: on a CPU shared with other jobs, OpenMP's default spin-waiting
    # threads make every op up to 10-20x slower (measured here: a bench LoRA step 0.55 s passive vs
    # 6-8 s spinning, with 2 threads and 4 other busy processes). Set OMP_WAIT_POLICY to override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import gc
import json
import logging
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kolors_story.io import atomic_write_json, file_sha256
from kolors_story.memory import PeakTensorMemory

SECTIONS = ("flops", "train", "generate", "score", "data")
BENCH_FORMAT = 1
GB = 1e9
TFLOP = 1e12

# Tolerances of the "same output" checks: fp reordering between batch sizes may flip a pixel by
# one level (uint8) and move a score in its last float32 bits; anything more is a real difference.
PIXEL_TOLERANCE = 2
SCORE_TOLERANCE = 1e-4


class BenchError(RuntimeError):
    """A benchmark's A and B disagree (images or scores differ) or a section cannot run."""


# --------------------------------------------------------------------------------- bench model
# Same classes and wiring as Kolors (ChatGLM text_proj into an SDXL UNet with text_time
# micro-conditioning, SDXL-style VAE), sized between tiny and real: ~9 M UNet parameters at 128x128
# (16x16 latents), a few hundred ms per LoRA training step on a 2-core CPU.

BENCH_VERSION = 1
BENCH_RESOLUTION = 128
BENCH_TEXT_HIDDEN = 256
BENCH_TIME_EMBED = 32


def bench_unet_config() -> dict:
    from kolors_story.tiny import KOLORS_UNET_CONFIG

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
    from kolors_story.tiny import KOLORS_TEXT_ENCODER_CONFIG

    cfg = dict(KOLORS_TEXT_ENCODER_CONFIG)
    cfg.update(hidden_size=BENCH_TEXT_HIDDEN, ffn_hidden_size=3 * BENCH_TEXT_HIDDEN, kv_channels=32,
               num_attention_heads=8, num_layers=6, multi_query_group_num=2, seq_length=512)
    return cfg


def bench_vae_config() -> dict:
    from kolors_story.tiny import SDXL_VAE_CONFIG

    cfg = dict(SDXL_VAE_CONFIG)
    cfg.update(block_out_channels=[16, 32, 64, 64], norm_num_groups=16, sample_size=BENCH_RESOLUTION)
    return cfg


def build_bench_components(seed: int = 0) -> dict:
    """The bench model's components in memory (fp32, CPU), deterministic for ``seed``."""
    from kolors_story.tiny import build_tiny_components

    return build_tiny_components(seed, bench_text_encoder_config(), bench_unet_config(), bench_vae_config())


def ensure_bench_model(folder: str | Path, seed: int = 0) -> Path:
    """Build the bench model into ``folder`` (Kwai-Kolors/Kolors layout) unless it is there already."""
    from kolors_story.tiny import build_model_folder

    note = f"Bench-size randomly initialised Kolors (kolors-story bench v{BENCH_VERSION}): for timing only.\n"
    return build_model_folder(folder, {"version": BENCH_VERSION, "seed": seed}, "BENCH_MODEL.json",
                              lambda: build_bench_components(seed), "kolors", note=note)


# ------------------------------------------------------------------------------------ timing


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


@dataclass
class Comparison:
    """A vs B measured alternately; ``ratio`` = median(B) / median(A) (> 1: A is faster)."""

    section: str
    name: str
    a: str
    b: str
    a_runs: list[float]
    b_runs: list[float]
    unit: str = "s"
    per: str = ""  # what one run covers ("step", "story", "8 images"), for the table
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return _median(self.b_runs) / _median(self.a_runs)

    def as_dict(self) -> dict:
        return {
            "section": self.section, "name": self.name, "a": self.a, "b": self.b, "unit": self.unit,
            "per": self.per, "a_median": _median(self.a_runs), "b_median": _median(self.b_runs),
            "ratio_b_over_a": self.ratio, "a_runs": self.a_runs, "b_runs": self.b_runs, **self.extra,
        }


def alternate(a: Callable[[], object], b: Callable[[], object], repeats: int, warmup: bool = True
              ) -> tuple[list[float], list[float]]:
    """Seconds per call of ``a`` and ``b``, run A B B A A B ... so drifts in machine load hit both."""
    if warmup:  # first calls pay one-time costs (allocator growth, kernel selection, lazy state)
        a()
        b()
    ta: list[float] = []
    tb: list[float] = []
    for i in range(repeats):
        order = ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta))
        for fn, out in order:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return ta, tb


def _peak(fn: Callable[[], object]) -> int:
    gc.collect()
    with PeakTensorMemory() as mem:
        fn()
    return mem.peak


def _param_bytes(module, dtype_bytes: int | None = None) -> int:
    if module is None:
        return 0
    return sum(p.numel() * (dtype_bytes or p.element_size()) for p in module.parameters())


# ----------------------------------------------------------------------------------- context


@dataclass
class BenchContext:
    quick: bool
    repeats: int
    workdir: Path  # scratch space (datasets, caches) for this run
    model_cache: Path  # where the tiny / bench models are built once and reused
    log: Callable[[str], None] = print
    _model_dir: Path | None = None

    @property
    def model_name(self) -> str:
        return "tiny" if self.quick else "bench"

    @property
    def resolution(self) -> int:
        return 64 if self.quick else BENCH_RESOLUTION

    def model_dir(self) -> Path:
        if self._model_dir is None:
            if self.quick:
                from kolors_story.tiny import ensure_tiny_model

                self._model_dir = ensure_tiny_model(self.model_cache / "tiny-kolors-seed0", seed=0)
            else:
                folder = self.model_cache / f"bench-kolors-v{BENCH_VERSION}"
                if not (folder / "BENCH_MODEL.json").exists():
                    self.log(f"building the bench model into {folder} (once) ...")
                self._model_dir = ensure_bench_model(folder)
        return self._model_dir


# ------------------------------------------------------------------------- section: flops


def _build(device: str, make: Callable[[], torch.nn.Module], dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A model built directly on ``device`` (meta: shapes only, no memory) in ``dtype``."""
    old = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)  # built in the dtype, not cast after (diffusers warns on casts)
    try:
        with torch.device(device):
            return make()
    finally:
        torch.set_default_dtype(old)


def _unet_inputs(unet, resolution: int, tokens: int, dtype: torch.dtype, device="meta") -> tuple:
    c = unet.config
    h = resolution // 8
    text_dim = c.encoder_hid_dim
    pooled_dim = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return (
        torch.randn(1, c.in_channels, h, h, device=device, dtype=dtype),
        torch.tensor([500], device=device),
        torch.randn(1, tokens, text_dim, device=device, dtype=dtype),
        {"text_embeds": torch.randn(1, pooled_dim, device=device, dtype=dtype),
         "time_ids": torch.randn(1, 6, device=device, dtype=dtype)},
    )


class FlopCount(TorchDispatchMode):
    """Total FLOPs of the ops run inside the block, counted exactly as ``FlopCounterMode`` counts
    them (its formula registry, and its rule of decomposing ops the registry does not know) but
    without its per-module tracker: that tracker's hooks keep gradient-checkpointed activations
    alive, which would corrupt the peak memory measured in the same pass (and it costs time).
    tests/test_bench.py checks the totals equal FlopCounterMode's."""

    def __init__(self):
        super().__init__()
        self.total = 0
        from torch.utils.flop_counter import flop_registry

        self.registry = flop_registry

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.ops.prim.device.default and func not in self.registry:
            with self:
                r = func.decompose(*args, **kwargs)
            if r is not NotImplemented:
                return r
        out = func(*args, **kwargs)
        count = self.registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def count_unet_step(unet, resolution: int, tokens: int, gradient_checkpointing: bool) -> dict:
    """FLOPs of a LoRA training step's UNet forward and forward+backward, and its peak activation
    bytes (on the meta device: shapes only, so real sizes cost no memory)."""
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    unet.train()
    p = next(unet.parameters())
    x, t, enc, added = _unet_inputs(unet, resolution, tokens, p.dtype, p.device)
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

    te = _build(device, lambda: ChatGLMModel(ChatGLMConfig(**config), empty_init=False))
    ids = torch.zeros(1, tokens, dtype=torch.long, device=device)
    # No attention mask: ChatGLM branches on ``mask.all()``, which needs data the meta device does
    # not have; the FLOP counter counts attention over all positions either way.
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        te(input_ids=ids, position_ids=torch.arange(tokens, device=device)[None], output_hidden_states=True)
    return flops.get_total_flops()


def count_vae_encode(config: dict, resolution: int, device: str = "meta") -> int:
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    vae = _build(device, lambda: AutoencoderKL(**config))
    x = torch.randn(1, 3, resolution, resolution, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        _ = vae.encode(x).latent_dist.mean
    return flops.get_total_flops()


def _count_params(make: Callable[[], torch.nn.Module]) -> int:
    return sum(p.numel() for p in _build("meta", make).parameters())


def section_flops(ctx: BenchContext) -> dict:
    """Real-scale FLOPs and resident bytes of one LoRA training step, counted on the meta device
    (``--quick``: the tiny configs). The meta device matters beyond saving memory: there SDPA runs
    its math decomposition, whose matmuls the FLOP counter sees; the CPU's fused attention kernel
    is not in its registry, so counting on the CPU would leave attention out."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.kolors import ChatGLMModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

    from kolors_story import tiny
    from kolors_story.lora import DEFAULT_TARGETS, add_lora

    if ctx.quick:
        unet_cfg, te_cfg, vae_cfg, res = (tiny.tiny_unet_config(), tiny.tiny_text_encoder_config(),
                                         tiny.tiny_vae_config(), 64)
    else:
        unet_cfg, te_cfg, vae_cfg, res = (tiny.KOLORS_UNET_CONFIG, tiny.KOLORS_TEXT_ENCODER_CONFIG,
                                         tiny.SDXL_VAE_CONFIG, 1024)
    device, dtype = "meta", torch.float16  # fp16 activations, as a 16-mixed step on a GPU
    tokens, rank = 256, 16
    ctx.log(f"flops: UNet LoRA step at {res}x{res} on the {device} device ...")
    unet = _build(device, lambda: UNet2DConditionModel(**unet_cfg), dtype)
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

    # Resident during a step, fp16 weights; the LoRA trains in fp32: weight + grad + AdamW's 2 moments.
    lora_state = lora_params * (4 + 4 + 8)
    cached = unet_params * 2 + lora_state
    reference = cached + te_params * 2 + vae_params * 2
    encode = te_flops + vae_flops
    out = {
        "resolution": res, "tokens": tokens, "lora_rank": rank, "lora_targets": list(DEFAULT_TARGETS),
        "real_scale": not ctx.quick, "device": device, "activation_dtype": str(dtype).removeprefix("torch."),
        "tflop": {
            "unet_forward": plain["forward"] / TFLOP,
            "unet_forward_backward": plain["forward_backward"] / TFLOP,
            "unet_forward_backward_checkpointed": ckpt["forward_backward"] / TFLOP,
            "text_encoder_256_tokens": te_flops / TFLOP,
            "vae_encode": vae_flops / TFLOP,
        },
        "params": {"unet": unet_params, "lora": lora_params, "text_encoder": te_params, "vae": vae_params,
                   "vae_encoder": vae_encoder_params},
        "resident_gb": {"cached": cached / GB, "encode_every_step": reference / GB, "saved": (reference - cached) / GB,
                        "unet_fp16": unet_params * 2 / GB, "lora_fp32_with_adamw": lora_state / GB,
                        "text_encoder_fp16": te_params * 2 / GB, "vae_fp16": vae_params * 2 / GB},
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
    return out


# ------------------------------------------------------------------------- section: train


def _draw_training_set(folder: Path, n: int, resolution: int) -> Path:
    """A processed dataset (train/<n>.jpg + metadata.csv, the DiffSynth layout) of demo drawings."""
    from kolors_story.data.demo import draw_demo_image
    from kolors_story.data.processed import metadata_csv_text

    train = folder / "train"
    train.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        # A bit larger than the training size and not square: the resize + crop path runs.
        im, caption = draw_demo_image(i, int(resolution * 1.5), int(resolution * 1.25), seed=0)
        im.convert("RGB").save(train / f"{i}.jpg", quality=95)
        rows.append((f"{i}.jpg", caption))
    (train / "metadata.csv").write_text(metadata_csv_text(rows), encoding="utf-8")
    return folder


def _model_cfg(ctx: BenchContext, data_dir: Path):
    from omegaconf import OmegaConf

    return OmegaConf.create({
        "model": {"name": ctx.model_name, "path": str(ctx.model_dir()), "vae_path": None, "dtype": "float32",
                  "device": "cpu", "tiny": None},
        "dataset": {"resolution": ctx.resolution, "crop": "center"},
        "trainer": {"seed": 0},
        "data_dir": str(data_dir),
    })


class _Trainer:
    """One LoRA training step with the project's own pieces: ``lora.add_lora`` on the UNet and
    ``KolorsLoraModule.compute_loss`` (the trainer's loss, called exactly as in training), AdamW."""

    def __init__(self, model_dir: Path, rank: int = 16, seed: int = 0):
        from kolors_story.lightning_module import KolorsLoraModule
        from kolors_story.lora import add_lora
        from kolors_story.models import load_pipeline

        torch.manual_seed(seed)
        self.pipe = load_pipeline(model_dir, text_encoder=True)  # the reference trainer keeps all resident
        unet = self.pipe.unet
        unet.requires_grad_(False)
        self.pipe.vae.requires_grad_(False)
        self.pipe.text_encoder.requires_grad_(False)
        add_lora(unet, rank=rank, alpha=rank)
        unet.train()
        self.module = KolorsLoraModule(unet, dict(self.pipe.scheduler.config), {"lr": 1e-4})
        self.opt = self.module.configure_optimizers()["optimizer"]
        self.seed = 0

    def checkpointing(self, on: bool) -> None:
        (self.pipe.unet.enable_gradient_checkpointing if on else self.pipe.unet.disable_gradient_checkpointing)()

    def step(self, batch: dict) -> float:
        self.seed += 1
        loss = self.module.compute_loss(batch, seeds=torch.tensor([self.seed]))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def lora_state_bytes(self) -> int:
        params = [p for p in self.pipe.unet.parameters() if p.requires_grad]
        return sum(p.numel() * 4 * 4 for p in params)  # fp32 weight + grad + 2 AdamW moments


def section_train(ctx: BenchContext) -> dict:
    from torch.utils.data import default_collate

    from kolors_story.cache import build_cache, preprocess_image, target_size
    from kolors_story.training import CachedItems

    data_dir = _draw_training_set(ctx.workdir / "train-data", n=4, resolution=ctx.resolution)
    cfg = _model_cfg(ctx, data_dir)
    ctx.log("train: building the cache with the project's cache module ...")
    cache = build_cache(cfg, prepared=data_dir)
    items = CachedItems(cache.items)
    pairs = [(data_dir / "train" / f"{i}.jpg") for i in range(len(cache.items))]
    from kolors_story.data.processed import read_metadata_csv

    captions = [text for _, text in read_metadata_csv(data_dir / "train" / "metadata.csv")]
    shas = [file_sha256(p) for p in pairs]
    hw = target_size(ctx.resolution)
    trainer = _Trainer(ctx.model_dir())
    pipe = trainer.pipe
    n = len(cache.items)
    counter = {"i": 0}

    def next_index() -> int:
        counter["i"] += 1
        return counter["i"] % n

    def cached_batch(i: int) -> dict:
        return default_collate([items[(i, 0)]])  # reads the .safetensors file, as the trainer's loader

    @torch.no_grad()
    def encoded_batch(i: int) -> dict:
        # What a trainer without a cache does every step: decode + resize the image, VAE-encode it,
        # run ChatGLM on the caption (DiffSynth's Kolors trainer keeps both models resident for this).
        pixels, ids = preprocess_image(pairs[i], hw, "center", 0, shas[i])
        latents = pipe.vae.encode(pixels[None]).latent_dist.mean * pipe.vae.config.scaling_factor
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=[captions[i]], device=torch.device("cpu"),
                                                  num_images_per_prompt=1, do_classifier_free_guidance=False,
                                                  max_sequence_length=256)
        return {"latents": latents, "prompt_embeds": embeds, "pooled_prompt_embeds": pooled,
                "add_time_ids": torch.tensor([ids], dtype=torch.float32)}

    # Same inputs either way (else the comparison would be meaningless): the cache holds exactly
    # what encoding computes.
    a, b = cached_batch(0), encoded_batch(0)
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in ("latents", "prompt_embeds",
                                                                         "pooled_prompt_embeds", "add_time_ids"))
    if diff > 1e-4:
        raise BenchError(f"train: the cached batch differs from encoding on the fly by {diff:g}")

    steps = 1 if ctx.quick else 3

    def run(make_batch) -> Callable[[], None]:
        def go():
            for _ in range(steps):
                trainer.step(make_batch(next_index()))
        return go

    comps: list[Comparison] = []
    ctx.log("train: cached vs encode-every-step ...")
    trainer.checkpointing(False)
    ta, tb = alternate(run(cached_batch), run(encoded_batch), ctx.repeats, warmup=not ctx.quick)
    comps.append(Comparison("train", "LoRA step: cache vs encode every step", "cached", "encode every step",
                            [t / steps for t in ta], [t / steps for t in tb], per="step"))
    peak_cached = _peak(lambda: trainer.step(cached_batch(next_index())))
    peak_encoded = _peak(lambda: trainer.step(encoded_batch(next_index())))

    ctx.log("train: gradient checkpointing off vs on ...")

    def with_ckpt(on: bool):
        def go():
            trainer.checkpointing(on)
            run(cached_batch)()
        return go

    ta, tb = alternate(with_ckpt(False), with_ckpt(True), ctx.repeats, warmup=not ctx.quick)
    trainer.checkpointing(True)
    peak_ckpt = _peak(lambda: trainer.step(cached_batch(next_index())))
    trainer.checkpointing(False)
    comps.append(Comparison("train", "LoRA step: gradient checkpointing off vs on", "no checkpointing",
                            "checkpointing", [t / steps for t in ta], [t / steps for t in tb], per="step",
                            extra={"peak_step_mb_a": peak_cached / 1e6, "peak_step_mb_b": peak_ckpt / 1e6}))

    ctx.log("train: raw loop vs Lightning Trainer.fit (the project's module + loader) ...")
    raw_step = _median(comps[0].a_runs)

    def raw():
        run(cached_batch)()

    lightning_steps: list[float] = []

    def lightning():
        lightning_steps.extend(_lightning_step_times(trainer.module, cache.items, steps))

    ta, tb = alternate(raw, lightning, ctx.repeats, warmup=False)
    per_fit = len(lightning_steps) // max(1, ctx.repeats)
    b_runs = [_median(lightning_steps[i * per_fit:(i + 1) * per_fit]) for i in range(ctx.repeats)]
    comps.append(Comparison("train", "LoRA step: raw loop vs Lightning Trainer.fit", "raw loop", "Lightning fit",
                            [t / steps for t in ta], b_runs, per="step",
                            extra={"note": "Lightning: time between consecutive batch starts (loader, step, "
                                           "optimizer, hooks); Trainer setup excluded"}))
    # Cache I/O per step: read one item's .safetensors file and collate it, as the trainer's loader does.
    reads = []
    for i in range(10 if not ctx.quick else 2):
        t0 = time.perf_counter()
        cached_batch(i % n)
        reads.append(time.perf_counter() - t0)

    lora = trainer.lora_state_bytes()
    resident_cached = _param_bytes(pipe.unet) - sum(p.numel() * 4 for p in pipe.unet.parameters() if p.requires_grad) + lora
    return {
        "model": ctx.model_name, "resolution": ctx.resolution, "steps_per_run": steps,
        "loss": "KolorsLoraModule.compute_loss", "batch_size": 1, "lora_rank": 16,
        "steps_per_s": {"cached": 1 / _median(comps[0].a_runs), "encode_every_step": 1 / _median(comps[0].b_runs),
                        "checkpointing": 1 / _median(comps[1].b_runs)},
        "peak_step_mb": {"cached": peak_cached / 1e6, "encode_every_step": peak_encoded / 1e6,
                         "cached_checkpointing": peak_ckpt / 1e6},
        "resident_mb": {"cached": resident_cached / 1e6,
                        "encode_every_step": (resident_cached + _param_bytes(pipe.text_encoder) + _param_bytes(pipe.vae)) / 1e6},
        "cache_vs_encoding_max_diff": diff,
        "cache_read_ms_per_step": 1000 * _median(reads),
        "cache_read_share_of_step": _median(reads) / raw_step,
        "comparisons": [c.as_dict() for c in comps],
    }


def _lightning_step_times(module, items, steps: int) -> list[float]:
    """Seconds per training step inside ``lightning.Trainer.fit`` with the project's module and
    loader (``training.make_loader``): time between consecutive batch starts, first step dropped."""
    import lightning as L

    from kolors_story.training import make_loader

    class Clock(L.Callback):
        def __init__(self):
            self.marks: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.marks.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module):
            self.marks.append(time.perf_counter())

    clock = Clock()
    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # no "GPU available" banners in the bench output
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _fit(L, module, items, steps, clock, make_loader)
    finally:
        quiet.setLevel(level)


def _fit(L, module, items, steps, clock, make_loader) -> list[float]:
    trainer = L.Trainer(max_steps=steps + 1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[clock])
    loader = make_loader(items, {"batch_size": 1, "steps_per_epoch": steps + 1, "seed": 0, "num_workers": 0})
    trainer.fit(module, loader)
    module.step_losses.clear()
    module._trainer = None  # the next raw step must not see a finished Trainer
    return [b - a for a, b in zip(clock.marks[1:-1], clock.marks[2:])]


# ---------------------------------------------------------------------- section: generate


def _story_scenes(name: str = "idol_diary"):
    """The configured story's 8 scenes, composed from conf/ exactly as generate.py does."""
    from hydra import compose, initialize_config_dir

    from kolors_story.story import scenes_from_config

    conf = Path(__file__).resolve().parents[2] / "conf"
    if not (conf / "generate.yaml").exists():
        raise BenchError(f"the config folder {conf} is missing: run the bench from a checkout (pip install -e .)")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="generate", overrides=[f"story={name}", "model=tiny"])
    return scenes_from_config(cfg.story, cfg.sampler)


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.int16) for im in images])


def section_generate(ctx: BenchContext) -> dict:
    from kolors_story.generation import encode_scenes, render_scenes
    from kolors_story.models import load_pipeline

    scenes = _story_scenes()
    pipe = load_pipeline(ctx.model_dir())
    size = ctx.resolution
    steps, cfg_scale = (1, 5.0) if ctx.quick else (4, 5.0)
    results = {}

    def batched():
        embeds = encode_scenes(pipe, scenes)
        results["batched"] = render_scenes(pipe, scenes, embeds, steps=steps, cfg=cfg_scale, height=size,
                                           width=size, batch_size=len(scenes))

    def per_scene():
        # The seeds' loop: one full pipeline call (prompt encoding included) per scene, seeded.
        out = []
        for s in scenes:
            out += pipe(prompt=s.prompt, negative_prompt=s.negative, num_inference_steps=steps,
                        guidance_scale=cfg_scale, height=size, width=size,
                        generator=torch.Generator("cpu").manual_seed(s.seed)).images
        results["per_scene"] = out

    ctx.log(f"generate: {len(scenes)} scenes batched vs one pipeline call per scene ...")
    ta, tb = alternate(batched, per_scene, ctx.repeats, warmup=not ctx.quick)
    diff = int(np.abs(_pixels(results["batched"]) - _pixels(results["per_scene"])).max())
    if diff > PIXEL_TOLERANCE:
        raise BenchError(f"generate: batched and per-scene images differ by up to {diff} levels (tolerance {PIXEL_TOLERANCE})")
    comp = Comparison("generate", f"story of {len(scenes)}: batched vs per-scene calls", "batched (encode once)",
                      "per-scene pipeline calls", ta, tb, per="story", extra={"max_pixel_diff": diff})
    return {"model": ctx.model_name, "scenes": len(scenes), "size": size, "steps": steps, "cfg": cfg_scale,
            "max_pixel_diff": diff, "seconds_per_scene": {"batched": _median(ta) / len(scenes),
                                                          "per_scene": _median(tb) / len(scenes)},
            "comparisons": [comp.as_dict()]}


# ------------------------------------------------------------------------- section: score


def _score_images(n: int, size: int) -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        # Smooth colour fields + noise at story-image size: the processor's resize + crop run for real.
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        im = Image.fromarray(base).resize((size, size), Image.Resampling.BICUBIC)
        noise = rng.integers(-12, 13, (size, size, 3))
        out.append(Image.fromarray(np.clip(np.asarray(im, dtype=np.int16) + noise, 0, 255).astype(np.uint8)))
    return out


def section_score(ctx: BenchContext) -> dict:
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from transformers import CLIPVisionConfig

    from kolors_story.scoring import (
        REAL_PREDICTOR_CONFIG,
        AestheticScorer,
        build_clip_processor,
        tiny_predictor_config,
    )

    config = tiny_predictor_config() if ctx.quick else dict(REAL_PREDICTOR_CONFIG)
    config = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    ctx.log(f"score: building a {'tiny' if ctx.quick else 'real-size CLIP ViT-L/14'} predictor (random weights) ...")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        predictor = AestheticsPredictorV2Linear(CLIPVisionConfig(**config)).eval()
    processor = build_clip_processor()
    scorer = AestheticScorer(predictor, processor, device="cpu", batch_size=8)
    n_params = sum(p.numel() for p in predictor.parameters())
    images = _score_images(8, 256 if ctx.quick else 1024)
    results = {}

    def batched():
        results["batched"] = scorer.score(images)

    def competition_loop():
        # The competition's get_aesthetics_score, one image per call.
        scores = []
        for image in images:
            inputs = processor(images=image, return_tensors="pt")
            with torch.no_grad():
                scores.append(predictor(**inputs).logits.tolist()[0][0])
        results["loop"] = scores

    ctx.log("score: batched vs one image per call ...")
    ta, tb = alternate(batched, competition_loop, ctx.repeats, warmup=not ctx.quick)
    diff = max(abs(x - y) for x, y in zip(results["batched"], results["loop"]))
    if diff > SCORE_TOLERANCE:
        raise BenchError(f"score: batched and per-image scores differ by {diff:g} (tolerance {SCORE_TOLERANCE})")
    comp = Comparison("score", "8 images: batched vs per-image", "batched (8 per call)", "one image per call",
                      ta, tb, per="8 images", extra={"max_score_diff": diff})
    return {"predictor_params": n_params, "real_size": not ctx.quick, "images": len(images),
            "max_score_diff": diff, "seconds_per_image": {"batched": _median(ta) / len(images),
                                                          "per_image": _median(tb) / len(images)},
            "comparisons": [comp.as_dict()]}


# -------------------------------------------------------------------------- section: data


def section_data(ctx: BenchContext) -> dict:
    from omegaconf import OmegaConf

    from kolors_story.cache import build_cache
    from kolors_story.data import prepare_dataset
    from kolors_story.data.preflight import preflight
    from kolors_story.data.sources import list_source

    data_dir = ctx.workdir / "data-demo"
    conf = Path(__file__).resolve().parents[2] / "conf"
    filter_name = "none" if ctx.quick else "default"
    base = OmegaConf.merge(
        {"dataset": OmegaConf.load(conf / "dataset" / "demo.yaml"), "filter": OmegaConf.load(conf / "filter" / f"{filter_name}.yaml")},
        _model_cfg(ctx, data_dir),
    )
    base.dataset.path = str(data_dir / "raw")
    base.dataset.resolution = ctx.resolution
    out: dict = {"model": ctx.model_name, "filter": filter_name}

    t0 = time.perf_counter()
    listing = list_source(base.dataset)  # draws the demo images the first time
    out["source_seconds"] = time.perf_counter() - t0
    n = len(listing.candidates)
    ctx.log(f"data: preflight of {n} images ...")
    t0 = time.perf_counter()
    pre = preflight(listing.candidates, ctx.workdir / "preflight-bench", progress=False)
    dt = time.perf_counter() - t0
    out["preflight"] = {"images": n, "kept": len(pre.kept), "seconds": dt, "images_per_s": n / dt}

    ctx.log(f"data: prepare_dataset (preflight + filter={filter_name} + train/ folder) ...")
    t0 = time.perf_counter()
    prepared = prepare_dataset(base, progress=False)
    dt = time.perf_counter() - t0
    report = prepared.report
    out["prepare"] = {"images": n, "kept": len(prepared.items), "seconds": dt, "images_per_s": n / dt,
                      "filter_seconds": (report.get("filter") or {}).get("seconds")}
    if out["prepare"]["filter_seconds"]:
        out["prepare"]["filter_images_per_s"] = n / out["prepare"]["filter_seconds"]

    ctx.log("data: cache build (VAE latents + ChatGLM embeddings) and reuse ...")
    t0 = time.perf_counter()
    build_cache(base, prepared)
    dt = time.perf_counter() - t0
    m = len(prepared.items)
    out["cache_build"] = {"images": m, "seconds": dt, "images_per_s": m / dt}
    t0 = time.perf_counter()
    again = build_cache(base, prepared)
    dt = time.perf_counter() - t0
    out["cache_reuse"] = {"images": m, "seconds": dt, "images_per_s": m / dt,
                          "files_reused": again.stats.get("files_reused") if hasattr(again, "stats") else None}
    return out


# ---------------------------------------------------------------------------------- output

RUNNERS = {"flops": section_flops, "train": section_train, "generate": section_generate,
           "score": section_score, "data": section_data}


def _machine() -> dict:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "loadavg_at_start": load, "cuda": torch.cuda.is_available(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def _fmt_s(x: float) -> str:
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def render_table(result: dict):
    """The rich table of a bench result (what the README shows)."""
    from rich.table import Table

    table = Table(title=f"kolors-story bench ({'quick' if result.get('quick') else 'full'})", show_lines=False)
    table.add_column("section")
    table.add_column("measure")
    table.add_column("A", justify="right")
    table.add_column("B", justify="right")
    table.add_column("B / A", justify="right")
    s = result.get("sections", {})
    f = s.get("flops")
    if f and "error" not in f:
        tf, scale = f["tflop"], f"{f['resolution']}²"
        table.add_row("flops", f"UNet fwd / fwd+bwd, LoRA r{f['lora_rank']} ({scale})",
                      f"{tf['unet_forward']:.2f} TFLOP", f"{tf['unet_forward_backward']:.2f} TFLOP",
                      f"{f['step_ratio']['forward_backward_over_forward']:.2f}x")
        table.add_row("flops", "UNet fwd+bwd: no ckpt / grad checkpointing", f"{tf['unet_forward_backward']:.2f} TFLOP",
                      f"{tf['unet_forward_backward_checkpointed']:.2f} TFLOP",
                      f"{tf['unet_forward_backward_checkpointed'] / tf['unet_forward_backward']:.2f}x")
        table.add_row("flops", f"ChatGLM encode ({f['tokens']} tok) / VAE encode ({scale})",
                      f"{tf['text_encoder_256_tokens']:.2f} TFLOP", f"{tf['vae_encode']:.2f} TFLOP", "")
        cs = f["cache_saving"]
        table.add_row("flops", "cache saves per step (FLOPs, no ckpt / ckpt)", f"{cs['flops_pct_no_checkpointing']:.1f} %",
                      f"{cs['flops_pct_checkpointing']:.1f} %", "")
        r = f["resident_gb"]
        table.add_row("flops", "resident fp16 params: cached / encode every step", f"{r['cached']:.2f} GB",
                      f"{r['encode_every_step']:.2f} GB", f"{r['encode_every_step'] / r['cached']:.2f}x")
        a = f["activation_gb"]
        table.add_row("flops", f"UNet step activations: no ckpt / ckpt ({f['activation_dtype']})", f"{a['no_checkpointing']:.2f} GB",
                      f"{a['checkpointing']:.2f} GB", f"{a['checkpointing'] / a['no_checkpointing']:.2f}x")
    for name in ("train", "generate", "score"):
        sec = s.get(name)
        if not sec or "error" in sec:
            continue
        for c in sec["comparisons"]:
            table.add_row(name, f"{c['name']} (per {c['per']})", _fmt_s(c["a_median"]),
                          _fmt_s(c["b_median"]), f"{c['ratio_b_over_a']:.2f}x")
        if name == "train":
            table.add_row("train", "cache read + collate per step (share of a cached step)",
                          f"{sec['cache_read_ms_per_step']:.1f} ms", f"{100 * sec['cache_read_share_of_step']:.1f} %", "")
            p = sec["peak_step_mb"]
            table.add_row("train", "peak step memory: no ckpt / grad checkpointing", f"{p['cached']:.0f} MB",
                          f"{p['cached_checkpointing']:.0f} MB", f"{p['cached_checkpointing'] / p['cached']:.2f}x")
            r = sec["resident_mb"]
            table.add_row("train", "resident params: cached / encode every step", f"{r['cached']:.0f} MB",
                          f"{r['encode_every_step']:.0f} MB", f"{r['encode_every_step'] / r['cached']:.2f}x")
    d = s.get("data")
    if d and "error" not in d:
        table.add_row("data", f"preflight / prepare_dataset (preflight + filter={d['filter']})",
                      f"{d['preflight']['images_per_s']:.1f} img/s", f"{d['prepare']['images_per_s']:.1f} img/s", "")
        if d["prepare"].get("filter_images_per_s"):
            table.add_row("data", "data-juicer recipe alone (dj-process subprocess)", "",
                          f"{d['prepare']['filter_images_per_s']:.1f} img/s", "")
        table.add_row("data", "cache build / cache reuse", f"{d['cache_build']['images_per_s']:.1f} img/s",
                      f"{d['cache_reuse']['images_per_s']:.1f} img/s", "")
    for name, sec in s.items():
        if isinstance(sec, dict) and "error" in sec:
            table.add_row(name, "FAILED", sec["error"][:80], "", "")
    return table


def run_bench(sections=SECTIONS, *, quick: bool = False, repeats: int | None = None, out: str | Path = "bench.json",
              model_cache: str | Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Run the sections, merge them into ``out`` (other sections already there are kept), return the result."""
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise BenchError(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    out = Path(out)
    repeats = int(repeats if repeats is not None else (1 if quick else 3))
    if repeats < 1:
        raise BenchError(f"--repeats={repeats}: must be >= 1")
    cache = Path(model_cache or os.environ.get("KOLORS_STORY_CACHE", ".cache/kolors-story")).expanduser()
    result: dict = {}
    if out.exists():
        try:
            previous = json.loads(out.read_text(encoding="utf-8"))
            if previous.get("format") == BENCH_FORMAT and previous.get("quick") == quick:
                result = previous
        except ValueError:
            log(f"{out} is not valid JSON: it will be replaced")
    result.update(format=BENCH_FORMAT, quick=quick, repeats=repeats, machine=_machine())
    result.setdefault("sections", {})
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kolors-bench-") as tmp:
        ctx = BenchContext(quick=quick, repeats=repeats, workdir=Path(tmp), model_cache=cache, log=log)
        for name in sections:
            t0 = time.perf_counter()
            torch.manual_seed(0)
            try:
                sec = RUNNERS[name](ctx)
            except BenchError:
                raise
            except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others
                sec = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"{name}: FAILED ({sec['error']})")
            sec["seconds"] = time.perf_counter() - t0
            result["sections"][name] = sec
            atomic_write_json(out, result)  # each finished section is kept even if a later one dies
            gc.collect()
    result["seconds"] = time.perf_counter() - t_all
    atomic_write_json(out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kolors_story.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 repeat (seconds; for tests)")
    parser.add_argument("--only", action="append", choices=SECTIONS, metavar="SECTION",
                        help=f"run only this section (repeatable): {', '.join(SECTIONS)}")
    parser.add_argument("--repeats", type=int, default=None, help="A/B pairs per comparison after one warm-up pair (default 3, quick 1)")
    parser.add_argument("--out", default="bench.json", help="result file (default: bench.json)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from rich.console import Console

    console = Console(width=max(120, shutil.get_terminal_size((120, 24)).columns))
    try:
        result = run_bench(args.only or SECTIONS, quick=args.quick, repeats=args.repeats, out=args.out,
                           log=lambda m: console.print(f"[dim]{m}[/dim]"))
    except BenchError as exc:
        console.print(f"[red]bench failed:[/red] {exc}")
        return 1
    console.print(render_table(result))
    load = result["machine"].get("loadavg_at_start")
    if load and load[0] > (os.cpu_count() or 1):
        console.print(f"[yellow]The CPU was busy when the bench started (load {load[0]:.1f} on {os.cpu_count()} cores): "
                      "absolute times are inflated; the A/B ratios are measured under the same load.[/yellow]")
    console.print(f"wrote {Path(args.out).resolve()} in {result['seconds']:.0f} s")
    failed = [k for k, v in result["sections"].items() if isinstance(v, dict) and "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
