"""The GPU check's training measurements: a LoRA step with gradient checkpointing on and off, a DoRA
step and a reward step, each as the trainer takes it (``KolorsLoraModule.compute_loss``, the reward
objective of ``train.reward``, the run's precision), with the UNet, its adapter and optimizer state
and what validation keeps beside them on the device, as the plan's train and reward stages count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from types import SimpleNamespace

import torch

from kolors_story.bench.gpu_build import Check, Reading, Scale, free_device_cache
from kolors_story.bench.gpu_stages import scorer_of, story_of
from kolors_story.models.architectures import KOLORS_SCHEDULER_CONFIG
from kolors_story.models.checkpointing import set_gradient_checkpointing


def _autocast(precision: str, device: torch.device):
    """What Lightning's precision plugin wraps the training step in."""
    if precision.startswith("16"):
        return torch.autocast(device.type, dtype=torch.float16)
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


class Stepper:
    """A training step as the trainer takes it: the adapter added as ``train.job`` adds it (trained in
    float32), ``KolorsLoraModule.compute_loss`` (+ the reward loss, composed as ``training_step``
    does) under the run's precision with its gradient scaler for 16-mixed, then the optimizer."""

    def __init__(self, c: Check, job):
        from kolors_story.lora import add_lora_from_settings
        from kolors_story.train.module import KolorsLoraModule

        unet = c.wb.get("unet").requires_grad_(False)
        add_lora_from_settings(unet, job.lora)
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        unet.train()
        t = job.trainer
        self.lora_type, self.precision, self.device = job.lora.type, str(t.precision), c.device
        self.module = KolorsLoraModule(unet, dict(KOLORS_SCHEDULER_CONFIG), job.optim, min_snr_gamma=t.min_snr_gamma,
                                       noise_offset=t.noise_offset, loss=t.loss)
        self.opt = self.module.configure_optimizers()["optimizer"]
        c.wb.state[:] = [self.opt]  # AdamW's moments stay resident between steps
        cuda16 = self.precision.startswith("16") and c.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if cuda16 else None
        self.batch = _batch(c.scale, int(t.batch_size), c.device)
        self.seed = 0

    def step(self) -> None:
        self.seed += 1
        torch.manual_seed(self.seed ^ 0x5EED)  # LoRA dropout, as training_step seeds it
        with _autocast(self.precision, self.device):
            loss = self.module.compute_loss(self.batch, seeds=torch.tensor([self.seed] * len(self.batch["latents"])))
            reward = self.module.reward
            if reward is not None:
                reward_loss, _ = reward.loss(self.module.unet, self.seed)
                loss = float(reward.settings.diffusion_weight) * loss + reward_loss
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _batch(scale: Scale, batch: int, device: torch.device) -> dict:
    """A cached item's tensors (float32, as the cache stores them) for ``batch`` images."""
    res, hidden = scale.resolution, int(scale.text_encoder["hidden_size"])
    g = torch.Generator().manual_seed(0)
    return {"latents": torch.randn(batch, 4, res // 8, res // 8, generator=g).to(device),
            "prompt_embeds": torch.randn(batch, 256, hidden, generator=g).to(device),
            "pooled_prompt_embeds": torch.randn(batch, hidden, generator=g).to(device),
            "add_time_ids": torch.tensor([[res, res, 0, 0, res, res]] * batch, dtype=torch.float32).to(device)}


def _stepper(c: Check, job) -> Stepper:
    """The current training step, or a new one when the adapter type changes (the old adapter removed)."""
    if c.stepper is not None and c.stepper.lora_type == job.lora.type:
        return c.stepper
    if c.stepper is not None:
        c.stepper.module.unet.delete_adapters("default")
        c.stepper, c.wb.state[:] = None, []
        free_device_cache(c.device)
    c.stepper = Stepper(c, job)
    return c.stepper


def _train_residents(job) -> tuple[str, ...]:
    """The plan's train step: the UNet, and with validation the VAE and the scorer (+ CLIP for CLIP-T) beside it."""
    beside = ("vae", "predictor") + (("clip",) if job.scorer.alignment else ()) if job.validate else ()
    return ("unet", *beside)


def _measure_steps(c: Check, step: Callable[[], None], warmup: int, measured: int) -> dict[str, Reading]:
    for _ in range(warmup):
        step()
    times = []
    with c.meter.phases("step") as meter:
        for _ in range(measured):
            t0 = time.perf_counter()
            step()
            meter.sync()
            times.append(time.perf_counter() - t0)
    readings = dict(c.meter.readings)
    readings["step"].step_seconds = times
    return readings


def measure_train(c: Check, job) -> dict[str, Reading]:
    """LoRA steps with gradient checkpointing as ``job`` sets it: warm-ups, then the measured steps."""
    c.wb.place(*_train_residents(job))
    s = _stepper(c, job)
    set_gradient_checkpointing(s.module.unet, job.trainer.gradient_checkpointing)
    return _measure_steps(c, s.step, c.scale.warmup, c.scale.measured)


def measure_dora(c: Check, job) -> dict[str, Reading]:
    """One DoRA step (a new adapter in place of the LoRA, its optimizer state made in the step)."""
    c.wb.place(*_train_residents(job))
    s = _stepper(c, job)
    set_gradient_checkpointing(s.module.unet, True)
    return _measure_steps(c, s.step, 0, 1)


def _story_embeds(scale: Scale, n: int) -> dict[str, torch.Tensor]:
    """The story's embeddings as the cache stores them (float32): shapes are what the step needs."""
    hidden = int(scale.text_encoder["hidden_size"])
    g = torch.Generator().manual_seed(1)
    return {"prompt_embeds": torch.randn(n, 256, hidden, generator=g),
            "negative_prompt_embeds": torch.randn(n, 256, hidden, generator=g),
            "pooled_prompt_embeds": torch.randn(n, hidden, generator=g),
            "negative_pooled_prompt_embeds": torch.randn(n, hidden, generator=g)}


def measure_reward(c: Check, job) -> dict[str, Reading]:
    """One reward step (``reward=aesthetic``) as ``training_step`` takes it: the diffusion loss plus
    ``RewardObjective.loss`` (built by ``train.reward.reward_objective``), one backward."""
    from kolors_story.train.reward import reward_objective

    c.wb.place(*sorted({*_train_residents(job), "vae", "predictor"}))
    s = _stepper(c, job)
    unet, vae = s.module.unet, c.wb.get("vae")
    set_gradient_checkpointing(unet, True)
    pipe = SimpleNamespace(unet=unet, vae=vae, scheduler=SimpleNamespace(config=dict(KOLORS_SCHEDULER_CONFIG)))
    validator = SimpleNamespace(scorer=scorer_of(c, int(job.scorer.batch_size)))
    s.module.reward = reward_objective(job, pipe, _story_embeds(c.scale, len(story_of(job))), validator)
    try:
        return _measure_steps(c, s.step, 0, 1)
    finally:
        s.module.reward = None
        vae.disable_gradient_checkpointing()
