"""Section ``train``: LoRA training steps/s and peak step memory on the bench model (same classes as
Kolors, sized for a few hundred ms per step here), from the cache vs encoding every step, with vs
without gradient checkpointing, and a raw loop vs Lightning's ``Trainer.fit``. Uses the trainer's
own loss (``KolorsLoraModule.compute_loss``) and loader."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from kolors_story import tiny
from kolors_story.bench.timing import (
    BenchContext,
    BenchError,
    Comparison,
    alternate,
    median,
    param_bytes,
    peak,
)
from kolors_story.config import ModelSettings, OptimSettings, TrainerSettings
from kolors_story.files import file_sha256
from kolors_story.models.checkpointing import set_gradient_checkpointing


def _draw_training_set(folder: Path, n: int, resolution: int) -> Path:
    """A processed dataset (train/<n>.jpg + metadata.csv, the DiffSynth layout) of demo drawings."""
    from kolors_story.data.processed import metadata_csv_text

    train = folder / "train"
    train.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        # A bit larger than the training size and not square: the resize + crop path runs.
        im, caption = tiny.draw_demo_image(i, int(resolution * 1.5), int(resolution * 1.25), seed=0)
        im.convert("RGB").save(train / f"{i}.jpg", quality=95)
        rows.append((f"{i}.jpg", caption))
    (train / "metadata.csv").write_text(metadata_csv_text(rows), encoding="utf-8")
    return folder


class _Trainer:
    """One LoRA training step with the project's own pieces: ``lora.add_lora`` on the UNet and
    ``KolorsLoraModule.compute_loss`` (the trainer's loss, called exactly as in training), AdamW."""

    def __init__(self, model_dir: Path, rank: int = 16, seed: int = 0):
        from kolors_story.lora import add_lora
        from kolors_story.models.loading import load_pipeline
        from kolors_story.train.module import KolorsLoraModule

        torch.manual_seed(seed)
        self.pipe = load_pipeline(model_dir, text_encoder=True)  # the reference trainer keeps all resident
        unet = self.pipe.unet
        unet.requires_grad_(False)
        self.pipe.vae.requires_grad_(False)
        self.pipe.text_encoder.requires_grad_(False)
        add_lora(unet, rank=rank, alpha=rank)
        unet.train()
        self.module = KolorsLoraModule(unet, dict(self.pipe.scheduler.config), OptimSettings(lr=1e-4, weight_decay=0.0))
        self.opt = self.module.configure_optimizers()["optimizer"]
        self.seed = 0

    def checkpointing(self, on: bool) -> None:
        set_gradient_checkpointing(self.pipe.unet, on)

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


def bench_model(ctx: BenchContext) -> ModelSettings:
    """The tiny (``--quick``) or bench model as model settings (CPU, fp32)."""
    return ModelSettings(name=ctx.model_name, path=str(ctx.model_dir()), vae_path=None, dtype="float32", device="cpu")


class _Batches:
    """Training batches of the drawn set, from the cache (as the trainer's loader reads them) or
    encoded on the fly (what a trainer without a cache does every step)."""

    def __init__(self, ctx: BenchContext, data_dir: Path, cache, pipe):
        from kolors_story.data.crop import target_size
        from kolors_story.data.processed import read_metadata_csv
        from kolors_story.train.loader import CachedItems

        self.cache = cache
        self.items = CachedItems(self.cache.items)
        self.n = len(self.cache.items)
        self.paths = [data_dir / "train" / f"{i}.jpg" for i in range(self.n)]
        self.captions = [text for _, text in read_metadata_csv(data_dir / "train" / "metadata.csv")]
        self.shas = [file_sha256(p) for p in self.paths]
        self.hw = target_size(ctx.resolution)
        self.pipe = pipe
        self.i = 0

    def next_index(self) -> int:
        self.i += 1
        return self.i % self.n

    def cached(self, i: int) -> dict:
        from torch.utils.data import default_collate

        return default_collate([self.items[(i, 0)]])  # reads the .safetensors file, as the trainer's loader

    @torch.no_grad()
    def encoded(self, i: int) -> dict:
        # Decode + resize the image, VAE-encode it, run ChatGLM on the caption (DiffSynth's Kolors
        # trainer keeps both models resident for this).
        from kolors_story.data.crop import preprocess_image

        pipe = self.pipe
        pixels, ids = preprocess_image(self.paths[i], self.hw, "center", 0, self.shas[i])
        latents = pipe.vae.encode(pixels[None]).latent_dist.mean * pipe.vae.config.scaling_factor
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=[self.captions[i]], device=torch.device("cpu"),
                                                  num_images_per_prompt=1, do_classifier_free_guidance=False,
                                                  max_sequence_length=256)
        return {"latents": latents, "prompt_embeds": embeds, "pooled_prompt_embeds": pooled,
                "add_time_ids": torch.tensor([ids], dtype=torch.float32)}

    def max_difference(self) -> float:
        """Same inputs either way (else the comparison would be meaningless): the cache holds
        exactly what encoding computes."""
        a, b = self.cached(0), self.encoded(0)
        keys = ("latents", "prompt_embeds", "pooled_prompt_embeds", "add_time_ids")
        return max(float((a[k].float() - b[k].float()).abs().max()) for k in keys)


def _compare_cache_and_checkpointing(ctx: BenchContext, trainer: _Trainer, batches: _Batches, steps: int) -> dict:
    def run(make_batch) -> Callable[[], None]:
        def go():
            for _ in range(steps):
                trainer.step(make_batch(batches.next_index()))
        return go

    ctx.log("train: cached vs encode-every-step ...")
    trainer.checkpointing(False)
    ta, tb = alternate(run(batches.cached), run(batches.encoded), ctx.repeats, warmup=not ctx.quick)
    cache = Comparison("train", "LoRA step: cache vs encode every step", "cached", "encode every step",
                       [t / steps for t in ta], [t / steps for t in tb], per="step")
    peaks = {"cached": peak(lambda: trainer.step(batches.cached(batches.next_index()))),
             "encoded": peak(lambda: trainer.step(batches.encoded(batches.next_index())))}

    ctx.log("train: gradient checkpointing off vs on ...")

    def with_ckpt(on: bool):
        def go():
            trainer.checkpointing(on)
            run(batches.cached)()
        return go

    ta, tb = alternate(with_ckpt(False), with_ckpt(True), ctx.repeats, warmup=not ctx.quick)
    trainer.checkpointing(True)
    peaks["checkpointing"] = peak(lambda: trainer.step(batches.cached(batches.next_index())))
    trainer.checkpointing(False)
    ckpt = Comparison("train", "LoRA step: gradient checkpointing off vs on", "no checkpointing", "checkpointing",
                      [t / steps for t in ta], [t / steps for t in tb], per="step",
                      extra={"peak_step_mb_a": peaks["cached"] / 1e6, "peak_step_mb_b": peaks["checkpointing"] / 1e6})
    return {"cache": cache, "ckpt": ckpt, "peaks": peaks, "run": run}


def _compare_lightning(ctx: BenchContext, trainer: _Trainer, batches: _Batches, steps: int, run) -> Comparison:
    ctx.log("train: raw loop vs Lightning Trainer.fit (the project's module + loader) ...")
    lightning_steps: list[float] = []

    def lightning():
        lightning_steps.extend(_lightning_step_times(trainer.module, batches.cache.items, steps))

    ta, _ = alternate(run(batches.cached), lightning, ctx.repeats, warmup=False)
    per_fit = len(lightning_steps) // max(1, ctx.repeats)
    b_runs = [median(lightning_steps[i * per_fit:(i + 1) * per_fit]) for i in range(ctx.repeats)]
    return Comparison("train", "LoRA step: raw loop vs Lightning Trainer.fit", "raw loop", "Lightning fit",
                      [t / steps for t in ta], b_runs, per="step",
                      extra={"note": "Lightning: time between consecutive batch starts (loader, step, "
                                     "optimizer, hooks); Trainer setup excluded"})


def section_train(ctx: BenchContext) -> dict:
    from kolors_story.data.cache import build_cache

    data_dir = _draw_training_set(ctx.workdir / "train-data", n=4, resolution=ctx.resolution)
    ctx.log("train: building the cache with the project's cache module ...")
    cache = build_cache(bench_model(ctx), data_dir, data_dir=data_dir, resolution=ctx.resolution)
    trainer = _Trainer(ctx.model_dir())
    batches = _Batches(ctx, data_dir, cache, trainer.pipe)
    diff = batches.max_difference()
    if diff > 1e-4:
        raise BenchError(f"train: the cached batch differs from encoding on the fly by {diff:g}")
    steps = 1 if ctx.quick else 3
    first = _compare_cache_and_checkpointing(ctx, trainer, batches, steps)
    comps = [first["cache"], first["ckpt"], _compare_lightning(ctx, trainer, batches, steps, first["run"])]
    reads = []  # cache I/O per step: read one item's file and collate it, as the trainer's loader does
    for i in range(10 if not ctx.quick else 2):
        t0 = time.perf_counter()
        batches.cached(i % batches.n)
        reads.append(time.perf_counter() - t0)
    pipe, peaks = trainer.pipe, first["peaks"]
    trainable = sum(p.numel() * 4 for p in pipe.unet.parameters() if p.requires_grad)
    resident_cached = param_bytes(pipe.unet) - trainable + trainer.lora_state_bytes()
    return {
        "model": ctx.model_name, "resolution": ctx.resolution, "steps_per_run": steps,
        "loss": "KolorsLoraModule.compute_loss", "batch_size": 1, "lora_rank": 16,
        "steps_per_s": {"cached": 1 / median(comps[0].a_runs), "encode_every_step": 1 / median(comps[0].b_runs),
                        "checkpointing": 1 / median(comps[1].b_runs)},
        "peak_step_mb": {"cached": peaks["cached"] / 1e6, "encode_every_step": peaks["encoded"] / 1e6,
                         "cached_checkpointing": peaks["checkpointing"] / 1e6},
        "resident_mb": {"cached": resident_cached / 1e6,
                        "encode_every_step": (resident_cached + param_bytes(pipe.text_encoder) + param_bytes(pipe.vae)) / 1e6},
        "cache_vs_encoding_max_diff": diff,
        "cache_read_ms_per_step": 1000 * median(reads),
        "cache_read_share_of_step": median(reads) / median(comps[0].a_runs),
        "comparisons": [c.as_dict() for c in comps],
    }


def _lightning_step_times(module, items, steps: int) -> list[float]:
    """Seconds per training step inside ``lightning.Trainer.fit`` with the project's module and
    loader (``train.loader.make_loader``): time between consecutive batch starts, first step dropped."""
    import lightning as L

    from kolors_story.train.loader import make_loader

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
    loader = make_loader(items, TrainerSettings(batch_size=1, steps_per_epoch=steps + 1, seed=0, num_workers=0))
    trainer.fit(module, loader)
    module.step_losses.clear()
    module._trainer = None  # the next raw step must not see a finished Trainer
    return [b - a for a, b in zip(clock.marks[1:-1], clock.marks[2:])]
