"""The `train.py` job: data stage -> cache -> LoRA training with checkpoints, story panels and scores.

Stages (``stage``): ``all`` (default), ``data`` (prepare the dataset + build the cache, then stop)
and ``train`` (reuse the prepared dataset, build/verify the cache, train).

Training runs on the cached latents and prompt embeddings: the pipeline is loaded without its
text encoder. ``<run>/metrics.jsonl`` is the source of truth; W&B mirrors it (see ``checkpoints``
for what each checkpoint folder holds).
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import lightning as L
from omegaconf import OmegaConf

from kolors_story.configs import in_multirun, typed
from kolors_story.data.cache import build_cache
from kolors_story.data.cache_files import load_empty_prompt, load_story_embeddings
from kolors_story.data.captions import caption_variants
from kolors_story.errors import TrainingError
from kolors_story.evaluate.differentiable import DifferentiableAestheticScore
from kolors_story.evaluate.scorer import AestheticScorer
from kolors_story.files import atomic_write_text
from kolors_story.lora import add_lora_from_settings
from kolors_story.models.loading import ensure_model, load_pipeline, model_hash
from kolors_story.records import WANDB_ID_FILE, CheckpointRecord, last_checkpoint
from kolors_story.settings import TrainConfig
from kolors_story.story import Scene, story_scenes
from kolors_story.train.before_after import before_after
from kolors_story.train.checkpoints import CheckpointCallback, RunContext, VaeToDevice
from kolors_story.train.checks import STAGES
from kolors_story.train.devices import (
    cache_processes,
    resolve_precision,
    resolve_strategy,
    secondary_process,
    world_size,
)
from kolors_story.train.ema import EmaCallback
from kolors_story.train.held_out import split_items
from kolors_story.train.loader import make_loader
from kolors_story.train.logger import RunLogger
from kolors_story.train.module import KolorsLoraModule, NonFiniteLossError
from kolors_story.train.report import print_data_summary, print_summary
from kolors_story.train.resume import warn_if_dataset_changed
from kolors_story.train.reward import RewardObjective, check_reward, init_adapter_from
from kolors_story.train.validation import StoryValidator
from kolors_story.train.wandb_mirror import WandbMirror

HANDOFF_ENV = "KOLORS_STORY_TRAIN_HANDOFF"  # parent -> DDP child processes: what to train on


@dataclass
class TrainResult:
    run_dir: Path
    status: str  # finished | failed | interrupted
    step: int
    error: str | None = None
    checkpoints: list[CheckpointRecord] = field(default_factory=list)
    wandb_dir: Path | None = None
    wandb_error: str | None = None
    precision: str = "32"
    before_after: dict | None = None  # the style measure of the story at LoRA scale 0 vs 1 (train.before_after)

    @property
    def last_checkpoint(self) -> Path | None:
        return last_checkpoint(self.run_dir)

    @property
    def final_mean(self) -> float | None:
        scored = [c for c in self.checkpoints if c.get("mean") is not None]
        return scored[-1]["mean"] if scored else None


def settings_dict(job: TrainConfig) -> dict:
    """The settings as plain data: recorded in every LoRA file, the W&B config and the DDP handoff."""
    return OmegaConf.to_container(OmegaConf.structured(job))


# ------------------------------------------------------------------------------ the pieces


def _trainable_unet(job: TrainConfig):
    """The pipeline without its text encoder, on the CPU (Lightning moves the UNet to each rank's
    device; only rank 0 moves the VAE, for the story renders), with the LoRA on the UNet."""
    pipe = load_pipeline(ensure_model(job.model), vae_path=job.model.vae_path, dtype=job.model.dtype,
                         device="cpu", text_encoder=False)
    unet = pipe.unet
    unet.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    add_lora_from_settings(unet, job.lora)
    for p in unet.parameters():  # LoRA weights train in fp32 even when the base is fp16/bf16
        if p.requires_grad:
            p.data = p.data.float()
    if job.trainer.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return pipe


def _wandb_identity(job: TrainConfig, run_dir: Path) -> tuple[str | None, str | None]:
    """W&B group (the sweep folder in a multirun) and name (the job's overrides)."""
    group, name = job.logger.group, job.logger.name
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            if group is None and in_multirun():
                group = str(hc.sweep.dir)
            if name is None:
                name = hc.job.override_dirname or None
    except Exception:  # noqa: BLE001 - no Hydra context
        pass
    return group, name or run_dir.name


def _wandb_mirror(job: TrainConfig, run_dir: Path, config: dict, resuming: bool) -> WandbMirror:
    group, name = _wandb_identity(job, run_dir)
    id_file = run_dir / WANDB_ID_FILE
    resume_id = json.loads(id_file.read_text())["id"] if (resuming and id_file.exists()) else None
    lg = job.logger
    mirror = WandbMirror(project=lg.project, mode=lg.mode, run_dir=run_dir, config=config, entity=lg.entity,
                         group=group, name=name, tags=list(lg.tags) + (["tiny-model"] if job.model.tiny else []),
                         wandb_dir=lg.dir, resume_id=resume_id)
    if mirror.active:
        atomic_write_text(id_file, json.dumps({"id": mirror.run_id, "dir": str(mirror.files_dir)}))
    return mirror


def _validator(job: TrainConfig, pipe, scenes, story_embeds) -> StoryValidator | None:
    if not job.validate or story_embeds is None or not scenes:
        return None
    title = f"{job.story.title} | model={job.model.name}"
    if job.model.tiny is not None:
        title += " (tiny model: not a real result)"
    if job.memory.vae_slicing:  # the story decode at each checkpoint, one image at a time
        pipe.vae.enable_slicing()
    if job.memory.vae_tiling:
        pipe.vae.enable_tiling()
    validator = StoryValidator(pipe, scenes, story_embeds, job.sampler, job.scorer, title=title, coherence=job.coherence)
    try:
        validator.scorer  # load it now: a missing scorer must fail before training, not at step N
    except Exception as exc:  # noqa: BLE001
        raise TrainingError(f"{exc}\nOr train without the story scores at checkpoints: validate=false") from exc
    return validator


def reward_objective(job: TrainConfig, pipe, story_embeds: dict | None, validator) -> RewardObjective | None:
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


def _lightning_trainer(job: TrainConfig, run_dir: Path, loader, module: KolorsLoraModule, precision: str,
                       callbacks: list) -> L.Trainer:
    """A Lightning Trainer for the run; sets the module's schedule length (total optimizer steps)."""
    t = job.trainer
    max_steps = int(t.max_steps if t.max_steps is not None else -1)
    accumulate = int(t.accumulate_grad_batches or 1)
    max_epochs = t.max_epochs
    if max_epochs is None:  # until max_steps: enough epochs to reach it
        max_epochs = math.ceil(max_steps * accumulate / len(loader)) if max_steps > 0 else 1
    per_epoch = math.ceil(len(loader) / accumulate)
    # Passed in, not read from estimated_stepping_batches: that would set up the dataloader before a
    # checkpoint's loader state is restored.
    module.total_steps = min(max_steps, per_epoch * max_epochs) if max_steps > 0 else per_epoch * max(max_epochs, 1)
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=int(t.num_nodes or 1),
        strategy=resolve_strategy(t.strategy), precision=precision, max_epochs=int(max_epochs), max_steps=max_steps,
        accumulate_grad_batches=accumulate, gradient_clip_val=t.gradient_clip_val, logger=False,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=t.progress_bar,
        use_distributed_sampler=False,  # StreamBatchSampler shards by rank itself
        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(run_dir), callbacks=callbacks,
    )


def _fit(trainer: L.Trainer, module, loader, callback: CheckpointCallback, resume_from, handoff: dict | None):
    """``trainer.fit``; returns (status, error, exit code) for a non-finite loss or Ctrl-C, other
    errors propagate. ``handoff`` is what DDP child processes need (set in their environment)."""
    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT after a Ctrl-C; restored below
    if handoff is not None:
        os.environ[HANDOFF_ENV] = json.dumps(handoff)
    try:
        trainer.fit(module, loader, ckpt_path=str(resume_from) if resume_from else None)
    except NonFiniteLossError as exc:
        return "failed", str(exc), 1
    except (KeyboardInterrupt, SystemExit) as exc:
        if not callback.interrupted and isinstance(exc, SystemExit):
            # Lightning turns Ctrl-C into SystemExit(1); anything else is a real exit
            return "failed", f"SystemExit({exc.code})", 1
        return "interrupted", "KeyboardInterrupt", 130
    finally:
        if handoff is not None:
            os.environ.pop(HANDOFF_ENV, None)
        if threading.current_thread() is threading.main_thread() and sigint is not None:
            signal.signal(signal.SIGINT, sigint)
    if isinstance(callback.exception, NonFiniteLossError):
        return "failed", str(callback.exception), 1
    return "finished", None, 0


# ------------------------------------------------------------------------------ the run


def run_training(job: TrainConfig, run_dir: str | Path, items: Sequence, *, scenes: list[Scene] | None = None,
                 story_embeds: dict | str | Path | None = None, dataset_hash: str = "",
                 resume_from: str | Path | None = None,
                 extra_callbacks: Sequence[L.Callback] = (), is_child: bool = False,
                 empty_caption: str | Path | dict | None = None, style_images: Sequence[Path] = ()) -> TrainResult:
    """Train the LoRA on ``items`` (cache files or dicts with the cache's keys; per image a list of
    them for caption variants) into ``run_dir``. ``empty_caption``: the empty caption's embeddings
    (a cache file or dict), needed with ``dataset.caption_dropout``. ``story_embeds``: the story's
    scene embeddings (the cache's story file or its dict), for the renders and ``reward=aesthetic``.
    ``style_images``: the training images, the style set ``before_after`` measures against.

    Returns a :class:`TrainResult` (status finished/failed/interrupted) instead of raising for a
    non-finite loss or Ctrl-C, after writing the status line; other errors propagate.
    """
    run_dir = Path(run_dir)
    t = job.trainer
    story_file = story_embeds if isinstance(story_embeds, (str, Path)) else None
    if story_file is not None:
        story_embeds = load_story_embeddings(story_file)
    # 1. Seeds, precision, the UNet with its LoRA, the LightningModule and the data loader.
    L.seed_everything(t.seed, workers=True, verbose=False)
    precision = resolve_precision(t.precision, t.accelerator)
    pipe = _trainable_unet(job)
    module = KolorsLoraModule(pipe.unet, dict(pipe.scheduler.config), job.optim, min_snr_gamma=t.min_snr_gamma,
                              noise_offset=t.noise_offset, loss=t.loss)
    train_items, held_out = split_items(items, t.validation_split, t.seed)  # the same split on every rank
    empty = load_empty_prompt(empty_caption) if isinstance(empty_caption, (str, Path)) else empty_caption
    loader = make_loader(train_items, t, job.dataset.caption_dropout, empty, by_size=job.dataset.buckets is not None)
    module.describe_sample = loader.dataset.describe
    # 2. What every LoRA file records; rank 0 alone logs (metrics.jsonl + W&B) and validates.
    config = settings_dict(job)
    metadata = {"base_model": job.model.name, "base_model_hash": model_hash(ensure_model(job.model), job.model.vae_path),
                "dataset_hash": dataset_hash, "config": config, "tiny_model": job.model.tiny is not None}
    mirror, validator = None, None
    if not is_child:
        run_dir.mkdir(parents=True, exist_ok=True)
        mirror = _wandb_mirror(job, run_dir, config, resuming=resume_from is not None)
        validator = _validator(job, pipe, scenes, story_embeds)
    module.reward = reward_objective(job, pipe, story_embeds, validator)
    logger = RunLogger(None if is_child else run_dir, mirror)
    callback = CheckpointCallback(RunContext(
        run_dir=run_dir, logger=logger, metadata=metadata, every_n_steps=int(t.checkpoint_every_n_steps or 10**12),
        log_every_n_steps=int(t.log_every_n_steps or 1), validator=validator, scenes=scenes, held_out=held_out,
        validation_timesteps=tuple(int(v) for v in t.validation_timesteps), seed=int(t.seed),
        reward_patience=int(job.reward.patience) if module.reward is not None else 0))
    # 3. The Lightning Trainer; fit (DDP children get what they train on through the environment).
    ema = [EmaCallback(t.ema)] if t.ema.enabled else []  # before the checkpoints: they export its weights
    callback.ctx.ema = ema[0] if ema else None
    callbacks = [*ema, callback, *([VaeToDevice(pipe)] if validator is not None else []), *extra_callbacks]
    trainer = _lightning_trainer(job, run_dir, loader, module, precision, callbacks)
    loader.batch_sampler.trainer = trainer  # its state_dict reads the trainer's progress counters
    if not is_child:
        n_train = sum(p.numel() for p in pipe.unet.parameters() if p.requires_grad)
        print(f"Training a LoRA ({n_train:,} trainable parameters; base frozen) on {len(loader.dataset)} items, "
              f"{len(loader)} batches/epoch, precision {precision} -> {run_dir}")
    handoff = None
    if not is_child and world_size(t) > 1:
        handoff = {"config": config, "run_dir": str(run_dir), "empty_caption": str(empty_caption) if empty_caption else None,
                   "items": [[str(v) for v in i] if isinstance(i, (list, tuple)) else str(i) for i in items],
                   "scenes": [s.as_dict() for s in scenes] if scenes else None, "dataset_hash": dataset_hash,
                   "story": str(story_file) if story_file else None,
                   "resume_from": str(resume_from) if resume_from else None}
    try:
        status, error, exit_code = _fit(trainer, module, loader, callback, resume_from, handoff)
    except BaseException as exc:
        logger.status("failed", trainer.global_step, f"{type(exc).__name__}: {exc}")
        logger.finish(1)
        raise
    # 4. The status line, and the result.
    logger.status(status, trainer.global_step, error)
    logger.finish(exit_code)
    if status == "failed" and error and not is_child:
        last = last_checkpoint(run_dir)
        keep = f"The last good checkpoint is kept: {last}" if last else "No checkpoint was written before it."
        print(f"ERROR: {error}\n{keep}")
    return TrainResult(
        run_dir=run_dir, status=status, step=trainer.global_step, error=error, checkpoints=logger.checkpoints,
        wandb_dir=_wandb_dir(mirror, run_dir), wandb_error=mirror.error if mirror else None, precision=precision,
        before_after=before_after(job, status, validator, style_images, run_dir, trainer.global_step, logger.checkpoints),
    )


def _wandb_dir(mirror: WandbMirror | None, run_dir: Path) -> Path | None:
    if mirror is None:
        return None
    if mirror.active:
        return mirror.files_dir
    if mirror.mode == "disabled":
        return None
    runs = sorted((run_dir / "wandb").glob("*run-*"), key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


def run_handoff() -> None:
    """A DDP child process started by Lightning: train what the parent handed over."""
    h = json.loads(os.environ[HANDOFF_ENV])
    scenes = [Scene(**s) for s in h["scenes"]] if h.get("scenes") else None
    run_training(typed(h["config"], TrainConfig), Path(h["run_dir"]), h["items"], scenes=scenes,
                 story_embeds=h.get("story"), dataset_hash=h["dataset_hash"], resume_from=h["resume_from"], is_child=True,
                 empty_caption=h.get("empty_caption"))


def handoff_pending() -> bool:
    return bool(os.environ.get(HANDOFF_ENV)) and secondary_process()


# ------------------------------------------------------------------------------ stages


def data_stage(job: TrainConfig, scenes: list[Scene] | None) -> tuple:
    """Prepare the dataset (or reuse it with stage=train) and build/verify the cache."""
    from kolors_story.data import load_prepared, run_data_stage

    if job.stage == "train":
        prepared = load_prepared(job.data_dir)
    else:
        prepared = run_data_stage(job.dataset, job.filter, job.data_dir, job.scorer)
    d = job.dataset
    variants = (partial(caption_variants, prefix=d.caption_prefix or "", keep_tokens=int(d.keep_tokens),
                        count=int(d.shuffle_variants), seed=int(job.trainer.seed)) if d.shuffle_tags else None)
    cache = build_cache(job.model, prepared, data_dir=job.data_dir, resolution=d.resolution,
                        crop=d.crop, crop_seed=job.trainer.seed, batch_size=job.cache.batch_size,
                        scenes=scenes, variants=variants, empty_caption=float(d.caption_dropout) > 0, buckets=d.buckets,
                        devices=cache_processes(job.cache.devices, job.model.device, job.trainer))
    return prepared, cache


def check_run(job: TrainConfig) -> Path:
    """The run folder, once the stage and the device count are known to work here."""
    if job.stage not in STAGES:
        raise TrainingError(f"stage={job.stage!r}: use one of {', '.join(STAGES)}")
    if not job.output_dir:
        raise TrainingError("output_dir is not set: outside `python train.py`, pass output_dir=<run folder>")
    if in_multirun() and world_size(job.trainer) > 1:
        raise TrainingError(
            "trainer.devices > 1 inside a -m sweep: Lightning's DDP launcher re-runs the command line, which "
            "would start the whole sweep again in every process. Run multi-GPU jobs one by one "
            "(python train.py trainer=ddp ...), or sweep with trainer.devices=1."
        )
    return Path(job.output_dir)


def train(job: TrainConfig, *, resume_from: Path | None = None) -> float | None:
    """Data stage, cache, training. Returns the last checkpoint's mean aesthetic score (what sweeps
    maximise), or None with stage=data / validation off."""
    # 1. Check the job, render nothing yet.
    run_dir = check_run(job)
    scenes = story_scenes(job.story, job.sampler)
    # 2. The processed dataset and the latent/embedding cache (the story's prompts included).
    prepared, cache = data_stage(job, scenes)
    if job.stage == "data":
        print_data_summary(prepared, cache)
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume_from is not None:
        warn_if_dataset_changed(resume_from.parent, prepared.dataset_hash)
    # 3. Training on the cache (a second node's rank 0 trains too, but writes nothing).
    secondary = secondary_process()
    result = run_training(job, run_dir, cache.training_items, scenes=scenes, story_embeds=cache.story,
                          empty_caption=cache.empty, style_images=[Path(p) for p, _ in prepared.items],
                          dataset_hash=prepared.dataset_hash, resume_from=resume_from, is_child=secondary)
    if secondary:
        return None
    # 4. Say where everything is; a failure is an exception for the caller.
    print_summary(job, result, cache)
    if result.status == "interrupted":
        raise KeyboardInterrupt
    if result.status == "failed":
        raise TrainingError(result.error or "training failed")
    return result.final_mean

