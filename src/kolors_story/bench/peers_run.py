"""The peers' side of the bench's ``peers`` section, each a whole process of its own:

- ``loop``: the seeds' generation loop, diffusers' ``KolorsPipeline`` called once per scene (prompt
  encoding, denoising with classifier-free guidance, decoding), with the story's own prompts, negatives and seeds;
- ``diffsynth``: DiffSynth-Studio 1.1.9's Kolors LoRA trainer (the competition's): its
  ``LightningModelForT2ILoRA`` built as its ``examples/train/kolors/train_kolors_lora.py`` builds it
  (``ModelManager`` -> ``SDXLImagePipeline``, peft LoRA on the UNet), trained by Lightning on its own
  ``TextImageDataset``; only the accelerator differs (``cpu``: its launcher hard-codes ``gpu``);
- ``train``: this project's ``train.py`` with the given overrides, unchanged;
- ``scene-batches``: seconds per scene of one denoising call (the UNet with classifier-free guidance)
  at each scene batch: what ``plan.auto.CPU_SCENE_BATCH`` is chosen from.

Both trainers run with the same step clock (:class:`StepParts`, added to Lightning's callbacks from
outside): where each step's time goes (data, prompt encoding, VAE encoding, UNet forward, the rest of
the forward and the loss, backward, optimizer), from timestamps only, so nothing is slowed.

``python -m kolors_story.bench.peers_run loop|diffsynth|train --help``. Each writes what it measured to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PARTS = ("data", "prompt encode", "VAE encode", "UNet forward", "rest of forward + loss", "backward",
         "optimizer")


class StepParts:
    """Per-step seconds of each part of a Lightning training step, from hook timestamps and timed
    calls (the text encoder, the VAE encoder and the UNet's forward)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.ends: list[float] = []
        self._calls: dict[str, float] = {}
        self._mark = time.perf_counter()
        self._current: dict[str, float] = {}

    def timed(self, part: str, fn):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._calls[part] = self._calls.get(part, 0.0) + time.perf_counter() - t0
        return call

    def callback(self):
        import lightning as pl

        parts = self

        class Clock(pl.Callback):
            def on_train_batch_start(self, *_a, **_k):
                now = time.perf_counter()
                parts._current = {"data": now - parts._mark}
                parts._calls = {}
                parts._mark = now

            def on_before_backward(self, *_a, **_k):
                now = time.perf_counter()
                forward = now - parts._mark
                for part in ("prompt encode", "VAE encode", "UNet forward"):
                    parts._current[part] = parts._calls.get(part, 0.0)
                parts._current["rest of forward + loss"] = forward - sum(parts._calls.values())
                parts._mark = now

            def on_after_backward(self, *_a, **_k):
                now = time.perf_counter()
                parts._current["backward"] = now - parts._mark
                parts._mark = now

            def on_train_batch_end(self, *_a, **_k):
                now = time.perf_counter()
                parts._current["optimizer"] = now - parts._mark
                parts._mark = now
                parts.steps.append(parts._current)
                parts.ends.append(time.time())

        return Clock()

    def install(self) -> None:
        """Every Lightning Trainer made from now on carries the clock."""
        import lightning as pl

        init = pl.Trainer.__init__
        clock = self.callback()

        def with_clock(trainer, *args, callbacks=None, **kwargs):
            callbacks = list(callbacks or []) + [clock]
            init(trainer, *args, callbacks=callbacks, **kwargs)

        pl.Trainer.__init__ = with_clock

    def result(self) -> dict:
        return {"step_ends": self.ends, "step_parts": self.steps}


def run_train(args) -> dict:
    """This project's train.py with ``args.overrides``, the step clock installed from outside."""
    import runpy
    import sys

    from diffusers import UNet2DConditionModel

    parts = StepParts()
    UNet2DConditionModel.forward = parts.timed("UNet forward", UNet2DConditionModel.forward)
    parts.install()
    sys.argv = ["train.py", *args.overrides]
    try:
        runpy.run_path("train.py", run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    return parts.result()


def run_scene_batches(args) -> dict:
    """Median seconds per scene of a UNet call with classifier-free guidance (2 rows per scene) at
    each scene batch, after one warm-up call; the UNet as generate.py loads it."""
    import statistics

    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    from kolors_story.models.loading import load_unet, resolve_layout

    unet = load_unet(resolve_layout(args.model), torch.float32).eval()
    unet.set_attn_processor(AttnProcessor2_0())
    latent = args.size // 8
    width = unet.config.encoder_hid_dim or unet.config.cross_attention_dim
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    generator = torch.Generator().manual_seed(0)

    def call(scenes: int) -> float:
        rows = 2 * scenes
        cond = {"text_embeds": torch.randn(rows, pooled, generator=generator) * 0.1,
                "time_ids": torch.tensor([[args.size, args.size, 0, 0, args.size, args.size]] * rows, dtype=torch.float32)}
        x = torch.randn(rows, 4, latent, latent, generator=generator)
        text = torch.randn(rows, 256, width, generator=generator) * 0.1
        t0 = time.perf_counter()
        with torch.no_grad():
            unet(x, torch.tensor([500]), encoder_hidden_states=text, added_cond_kwargs=cond)
        return (time.perf_counter() - t0) / scenes

    call(1)
    return {str(b): statistics.median([call(b) for _ in range(args.repeats)]) for b in args.batches}


def run_loop(args) -> dict:
    import torch
    from diffusers import KolorsPipeline

    scenes = json.loads(Path(args.scenes).read_text(encoding="utf-8"))
    pipe = KolorsPipeline.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype), variant="fp16")
    pipe.set_progress_bar_config(disable=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes, 1):
        image = pipe(prompt=scene["prompt"], negative_prompt=scene["negative"], num_inference_steps=args.steps,
                     guidance_scale=args.cfg, height=args.size, width=args.size,
                     generator=torch.Generator("cpu").manual_seed(scene["seed"])).images[0]
        image.save(out / f"{i:02d}.png")
    return {"images": len(scenes)}


def run_diffsynth(args) -> dict:
    import lightning as pl
    import torch
    from diffsynth import ModelManager, SDXLImagePipeline
    from diffsynth.data.simple_text_image import TextImageDataset
    from diffsynth.trainers.text_to_image import LightningModelForT2ILoRA

    dtype = torch.float32 if args.precision == "32" else torch.float16

    class KolorsLoRA(LightningModelForT2ILoRA):  # train_kolors_lora.py's LightningModel, line for line
        def __init__(self):
            super().__init__(learning_rate=1e-4, use_gradient_checkpointing=args.gradient_checkpointing)
            manager = ModelManager(torch_dtype=dtype, device=self.device)
            manager.load_models([args.unet, args.text_encoder, args.vae])
            self.pipe = SDXLImagePipeline.from_model_manager(manager)
            self.pipe.scheduler.set_timesteps(1100)
            self.pipe.vae_encoder.to(dtype)
            self.freeze_parameters()
            self.add_lora_to_model(self.pipe.denoising_model(), lora_rank=args.rank, lora_alpha=args.alpha,
                                   lora_target_modules="to_q,to_k,to_v,to_out", init_lora_weights="gaussian")

    from diffsynth.models.sdxl_unet import SDXLUNet

    parts = StepParts()
    SDXLUNet.forward = parts.timed("UNet forward", SDXLUNet.forward)
    model = KolorsLoRA()
    model.pipe.encode_prompt = parts.timed("prompt encode", model.pipe.encode_prompt)
    model.pipe.vae_encoder.forward = parts.timed("VAE encode", model.pipe.vae_encoder.forward)
    dataset = TextImageDataset(args.dataset, steps_per_epoch=args.max_steps, height=args.size, width=args.size,
                               center_crop=True, random_flip=False)
    loader = torch.utils.data.DataLoader(dataset, shuffle=True, batch_size=1, num_workers=0)
    trainer = pl.Trainer(max_epochs=1, max_steps=args.max_steps, accelerator="cpu", devices=1,
                         precision=args.precision, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[parts.callback()])
    trainer.fit(model=model, train_dataloaders=loader)
    return parts.result()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kolors_story.bench.peers_run")
    sub = parser.add_subparsers(dest="peer", required=True)
    loop = sub.add_parser("loop", help="diffusers' KolorsPipeline, one call per scene")
    loop.add_argument("--model", required=True, help="a Kolors-diffusers folder")
    loop.add_argument("--scenes", required=True, help="JSON list of {prompt, negative, seed}")
    loop.add_argument("--out-dir", required=True)
    loop.add_argument("--steps", type=int, default=4)
    loop.add_argument("--cfg", type=float, default=4.0)
    loop.add_argument("--size", type=int, default=256)
    loop.add_argument("--dtype", default="float32")
    ds = sub.add_parser("diffsynth", help="DiffSynth-Studio 1.1.9's Kolors LoRA trainer")
    ds.add_argument("--unet", required=True)
    ds.add_argument("--text-encoder", required=True)
    ds.add_argument("--vae", required=True)
    ds.add_argument("--dataset", required=True, help="a folder with train/metadata.csv (file_name,text)")
    ds.add_argument("--max-steps", type=int, required=True)
    ds.add_argument("--rank", type=int, default=16)
    ds.add_argument("--alpha", type=float, default=4.0)
    ds.add_argument("--size", type=int, default=256)
    ds.add_argument("--precision", default="32")
    ds.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    train = sub.add_parser("train", help="this project's train.py, with the step clock")
    batches = sub.add_parser("scene-batches", help="seconds per scene of a UNet call at each scene batch")
    batches.add_argument("--model", required=True, help="a Kolors folder")
    batches.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    batches.add_argument("--size", type=int, default=256)
    batches.add_argument("--repeats", type=int, default=2)
    for p in (loop, ds, train, batches):
        p.add_argument("--out", required=True, help="JSON file for what was measured")
    train.add_argument("overrides", nargs="*", help="train.py's Hydra overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    runs = {"loop": run_loop, "diffsynth": run_diffsynth, "train": run_train, "scene-batches": run_scene_batches}
    result = runs[args.peer](args)
    Path(args.out).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
