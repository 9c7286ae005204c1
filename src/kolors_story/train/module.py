"""The LightningModule: a LoRA on the Kolors UNet trained with the noise-prediction loss.

Batches carry what the cache stores per image (``latents``, ``prompt_embeds``,
``pooled_prompt_embeds``, ``add_time_ids``) plus a ``noise_seed`` per sample drawn by the
sampler (``kolors_story.train.loader.StreamBatchSampler``). Noise and timesteps come from that seed,
not from the global RNG, so a run resumed from a checkpoint draws exactly the noise the
uninterrupted run would have drawn.
"""

from __future__ import annotations

import math
import random
from typing import Callable

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from kolors_story.config import LossSettings, OptimSettings
from kolors_story.errors import SettingsError
from kolors_story.train.optimizers import build_optimizer, build_schedule

NAN_HINT = (
    "Likely cause: fp16 overflow. The stock SDXL VAE overflows in float16 (NaN latents, black "
    "images): set model.vae_path to the fp16-fix VAE (models/sdxl-vae-fp16-fix, "
    "`python -m kolors_story.download`) and rebuild the cache with `python train.py stage=data`, "
    "or train in bfloat16 (trainer.precision=bf16-mixed, model.dtype=bfloat16). If the run is "
    "already fp32/bf16, lower optim.lr (now {lr:g})."
)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN/Inf; training stops and the last good checkpoint is kept."""


LOSS_TYPES = ("mse", "huber", "smooth_l1")
TIMESTEP_DISTRIBUTIONS = ("uniform", "logit_normal", "low", "high")


def check_loss(loss: LossSettings) -> None:
    if loss.type not in LOSS_TYPES:
        raise SettingsError(f"trainer.loss.type={loss.type!r}: use one of {', '.join(LOSS_TYPES)}")
    if loss.timestep_distribution not in TIMESTEP_DISTRIBUTIONS:
        raise SettingsError(f"trainer.loss.timestep_distribution={loss.timestep_distribution!r}: use one of "
                            f"{', '.join(TIMESTEP_DISTRIBUTIONS)}")
    for key in ("huber_delta", "logit_std", "bias_power"):
        if not float(getattr(loss, key)) > 0:
            raise SettingsError(f"trainer.loss.{key}={getattr(loss, key)}: must be > 0")
    if not float(loss.input_perturbation) >= 0:
        raise SettingsError(f"trainer.loss.input_perturbation={loss.input_perturbation}: must be >= 0 (0 = off, ~0.1 in the paper)")


def timestep_range(loss: LossSettings, num_train_timesteps: int) -> tuple[int, int]:
    """``[low, high)`` of the training timesteps, checked against the schedule's length."""
    low = int(loss.timestep_min)
    high = num_train_timesteps if loss.timestep_max is None else int(loss.timestep_max)
    if not 0 <= low < high <= num_train_timesteps:
        raise SettingsError(f"trainer.loss.timestep_min={loss.timestep_min}, timestep_max={loss.timestep_max}: need "
                            f"0 <= min < max <= {num_train_timesteps} (the schedule's length)")
    return low, high


def draw_timestep(loss: LossSettings, span: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """One training timestep from the sample's own generator (uniform: exactly the historical draw)."""
    low, high = span
    kind = loss.timestep_distribution
    if kind == "uniform":
        return torch.randint(low, high, (1,), generator=g)
    if kind == "logit_normal":
        u = torch.sigmoid(torch.randn(1, generator=g, dtype=torch.float64) * float(loss.logit_std) + float(loss.logit_mean))
    else:
        u = torch.rand(1, generator=g, dtype=torch.float64) ** float(loss.bias_power)
        u = u if kind == "low" else 1.0 - u
    return (low + torch.floor(u * (high - low))).clamp(low, high - 1).long()


def elementwise_loss(loss: LossSettings, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if loss.type == "huber":
        return F.huber_loss(pred, target, reduction="none", delta=float(loss.huber_delta))
    if loss.type == "smooth_l1":
        return F.smooth_l1_loss(pred, target, reduction="none", beta=float(loss.huber_delta))
    return F.mse_loss(pred, target, reduction="none")


def sample_generators(seeds: torch.Tensor) -> list[torch.Generator]:
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds.tolist()]


class KolorsLoraModule(L.LightningModule):
    """Trains only the parameters of ``unet`` that require grad (the LoRA); everything else is frozen.

    ``scheduler_config`` is the model's own scheduler config (Kolors: 1100 steps, scaled_linear
    0.00085..0.014, epsilon); a ``DDPMScheduler`` built from it adds the noise, because
    ``EulerDiscreteScheduler.add_noise`` only accepts timesteps from its inference schedule.
    """

    def __init__(self, unet: torch.nn.Module, scheduler_config: dict, optim: OptimSettings, *,
                 min_snr_gamma: float | None = None, noise_offset: float = 0.0, nan_hint: str | None = None,
                 loss: LossSettings | None = None):
        super().__init__()
        from diffusers import DDPMScheduler

        self.unet = unet
        self.noise_scheduler = DDPMScheduler.from_config(dict(scheduler_config))
        self.num_train_timesteps = int(self.noise_scheduler.config.num_train_timesteps)
        self.prediction_type = str(self.noise_scheduler.config.prediction_type)
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"scheduler prediction_type={self.prediction_type!r} is not supported (epsilon, v_prediction)")
        self.register_buffer("alphas_cumprod", self.noise_scheduler.alphas_cumprod.clone().float(), persistent=False)
        self.optim = optim
        self.min_snr_gamma = float(min_snr_gamma) if min_snr_gamma not in (None, 0, 0.0) else None
        self.noise_offset = float(noise_offset or 0.0)
        self.loss_settings = loss if loss is not None else LossSettings()
        self.timestep_range = timestep_range(self.loss_settings, self.num_train_timesteps)
        self.nan_hint = nan_hint if nan_hint is not None else NAN_HINT.format(lr=float(optim.lr))
        # The checkpoint holds only the LoRA weights, not the frozen multi-GB base.
        self.strict_loading = False
        self.step_losses: list[torch.Tensor] = []  # micro-batch losses since the last optimizer step
        self.current_lr: float | None = None
        self.total_steps: int | None = None  # optimizer steps of the whole run (cosine schedule length)
        self.describe_sample: Callable[[int], str] | None = None  # names a dataset item in errors
        self.reward = None  # train.reward.RewardObjective with reward=aesthetic (not a submodule: never saved)
        self.step_rewards: list[torch.Tensor] = []  # reward-step scores since the last optimizer step

    # ------------------------------------------------------------------------------ parameters
    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------ loss
    def noise_and_timesteps(self, latents: torch.Tensor, seeds: torch.Tensor):
        """Per-sample noise (+ optional offset noise) and timesteps, each from the sample's own seed."""
        noise, timesteps, _ = self._draw(latents, seeds)
        return noise, timesteps

    def _draw(self, latents: torch.Tensor, seeds: torch.Tensor):
        """Noise, timesteps and the input perturbation (None when off), in a fixed order per generator."""
        b, c = latents.shape[:2]
        noise, offsets, steps, extra = [], [], [], []
        perturb = float(self.loss_settings.input_perturbation)
        for g in sample_generators(seeds):
            steps.append(draw_timestep(self.loss_settings, self.timestep_range, g))
            noise.append(torch.randn(latents.shape[1:], generator=g))
            offsets.append(torch.randn((c, 1, 1), generator=g))
            if perturb:
                extra.append(torch.randn(latents.shape[1:], generator=g))
        noise = torch.stack(noise)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.stack(offsets)
        timesteps = torch.cat(steps).to(latents.device)
        perturbation = (perturb * torch.stack(extra)).to(latents.device, latents.dtype) if perturb else None
        return noise.to(latents.device, latents.dtype), timesteps, perturbation

    def snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon targets."""
        ac = self.alphas_cumprod.to(timesteps.device)[timesteps]
        snr = ac / (1.0 - ac)
        clipped = torch.clamp(snr, max=self.min_snr_gamma)
        return clipped / (snr + 1.0) if self.prediction_type == "v_prediction" else clipped / snr

    def compute_loss(self, batch: dict, seeds: torch.Tensor | None = None) -> torch.Tensor:
        seeds = batch["noise_seed"] if seeds is None else seeds
        noise, timesteps, perturbation = self._draw(batch["latents"].float(), seeds)
        per_sample = self.per_sample_loss(batch, noise, timesteps,
                                          input_noise=None if perturbation is None else noise + perturbation)
        if self.min_snr_gamma is not None:
            per_sample = per_sample * self.snr_weights(timesteps)
        if self.loss_settings.debiased_estimation:
            per_sample = per_sample * self.debiased_weights(timesteps)
        return per_sample.mean()

    def debiased_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """1/sqrt(SNR) (SNR capped at 1000, as kohya does), so low-noise steps do not dominate."""
        ac = self.alphas_cumprod.to(timesteps.device)[timesteps]
        return 1.0 / torch.sqrt(torch.clamp(ac / (1.0 - ac), max=1000.0))

    def per_sample_loss(self, batch: dict, noise: torch.Tensor, timesteps: torch.Tensor,
                        input_noise: torch.Tensor | None = None) -> torch.Tensor:
        """The unweighted denoising loss of each sample for the given noise and timesteps
        (``input_noise``: what noises the input when it differs from the target noise)."""
        latents = batch["latents"].float()
        noisy = self.noise_scheduler.add_noise(latents, noise if input_noise is None else input_noise, timesteps)
        dtype = self.unet.dtype
        added = {"text_embeds": batch["pooled_prompt_embeds"].to(dtype), "time_ids": batch["add_time_ids"].to(dtype)}
        if "image_embeds" in batch:  # an IP-Adapter's input (pre-training the tiny one): [batch, 1, tokens, dims]
            added["image_embeds"] = [batch["image_embeds"].to(dtype)]
        # Called exactly as KolorsPipeline calls it during sampling.
        pred = self.unet(
            noisy.to(dtype),
            timesteps,
            encoder_hidden_states=batch["prompt_embeds"].to(dtype),
            added_cond_kwargs=added,
            return_dict=False,
        )[0].float()
        if self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return elementwise_loss(self.loss_settings, pred, target.float()).mean(dim=list(range(1, pred.ndim)))

    # ------------------------------------------------------------------------------- training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # LoRA dropout draws from the global RNG: seed it from the batch so resumes replay it.
        torch.manual_seed(int(batch["noise_seed"][0]) ^ 0x5EED)
        opt = self.optimizers(use_pl_optimizer=False)
        self.current_lr = float(opt.param_groups[0]["lr"])
        loss = self.compute_loss(batch)
        if self.reward is not None and float(self.reward.settings.weight):  # weight 0: the plain run, draw for draw
            reward_loss, scores = self.reward.loss(self.unet, int(batch["noise_seed"][0]))
            self.step_rewards.append(scores.mean())
            loss = float(self.reward.settings.diffusion_weight) * loss + reward_loss
        bad = not bool(torch.isfinite(loss))
        if self.trainer.world_size > 1:  # every rank stops together (or DDP would hang)
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            self.raise_non_finite(loss, batch)
        self.step_losses.append(loss.detach())
        return loss

    def raise_non_finite(self, loss: torch.Tensor, batch: dict) -> None:
        step = self.trainer.global_step + 1 if self._trainer is not None else None
        where = ""
        latents = batch.get("latents")
        if latents is not None and not bool(torch.isfinite(latents).all()):
            bad = [i for i in range(latents.shape[0]) if not bool(torch.isfinite(latents[i]).all())]
            names = []
            for i in bad:
                idx = int(batch["index"][i]) if "index" in batch else i
                names.append(self.describe_sample(idx) if self.describe_sample else f"item {idx}")
            where = f" The cached latents of {', '.join(names)} are NaN/Inf: the VAE overflowed when the cache was built."
        raise NonFiniteLossError(
            f"Training stopped at step {step}: the loss is {float(loss.detach().float())} (not finite).{where} "
            + self.nan_hint
        )

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters: add a LoRA to the UNet before training")
        opt = build_optimizer(params, self.optim)
        total = self.total_steps
        if total is None:
            # Note: with a finite max_epochs this sets up the dataloader before a checkpoint's
            # loader state is restored; run_training passes total_steps to avoid that.
            total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        total = int(total) if math.isfinite(total) else 1
        sched = build_schedule(opt, self.optim, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def on_fit_start(self) -> None:
        if self.reward is not None:  # the reward's VAE decoder and scorer run on every rank's device
            self.reward.vae.to(self.device)
            self.reward.score.to(self.device)

    # ---------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        names = set(self.trainable_names())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in names}
        # Plain tensors/ints only: Lightning reads checkpoints with torch.load(weights_only=True).
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        missing = sorted(set(self.trainable_names()) - set(checkpoint.get("state_dict", {})))
        if missing:
            raise ValueError(
                f"the checkpoint has no weights for {len(missing)} LoRA parameters (e.g. {missing[0]}): "
                "it was written with other lora.* settings (rank, target_modules); resume with the same ones"
            )
        rng = checkpoint.get("rng_states")
        if rng:
            torch.set_rng_state(rng["torch"])
            name, keys, pos, has_gauss, gauss = rng["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            random.setstate(rng["python"])
