"""Reward refinement (``reward=aesthetic``): the LoRA is trained to raise the competition's own
aesthetic score of its renders, held back by the ordinary diffusion loss on the style data.

Each reward step renders ``reward.batch_size`` story scenes with the model's Euler scheduler from
noise drawn from the step's own seed (so resume replays it) and scores the decoded image with the
differentiable copy of the scorer (:mod:`kolors_story.evaluate.differentiable`):

- ``refl`` (ReFL, Xu et al. 2023): denoise without gradient to a random late step k in
  ``reward.refl_steps``, then one UNet call with gradient predicts x0 there (x0 = x - sigma * eps).
- ``draft`` (DRaFT-K, Clark et al. 2024): denoise without gradient, then the last ``draft_k`` steps
  with gradient (gradient checkpointing in the UNet and the VAE decoder keeps that affordable).

Loss = -w * min(score, target) + lambda * diffusion loss. ``reward.weight=0`` is the plain run,
draw for draw. The last ``reward.held_out`` scenes are never rewarded: at each checkpoint they are
rendered from fixed seeds and scored (``reward_held_out``), for early stopping (``reward.patience``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from kolors_story.config import RewardSettings, TrainSettings
from kolors_story.errors import SettingsError, TrainingError
from kolors_story.evaluate.differentiable import DifferentiableAestheticScore
from kolors_story.evaluate.scorer import AestheticScorer
from kolors_story.lora.variants import PARAM_NAMES

STEP_SALT = 0x2E3A  # the reward's generator per step: the batch's noise seed XOR this
HELD_OUT_SEED = 20240  # held-out renders: this + scene index


def check_reward(reward: RewardSettings, n_scenes: int | None = None) -> None:
    if reward.name == "none":
        return
    if reward.name != "aesthetic":
        raise SettingsError(f"reward.name={reward.name!r}: use none or aesthetic")
    if reward.method not in ("refl", "draft"):
        raise SettingsError(f"reward.method={reward.method!r}: use refl or draft")
    lo, hi = (int(v) for v in reward.refl_steps)
    if not 0 <= lo <= hi < int(reward.steps):
        raise SettingsError(f"reward.refl_steps={list(reward.refl_steps)}: need 0 <= first <= last < reward.steps "
                            f"({reward.steps})")
    if not 1 <= int(reward.draft_k) <= int(reward.steps):
        raise SettingsError(f"reward.draft_k={reward.draft_k}: between 1 and reward.steps ({reward.steps})")
    if int(reward.resolution) % 64:
        raise SettingsError(f"reward.resolution={reward.resolution}: a multiple of 64")
    if n_scenes is not None and not 0 <= int(reward.held_out) < n_scenes:
        raise SettingsError(f"reward.held_out={reward.held_out}: fewer than the story's {n_scenes} scenes "
                            "(the rest are the prompts rewarded)")


class RewardObjective:
    """Renders story scenes with the UNet (gradient where the method says) and scores them."""

    def __init__(self, settings: RewardSettings, vae, score, scheduler_config: dict, embeds: dict):
        from diffusers import EulerDiscreteScheduler

        self.settings = settings
        self.vae = vae.requires_grad_(False)
        self.score = score
        self.scheduler_config = dict(scheduler_config)
        self.scheduler_class = EulerDiscreteScheduler
        self.embeds = {k: v.float() for k, v in embeds.items()}
        n = self.embeds["prompt_embeds"].shape[0]
        held = int(settings.held_out)
        self.train_scenes = list(range(n - held))
        self.held_out_scenes = list(range(n - held, n))

    # ------------------------------------------------------------------------------ rendering
    def _conditioning(self, scenes: list[int], device, dtype):
        e = {k: v[scenes].to(device, dtype) for k, v in self.embeds.items()}
        size = float(self.settings.resolution)
        time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]], device=device, dtype=dtype).repeat(len(scenes), 1)
        if self.settings.guidance > 1:
            return (torch.cat([e["negative_prompt_embeds"], e["prompt_embeds"]]),
                    torch.cat([e["negative_pooled_prompt_embeds"], e["pooled_prompt_embeds"]]),
                    torch.cat([time_ids, time_ids]))
        return e["prompt_embeds"], e["pooled_prompt_embeds"], time_ids

    def _eps(self, unet, latents, t, cond, scheduler):
        guided = self.settings.guidance > 1
        x = torch.cat([latents, latents]) if guided else latents
        x = scheduler.scale_model_input(x, t)
        text, pooled, time_ids = cond
        eps = unet(x.to(unet.dtype), t, encoder_hidden_states=text, added_cond_kwargs={"text_embeds": pooled,
                   "time_ids": time_ids}, return_dict=False)[0].float()
        if guided:
            uncond, c = eps.chunk(2)
            eps = uncond + float(self.settings.guidance) * (c - uncond)
        return eps

    def render_x0(self, unet, scenes: list[int], generator: torch.Generator, grad_at: set[int]) -> torch.Tensor:
        """Denoise from the generator's noise; the steps in ``grad_at`` carry gradient. Returns x0 (the
        last step's prediction; with refl, the prediction at the gradient step)."""
        device = next(unet.parameters()).device
        scheduler = self.scheduler_class.from_config(self.scheduler_config)
        scheduler.set_timesteps(int(self.settings.steps), device=device)
        side = int(self.settings.resolution) // 8
        latents = torch.randn((len(scenes), 4, side, side), generator=generator).to(device)
        latents = latents * scheduler.init_noise_sigma
        cond = self._conditioning(scenes, device, unet.dtype)
        stop = max(grad_at) if self.settings.method == "refl" and grad_at else None
        x0 = latents
        for i, t in enumerate(scheduler.timesteps):
            with torch.set_grad_enabled(i in grad_at):
                eps = self._eps(unet, latents, t, cond, scheduler)
                sigma = scheduler.sigmas[scheduler.step_index if scheduler.step_index is not None else i]
                x0 = latents - sigma.to(latents.dtype) * eps
                if i == stop:
                    return x0
                latents = scheduler.step(eps, t, latents, return_dict=False)[0]
        return x0

    def decode_and_score(self, x0: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        images = vae.decode((x0 / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0].float()
        return self.score((images / 2 + 0.5).clamp(0, 1))

    # ------------------------------------------------------------------------------ objective
    def loss(self, unet, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(-w * min(score, target), the scores) of one reward step, drawn from ``seed``."""
        s = self.settings
        g = torch.Generator().manual_seed(int(seed) ^ STEP_SALT)
        pick = torch.randint(len(self.train_scenes), (int(s.batch_size),), generator=g).tolist()
        scenes = [self.train_scenes[i] for i in pick]
        if s.method == "refl":
            lo, hi = (int(v) for v in s.refl_steps)
            grad_at = {int(torch.randint(lo, hi + 1, (1,), generator=g))}
        else:
            grad_at = set(range(int(s.steps) - int(s.draft_k), int(s.steps)))
        scores = self.decode_and_score(self.render_x0(unet, scenes, g, grad_at))
        capped = scores if s.target is None else torch.clamp(scores, max=float(s.target))
        return -float(s.weight) * capped.mean(), scores.detach()

    @torch.no_grad()
    def held_out_score(self, unet) -> float | None:
        """Mean score of the held-out scenes rendered from fixed seeds (None when none are held out)."""
        if not self.held_out_scenes:
            return None
        scores = []
        for scene in self.held_out_scenes:
            g = torch.Generator().manual_seed(HELD_OUT_SEED + scene)
            scores.append(self.decode_and_score(self.render_x0(unet, [scene], g, set())))
        return float(torch.cat(scores).mean())


def init_adapter_from(unet, source: str | Path, adapter_name: str = "default") -> Path:
    """Load an existing LoRA's weights into the trainable adapter (``reward.init_from``): a LoRA file,
    a checkpoint folder or a run folder (its last checkpoint). Rank and targets must match ``lora.*``."""
    from peft.utils import set_peft_model_state_dict

    from kolors_story.errors import MissingFileError
    from kolors_story.lora import checkpoint_lora_file, read_lora
    from kolors_story.records import last_checkpoint

    path = Path(str(source)).expanduser()
    if path.is_dir():
        folder = last_checkpoint(path) if (path / "checkpoints").is_dir() else path
        path = checkpoint_lora_file(folder) if folder is not None else path
    if not path.is_file():
        raise MissingFileError(f"reward.init_from={source}: no LoRA file there (give a LoRA file, a checkpoint "
                               "folder or a train.py run folder)")
    lf = read_lora(path, unet_config=unet.config)
    mismatch = SettingsError(f"reward.init_from={path}: its {lf.type} (rank {lf.rank}, targets {lf.target_modules}) "
                             "does not match lora.*; train the refinement with the same lora settings")
    try:
        result = set_peft_model_state_dict(unet, lf.state_dict, adapter_name=adapter_name)
    except RuntimeError as exc:  # shapes: another rank or type
        raise mismatch from exc
    missing = [k for k in getattr(result, "missing_keys", []) if adapter_name in k.split(".")
               and any(part in PARAM_NAMES for part in k.split("."))]
    if missing or getattr(result, "unexpected_keys", None):
        raise mismatch
    return path


def reward_objective(job: TrainSettings, pipe, story_embeds: dict | None, validator) -> RewardObjective | None:
    """The reward phase's objective (reward=aesthetic), with the LoRA started from reward.init_from."""
    if job.reward.name == "none":
        return None
    if story_embeds is None:
        raise TrainingError("reward=aesthetic renders the story's scenes: their embeddings are missing from the cache")
    check_reward(job.reward, int(story_embeds["prompt_embeds"].shape[0]))
    scorer = validator.scorer if validator is not None else AestheticScorer.from_settings(job.scorer)
    if job.trainer.gradient_checkpointing:
        pipe.vae.enable_gradient_checkpointing()  # the decoder's backward (draft, refl)
    if job.reward.init_from:
        print(f"reward: refining the LoRA of {init_adapter_from(pipe.unet, job.reward.init_from)}")
    return RewardObjective(job.reward, pipe.vae, DifferentiableAestheticScore.from_scorer(scorer),
                           dict(pipe.scheduler.config), story_embeds)
