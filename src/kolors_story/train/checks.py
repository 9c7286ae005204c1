"""Is this training run possible? Every setting and input checked before any data or model work
(with real Kolors, before the 12.5 GB text encoder is ever loaded): a value no stage can use is a
``SettingsError`` naming the key, the value and what to use; nothing is written to the run."""

from __future__ import annotations

import math

from kolors_story import tiny
from kolors_story.config import OptimSettings, TrainerSettings, TrainSettings
from kolors_story.data.buckets import make_buckets
from kolors_story.data.cache_shards import shard_devices
from kolors_story.data.crop import CROP_POLICIES, target_size
from kolors_story.data.preflight import POLICIES
from kolors_story.data.prepare import check_data_settings
from kolors_story.errors import SettingsError, TrainingError
from kolors_story.evaluate.alignment import check_clip_folder
from kolors_story.evaluate.scorer import check_scorer_folder
from kolors_story.generate.coherence import check_coherence
from kolors_story.generate.sampler import (
    check_sampler,
    check_size_for,
    warn_if_guidance_off,
)
from kolors_story.lora.adapter import check_lora, check_targets
from kolors_story.lora.files import check_save_settings
from kolors_story.lora.variants import check_type, conv_patterns
from kolors_story.models.architectures import KOLORS_SCHEDULER_CONFIG
from kolors_story.models.loading import ensure_model, model_configs, resolve_layout
from kolors_story.models.prompts import check_prompt_tokens
from kolors_story.models.quantization import check_text_encoder_quant
from kolors_story.story import story_scenes
from kolors_story.train.character_parts import check_character
from kolors_story.train.devices import cache_processes
from kolors_story.train.module import check_loss, timestep_range
from kolors_story.train.optimizers import check_optimizer
from kolors_story.train.reward import check_reward

STAGES = ("all", "data", "train")


def _positive(key: str, value, allow_none: bool = False, allow: tuple = ()) -> None:
    if value is None and allow_none or value in allow:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        extra = " or null" if allow_none else (f" or {allow[0]}" if allow else "")
        raise SettingsError(f"{key}={value!r}: must be a whole number >= 1{extra}")


def check_trainer(t: TrainerSettings) -> None:
    _positive("trainer.batch_size", t.batch_size)
    _positive("trainer.accumulate_grad_batches", t.accumulate_grad_batches)
    _positive("trainer.max_steps", t.max_steps, allow=(-1,))
    _positive("trainer.max_epochs", t.max_epochs, allow_none=True)
    _positive("trainer.steps_per_epoch", t.steps_per_epoch, allow_none=True)
    _positive("trainer.checkpoint_every_n_steps", t.checkpoint_every_n_steps)
    _positive("trainer.log_every_n_steps", t.log_every_n_steps)
    _positive("trainer.num_nodes", t.num_nodes)
    if t.num_workers < 0:
        raise SettingsError(f"trainer.num_workers={t.num_workers}: must be >= 0")
    if t.min_snr_gamma is not None and not (math.isfinite(t.min_snr_gamma) and t.min_snr_gamma > 0):
        raise SettingsError(f"trainer.min_snr_gamma={t.min_snr_gamma}: must be > 0 (5.0 is the paper's) or null")
    if not (math.isfinite(t.noise_offset) and t.noise_offset >= 0):
        raise SettingsError(f"trainer.noise_offset={t.noise_offset}: must be >= 0 (e.g. 0.05), 0 turns it off")
    if t.gradient_clip_val is not None and not (math.isfinite(t.gradient_clip_val) and t.gradient_clip_val > 0):
        raise SettingsError(f"trainer.gradient_clip_val={t.gradient_clip_val}: must be > 0 or null")


def check_optim(o: OptimSettings, device: str = "cpu") -> None:
    check_optimizer(o, device)
    if not (math.isfinite(o.lr) and o.lr > 0):
        raise SettingsError(f"optim.lr={o.lr}: must be a finite number > 0 (the baseline's is 1e-4)")
    if not (math.isfinite(o.weight_decay) and o.weight_decay >= 0):
        raise SettingsError(f"optim.weight_decay={o.weight_decay}: must be >= 0")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise SettingsError(f"optim.betas={list(o.betas)}: two numbers in [0, 1), e.g. [0.9, 0.999]")
    if not (math.isfinite(o.eps) and o.eps > 0):
        raise SettingsError(f"optim.eps={o.eps}: must be > 0")
    if o.warmup_steps < 0:
        raise SettingsError(f"optim.warmup_steps={o.warmup_steps}: must be >= 0")


def check_train(job: TrainSettings) -> None:
    """All of a training job's settings and inputs that can be checked without loading weights
    or touching the data: raises SettingsError (or ModelLoadError for a missing model) on the first."""
    if job.stage not in STAGES:
        raise TrainingError(f"stage={job.stage!r}: use one of {', '.join(STAGES)}")
    check_trainer(job.trainer)
    check_optim(job.optim, str(job.model.device))
    check_loss(job.trainer.loss)
    timestep_range(job.trainer.loss, int(KOLORS_SCHEDULER_CONFIG["num_train_timesteps"]))  # 1100, tiny too
    if not 0 <= float(job.trainer.validation_split):
        raise SettingsError(f"trainer.validation_split={job.trainer.validation_split}: a share < 1, a count >= 1, or 0")
    if any(not 0 <= int(v) < int(KOLORS_SCHEDULER_CONFIG["num_train_timesteps"]) for v in job.trainer.validation_timesteps) \
            or not job.trainer.validation_timesteps:
        raise SettingsError(f"trainer.validation_timesteps={list(job.trainer.validation_timesteps)}: "
                            "timesteps in [0, 1100) (Kolors' schedule), at least one")
    targets = check_lora(job.lora.rank, job.lora.alpha, job.lora.target_modules, job.lora.init, job.lora.dropout)
    check_type(job.lora.type)
    check_reward(job.reward)
    conv_patterns(job.lora.conv_rank, job.lora.conv_alpha, job.lora.alpha)
    if job.lora.type in ("loha", "lokr") and float(job.lora.dropout):
        raise SettingsError(f"lora.dropout={job.lora.dropout} applies to lora/dora only; set it to 0 for "
                            f"lora.type={job.lora.type}")
    if job.dataset.crop not in CROP_POLICIES:
        raise SettingsError(f"dataset.crop={job.dataset.crop!r}: use one of {list(CROP_POLICIES)}")
    if job.dataset.on_bad_file not in POLICIES:
        raise SettingsError(f"dataset.on_bad_file={job.dataset.on_bad_file!r}: use skip or fail")
    _positive("cache.batch_size", job.cache.batch_size)
    check_text_encoder_quant(job.model.text_encoder_quant, job.model.device)  # the cache build's ChatGLM3
    check_save_settings(job.trainer.save_dtype, job.trainer.save_formats)
    if job.trainer.keep_last_n is not None:
        _positive("trainer.keep_last_n", job.trainer.keep_last_n)
    shard_devices(job.model.device, cache_processes(job.cache.devices, job.model.device, job.trainer))
    check_data_settings(job.dataset, job.filter)
    configs = model_configs(job.model)  # the model folder is complete (a stand-in is built)
    check_targets(targets, configs["unet"])
    factor = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    if any(v % factor for v in target_size(job.dataset.resolution)):
        raise SettingsError(f"dataset.resolution={job.dataset.resolution}: must be a multiple of the VAE factor {factor}")
    make_buckets(job.dataset.buckets, target_size(job.dataset.resolution))
    if job.validate:
        check_sampler(job.sampler)
        check_size_for(configs["unet"], configs["vae"], job.sampler)
        warn_if_guidance_off(job.sampler)
        if not tiny.provides(job.scorer):  # a stand-in scorer is built, not downloaded
            check_scorer_folder(job.scorer.path)
            if job.scorer.alignment:
                check_clip_folder(job.scorer.clip_path)
        check_coherence(job.coherence, story_scenes(job.story, job.sampler))
    check_prompt_tokens(resolve_layout(ensure_model(job.model), job.model.vae_path), story_scenes(job.story, job.sampler))
    check_character(job)  # character=auto: its keys, the phrasings' tokens, the sampler and scorer it renders with
