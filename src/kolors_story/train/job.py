"""The `train.py` job: data stage -> cache -> LoRA training with checkpoints, story panels and scores.

Stages (``stage``): ``all`` (default), ``data`` (prepare the dataset + build the cache, then stop)
and ``train`` (reuse the prepared dataset, build/verify the cache, train).

Training runs on the cached latents and prompt embeddings: the pipeline is loaded without its
text encoder. ``<run>/metrics.jsonl`` is the source of truth; W&B mirrors it (see ``checkpoints``
for what each checkpoint folder holds).
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import lightning as L

from kolors_story import tiny
from kolors_story.config import TrainSettings, plain, typed
from kolors_story.config.compose import RunIdentity
from kolors_story.data.cache import build_cache
from kolors_story.data.cache_files import load_empty_prompt, load_story_embeddings
from kolors_story.data.tag_shuffle import caption_variants
from kolors_story.errors import TrainingError
from kolors_story.lora import add_lora_from_settings
from kolors_story.models.checkpointing import set_gradient_checkpointing
from kolors_story.models.loading import ensure_model, load_pipeline, model_hash
from kolors_story.records import CheckpointLine, last_checkpoint
from kolors_story.story import Scene, story_scenes
from kolors_story.story.files import copy_story_file
from kolors_story.train.before_after import before_after
from kolors_story.train.character import CharacterResult, train_character
from kolors_story.train.checkpoints import CheckpointCallback, RunContext, VaeToDevice
from kolors_story.train.checks import STAGES
from kolors_story.train.devices import (
    cache_processes,
    resolve_precision,
    secondary_process,
    world_size,
)
from kolors_story.train.ema import EmaCallback
from kolors_story.train.fitting import HANDOFF_ENV, fit, lightning_trainer
from kolors_story.train.held_out import split_items
from kolors_story.train.loader import make_loader
from kolors_story.train.logger import RunLogger
from kolors_story.train.module import KolorsLoraModule
from kolors_story.train.resume import warn_if_dataset_changed
from kolors_story.train.reward import reward_objective
from kolors_story.train.run_summary import print_data_summary, print_summary
from kolors_story.train.stopping import EXIT_CODES, stop_line
from kolors_story.train.tensorboard_mirror import TensorBoardMirror
from kolors_story.train.validation import StoryValidator
from kolors_story.train.wandb_mirror import mirror_files, open_mirror

NOT_IN_HYDRA = RunIdentity()  # a job started from Python: no sweep, no overrides


@dataclass
class TrainResult:
    run_dir: Path
    status: str  # finished | stopped | failed | interrupted
    step: int
    error: str | None = None
    checkpoints: list[CheckpointLine] = field(default_factory=list)
    wandb_dir: Path | None = None
    wandb_error: str | None = None
    precision: str = "32"
    signal: str | None = None  # stopped: the signal that stopped it (SIGTERM, SIGINT)
    report: Path | None = None  # report.html (evaluate.run_report)
    before_after: dict | None = None  # the style measure of the story at LoRA scale 0 vs 1 (train.before_after)

    @property
    def last_checkpoint(self) -> Path | None:
        return last_checkpoint(self.run_dir)

    @property
    def final_mean(self) -> float | None:
        scored = [c for c in self.checkpoints if c.scored]
        return scored[-1].mean if scored else None


def settings_dict(job: TrainSettings) -> dict:
    """The settings as plain data: recorded in every LoRA file, the W&B config and the DDP handoff."""
    return plain(job)


# ------------------------------------------------------------------------------ the pieces


def _trainable_unet(job: TrainSettings):
    """The pipeline without its text encoder, on the CPU (Lightning moves the UNet to each rank's
    device; only rank 0 moves the VAE, for the story renders), with the LoRA on the UNet. Without
    renders (validate=false, no reward) the VAE is left out too: the steps read cached latents."""
    renders = job.validate or job.reward.name != "none"
    pipe = load_pipeline(ensure_model(job.model), vae_path=job.model.vae_path, dtype=job.model.dtype,
                         device="cpu", text_encoder=False, vae=renders)
    unet = pipe.unet
    unet.requires_grad_(False)
    if pipe.vae is not None:
        pipe.vae.requires_grad_(False)
    add_lora_from_settings(unet, job.lora)
    for p in unet.parameters():  # LoRA weights train in fp32 even when the base is fp16/bf16
        if p.requires_grad:
            p.data = p.data.float()
    set_gradient_checkpointing(unet, job.trainer.gradient_checkpointing)
    unet.train()
    return pipe


def _tensorboard(job: TrainSettings, run_dir: Path) -> TensorBoardMirror | None:
    return TensorBoardMirror(run_dir) if job.logger.tensorboard else None


def _validator(job: TrainSettings, pipe, scenes, story_embeds, character: CharacterResult | None) -> StoryValidator | None:
    if not job.validate or story_embeds is None or not scenes:
        return None
    title = f"{job.story.title} | model={job.model.name}"
    if tiny.note(job.model):
        title += f" ({tiny.note(job.model)})"
    if job.memory.vae_slicing:  # the story decode at each checkpoint, one image at a time
        pipe.vae.enable_slicing()
    if job.memory.vae_tiling:
        pipe.vae.enable_tiling()
    validator = StoryValidator(pipe, scenes, story_embeds, job.sampler, job.scorer, title=title, coherence=job.coherence,
                               character=(character.lora, character.scale) if character else None)
    try:
        _ = validator.scorer  # load it now: a missing scorer must fail before training, not at step N
    except Exception as exc:
        raise TrainingError(f"{exc}\nOr train without the story scores at checkpoints: validate=false") from exc
    return validator


# ------------------------------------------------------------------------------ the run


def _module_and_loader(job: TrainSettings, items: Sequence, empty_caption):
    """Seeds, precision, the UNet with its LoRA, the LightningModule and the data loader."""
    t = job.trainer
    L.seed_everything(t.seed, workers=True, verbose=False)
    precision = resolve_precision(t.precision, t.accelerator)
    pipe = _trainable_unet(job)
    module = KolorsLoraModule(pipe.unet, dict(pipe.scheduler.config), job.optim, min_snr_gamma=t.min_snr_gamma,
                              noise_offset=t.noise_offset, loss=t.loss)
    train_items, held_out = split_items(items, t.validation_split, t.seed)  # the same split on every rank
    empty = load_empty_prompt(empty_caption) if isinstance(empty_caption, (str, Path)) else empty_caption
    loader = make_loader(train_items, t, job.dataset.caption_dropout, empty, by_size=job.dataset.buckets is not None)
    module.describe_sample = loader.dataset.describe
    return pipe, module, loader, held_out, precision


def _checkpoint_callback(job: TrainSettings, run_dir: Path, logger: RunLogger, metadata: dict, validator,
                         scenes, held_out: list, module) -> CheckpointCallback:
    t = job.trainer
    return CheckpointCallback(RunContext(
        run_dir=run_dir, logger=logger, metadata=metadata, every_n_steps=int(t.checkpoint_every_n_steps or 10**12),
        log_every_n_steps=int(t.log_every_n_steps or 1), validator=validator, scenes=scenes, held_out=held_out,
        validation_timesteps=tuple(int(v) for v in t.validation_timesteps), seed=int(t.seed),
        reward_patience=int(job.reward.patience) if module.reward is not None else 0,
        keep_last_n=t.keep_last_n, save_dtype=str(t.save_dtype), save_formats=tuple(t.save_formats)))


def _handoff(config: dict, run_dir: Path, items: Sequence, scenes, story_file, empty_caption, dataset_hash: str,
             resume_from) -> dict:
    """What DDP child processes train on, passed through the environment (Lightning re-runs the command)."""
    return {"config": config, "run_dir": str(run_dir), "empty_caption": str(empty_caption) if empty_caption else None,
            "items": [[str(v) for v in i] if isinstance(i, (list, tuple)) else str(i) for i in items],
            "scenes": [s.as_dict() for s in scenes] if scenes else None, "dataset_hash": dataset_hash,
            "story": str(story_file) if story_file else None, "resume_from": str(resume_from) if resume_from else None}


def _lora_metadata(job: TrainSettings, config: dict, dataset_hash: str) -> dict:
    """What every LoRA file of the run records about where it came from."""
    return {"base_model": job.model.name, "base_model_hash": model_hash(ensure_model(job.model), job.model.vae_path),
            "dataset_hash": dataset_hash, "config": config, "tiny_model": tiny.note(job.model) is not None,
            "trigger": job.trigger}


def _say_what_trains(pipe, loader, precision: str, run_dir: Path) -> None:
    n_train = sum(p.numel() for p in pipe.unet.parameters() if p.requires_grad)
    print(f"Training a LoRA ({n_train:,} trainable parameters; base frozen) on {len(loader.dataset)} items, "
          f"{len(loader)} batches/epoch, precision {precision} -> {run_dir}")


def _rank0(job: TrainSettings, run_dir: Path | None, config: dict, resuming: bool, identity: RunIdentity, story: tuple,
           character: CharacterResult | None) -> tuple:
    """Rank 0 (``run_dir`` set) alone logs (metrics.jsonl + W&B; the character rounds first) and
    validates ``story`` (pipe, scenes, embeddings): the mirror, the validator and the logger."""
    mirror, tensorboard, validator = None, None, None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        mirror = open_mirror(job, run_dir, config, resuming=resuming, identity=identity)
        tensorboard, validator = _tensorboard(job, run_dir), _validator(job, *story, character)
    logger = RunLogger(run_dir, mirror, tensorboard)
    for record in character.rounds if character and run_dir is not None else ():
        logger.character(record)
    return mirror, validator, logger


def run_training(job: TrainSettings, run_dir: str | Path, items: Sequence, *, scenes: list[Scene] | None = None,
                 story_embeds: dict | str | Path | None = None, dataset_hash: str = "",
                 resume_from: str | Path | None = None,
                 extra_callbacks: Sequence[L.Callback] = (), is_child: bool = False,
                 empty_caption: str | Path | dict | None = None, style_images: Sequence[Path] = (),
                 identity: RunIdentity = NOT_IN_HYDRA, lora_metadata: dict | None = None,
                 character: CharacterResult | None = None) -> TrainResult:
    """Train the LoRA on ``items`` (cache files or dicts with the cache's keys; per image a list of
    them for caption variants) into ``run_dir``. ``empty_caption``: the empty caption's embeddings
    (a cache file or dict), needed with ``dataset.caption_dropout``. ``story_embeds``: the story's
    scene embeddings (the cache's story file or its dict), for the renders and ``reward=aesthetic``.
    ``style_images``: the training images, the style set ``before_after`` measures against.
    ``lora_metadata``: more keys for every LoRA file's metadata. ``character``: the run's character
    LoRA (``train.character``): its rounds are logged first, and the validation renders stack it.

    Returns a :class:`TrainResult` (status finished/failed/interrupted) instead of raising for a
    non-finite loss or Ctrl-C, after writing the status line; other errors propagate.
    """
    run_dir, t = Path(run_dir), job.trainer
    story_file = story_embeds if isinstance(story_embeds, (str, Path)) else None
    if story_file is not None:
        story_embeds = load_story_embeddings(story_file)
    # 1. Seeds, precision, the UNet with its LoRA, the LightningModule and the data loader.
    pipe, module, loader, held_out, precision = _module_and_loader(job, items, empty_caption)
    # 2. What every LoRA file records; rank 0 alone logs (metrics.jsonl + W&B) and validates.
    config = settings_dict(job)
    metadata = {**_lora_metadata(job, config, dataset_hash), **(lora_metadata or {})}
    mirror, validator, logger = _rank0(job, None if is_child else run_dir, config, resume_from is not None, identity,
                                       (pipe, scenes, story_embeds), character)
    module.reward = reward_objective(job, pipe, story_embeds, validator)
    callback = _checkpoint_callback(job, run_dir, logger, metadata, validator, scenes, held_out, module)
    # 3. The Lightning Trainer; fit (DDP children get what they train on through the environment).
    ema = [EmaCallback(t.ema)] if t.ema.enabled else []  # before the checkpoints: they export its weights
    callback.ctx.ema = ema[0] if ema else None
    callbacks = [*ema, callback, *([VaeToDevice(pipe)] if validator is not None else []), *extra_callbacks]
    trainer = lightning_trainer(job, run_dir, loader, module, precision, callbacks)
    loader.batch_sampler.trainer = trainer  # its state_dict reads the trainer's progress counters
    if not is_child:
        _say_what_trains(pipe, loader, precision, run_dir)
    handoff = (_handoff(config, run_dir, items, scenes, story_file, empty_caption, dataset_hash, resume_from)
               if not is_child and world_size(t) > 1 else None)
    try:
        status, error, exit_code = fit(trainer, module, loader, callback, resume_from, handoff)
    except BaseException as exc:
        logger.status("failed", trainer.global_step, _failure(exc, None if is_child else run_dir))
        logger.finish(1)
        raise
    # 4. The status line, and the result (a stopped run resumes into the same W&B run: not crashed).
    signal = (callback.stop.signal or "SIGTERM") if status == "stopped" else None
    logger.status(status, trainer.global_step, error, signal=signal)
    logger.finish(0 if signal else exit_code, preempted=signal is not None)
    if status == "failed" and error and not is_child:
        _say_what_was_kept(run_dir, error)
    shift = before_after(job, status, validator, style_images, run_dir, trainer.global_step, logger.checkpoints)
    return TrainResult(
        run_dir=run_dir, status=status, step=trainer.global_step, error=error, checkpoints=logger.checkpoints, signal=signal,
        wandb_dir=mirror_files(mirror, run_dir), wandb_error=mirror.error if mirror else None, precision=precision,
        before_after=shift, report=None if is_child else _write_report(run_dir),
    )


def _failure(exc: BaseException, run_dir: Path | None) -> str:
    """What the status line says of an unexpected error: its cause, and where its traceback is."""
    cause = f"{type(exc).__name__}: {exc}" if str(exc) else f"{type(exc).__name__} (no message)"
    if run_dir is None:
        return cause
    log = run_dir / "train.log"  # Hydra's log of the job; the traceback is appended for the bug report
    with open(log, "a", encoding="utf-8") as f:
        f.write("".join(traceback.format_exception(exc)))
    return f"{cause} (traceback in {log})"


def _write_report(run_dir: Path) -> Path | None:
    """``report.html`` at the end of the run (also a stopped or failed one); never costs the run."""
    from kolors_story.evaluate.run_report import write_run_report

    try:
        return write_run_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - the report is a view of files that are complete
        print(f"WARNING: could not write report.html ({type(exc).__name__}: {exc})")
        return None


def _say_what_was_kept(run_dir: Path, error: str) -> None:
    last = last_checkpoint(run_dir)
    keep = f"The last good checkpoint is kept: {last}" if last else "No checkpoint was written before it."
    print(f"ERROR: {error}\n{keep}")


def run_handoff() -> None:
    """A DDP child process started by Lightning: train what the parent handed over."""
    h = json.loads(os.environ[HANDOFF_ENV])
    scenes = [Scene(**s) for s in h["scenes"]] if h.get("scenes") else None
    run_training(typed(h["config"], TrainSettings), Path(h["run_dir"]), h["items"], scenes=scenes,
                 story_embeds=h.get("story"), dataset_hash=h["dataset_hash"], resume_from=h["resume_from"], is_child=True,
                 empty_caption=h.get("empty_caption"))


def handoff_pending() -> bool:
    return bool(os.environ.get(HANDOFF_ENV)) and secondary_process()


# ------------------------------------------------------------------------------ stages


def data_stage(job: TrainSettings, scenes: list[Scene] | None) -> tuple:
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


def check_run(job: TrainSettings, identity: RunIdentity = NOT_IN_HYDRA) -> Path:
    """The run folder, once the stage and the device count are known to work here."""
    if job.stage not in STAGES:
        raise TrainingError(f"stage={job.stage!r}: use one of {', '.join(STAGES)}")
    if not job.output_dir:
        raise TrainingError("output_dir is not set: outside `python train.py`, pass output_dir=<run folder>")
    if identity.multirun and world_size(job.trainer) > 1:
        raise TrainingError(
            "trainer.devices > 1 inside a -m sweep: Lightning's DDP launcher re-runs the command line, which "
            "would start the whole sweep again in every process. Run multi-GPU jobs one by one "
            "(python train.py trainer=ddp ...), or sweep with trainer.devices=1."
        )
    return Path(job.output_dir)


def train(job: TrainSettings, *, resume_from: Path | None = None, identity: RunIdentity = NOT_IN_HYDRA) -> float | None:
    """Data stage, cache, training. Returns the last checkpoint's mean aesthetic score (what sweeps
    maximise), or None with stage=data / validation off. ``identity``: where Hydra put the job."""
    # 1. Check the job, render nothing yet.
    run_dir = check_run(job, identity)
    scenes = story_scenes(job.story, job.sampler)
    # 2. The processed dataset and the latent/embedding cache (the story's prompts included).
    prepared, cache = data_stage(job, scenes)
    if job.stage == "data":
        print_data_summary(prepared, cache)
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    copy_story_file(job.story, run_dir)  # story.file: it travels with the run (generate.py run= reads it there)
    if resume_from is not None:
        warn_if_dataset_changed(resume_from.parent, prepared.dataset_hash)
    # 3. The character LoRA (character=auto), then training on the cache (a second node's rank 0
    # trains too, but writes nothing).
    secondary = secondary_process()
    character = None if secondary else train_character(job, run_dir, run_training)
    result = run_training(job, run_dir, cache.training_items, scenes=scenes, story_embeds=cache.story,
                          empty_caption=cache.empty, style_images=[Path(p) for p, _ in prepared.items],
                          dataset_hash=prepared.dataset_hash, resume_from=resume_from, is_child=secondary,
                          identity=identity, character=character)
    if secondary:
        return None
    # 4. Say where everything is; a failure is an exception for the caller, a stop its exit code.
    print_summary(job, result, cache)
    if result.status == "stopped":
        print(stop_line(result.signal, result.step, result.last_checkpoint, run_dir))
        raise SystemExit(EXIT_CODES.get(result.signal, 143))
    if result.status == "interrupted":
        raise KeyboardInterrupt
    if result.status == "failed":
        raise TrainingError(result.error or "training failed")
    return result.final_mean

