"""`python train.py`: data stage -> cache -> LoRA training with checkpoints, story panels and scores.

Stages (``stage`` key): ``all`` (default), ``data`` (prepare the dataset + build the cache, then
stop) and ``train`` (reuse the prepared dataset, build/verify the cache, train).

Training runs on the cached latents and prompt embeddings: the pipeline is loaded without its
text encoder. Every ``trainer.checkpoint_every_n_steps`` optimizer steps and at the end, a
checkpoint folder ``<run>/checkpoints/step-XXXXXX/`` is written atomically (temp folder +
rename) with the LoRA in three formats, the rendered story, its scores and the trainer state
used by ``python train.py resume=<run>``. ``<run>/metrics.jsonl`` is the source of truth; W&B
mirrors it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from kolors_story.io import atomic_write_text
from kolors_story.lightning_module import KolorsLoraModule, NonFiniteLossError
from kolors_story.metrics import WANDB_ID_FILE, RunLogger, WandbMirror

CHECKPOINTS = "checkpoints"
LAST_FILE = "last"
TRAINER_STATE = "trainer_state.ckpt"
HANDOFF_ENV = "KOLORS_STORY_TRAIN_HANDOFF"  # parent -> DDP child processes: what to train on
STAGES = ("all", "data", "train")


class TrainingError(RuntimeError):
    """Training stopped (non-finite loss, bad config ...); the message says why and what to do."""


# ------------------------------------------------------------------------------------------ data


class CachedItems(torch.utils.data.Dataset):
    """The training items: cache files (``kolors_story.cache.load_cached_item``) or in-memory dicts
    with the same keys. Indexed by ``(item index, noise seed)`` pairs from :class:`StreamBatchSampler`."""

    def __init__(self, items: Sequence[Path | str | dict]):
        if len(items) == 0:
            raise TrainingError("the training set is empty: the data stage kept no image (see <data_dir>/report.json)")
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def describe(self, index: int) -> str:
        item = self.items[index]
        return str(item) if isinstance(item, (str, Path)) else f"item {index}"

    def __getitem__(self, key):
        index, seed = key
        item = self.items[index]
        if isinstance(item, (str, Path)):
            from kolors_story.cache import load_cached_item

            item = load_cached_item(item)
        out = {k: item[k] for k in ("latents", "prompt_embeds", "pooled_prompt_embeds", "add_time_ids")}
        out["noise_seed"] = torch.tensor(int(seed), dtype=torch.int64)
        out["index"] = torch.tensor(int(index), dtype=torch.int64)
        return out


def _mix(*values: int) -> int:
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(1, np.uint64)[0] >> 1)


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class StreamBatchSampler:
    """``batches_per_epoch`` batches per epoch (DiffSynth's ``steps_per_epoch``), however many items.

    Epoch ``e`` walks a stream of seeded permutations of the dataset (cycling when an epoch is
    longer than the dataset, so every image is seen equally often); rank ``r`` of ``w`` takes
    every ``w``-th batch. Each sample carries its own noise seed, derived from (seed, epoch,
    position), so the noise does not depend on batching, resumes or the global RNG.

    Resumable: ``state_dict`` records the epoch and how many of its batches the trainer has
    processed; a resumed run continues with the next batch of the same stream.
    """

    def __init__(self, n_items: int, batch_size: int, batches_per_epoch: int | None, seed: int):
        # trainer: set by run_training once the Trainer exists (its progress counters are the state)
        self.n_items = int(n_items)
        self.batch_size = max(1, int(batch_size))
        self.seed = int(seed)
        self._fixed = batches_per_epoch
        self.epoch = 0
        self._skip = 0
        self.trainer = None

    def __len__(self) -> int:
        if self._fixed:
            return int(self._fixed)
        _, world = _dist()
        return max(1, math.ceil(self.n_items / (self.batch_size * world)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def sampler(self):
        # Lightning calls set_epoch on ``loader.sampler`` and ``loader.batch_sampler.sampler``
        # only: exposing ourselves there is how each epoch gets its own order.
        return self

    def _permutation(self, epoch: int, k: int) -> list[int]:
        g = torch.Generator().manual_seed(_mix(self.seed, epoch, k, 0xDA7A))
        return torch.randperm(self.n_items, generator=g).tolist()

    def batches(self, epoch: int, rank: int = 0, world: int = 1) -> list[list[tuple[int, int]]]:
        n_batches = len(self)
        need = n_batches * self.batch_size * world
        stream: list[int] = []
        k = 0
        while len(stream) < need:
            stream.extend(self._permutation(epoch, k))
            k += 1
        out = []
        for b in range(n_batches):
            start = (b * world + rank) * self.batch_size
            out.append([(stream[j], _mix(self.seed, epoch, j, 0x401E)) for j in range(start, start + self.batch_size)])
        return out

    def __iter__(self):
        rank, world = _dist()
        skip, self._skip = self._skip, 0
        yield from self.batches(self.epoch, rank, world)[skip:]

    def state_dict(self) -> dict:
        t = self.trainer
        if t is None:
            return {"epoch": self.epoch, "batches_done": 0}
        # ``processed`` counts batches whose training step completed: the next one to train is
        # this index both for checkpoints taken at on_train_batch_end and for interrupts.
        done = t.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": int(t.current_epoch), "batches_done": int(done)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state.get("epoch", 0))
        self._skip = int(state.get("batches_done", 0))
        if self._skip >= len(self):  # the checkpoint closed its epoch: start the next one
            self.epoch += 1
            self._skip = 0


class ResumableLoader(torch.utils.data.DataLoader):
    """A DataLoader Lightning treats as stateful, so mid-epoch resumes continue the same stream."""

    def state_dict(self) -> dict:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)


def make_loader(items: Sequence, trainer_cfg) -> ResumableLoader:
    dataset = CachedItems(items)
    sampler = StreamBatchSampler(
        len(dataset), int(trainer_cfg.get("batch_size", 1)), trainer_cfg.get("steps_per_epoch"),
        int(trainer_cfg.get("seed", 0)),
    )
    workers = int(trainer_cfg.get("num_workers", 0) or 0)
    return ResumableLoader(dataset, batch_sampler=sampler, num_workers=workers, persistent_workers=False)


# ------------------------------------------------------------------------------------ precision


def cuda_like_available() -> bool:
    return torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())


def resolve_precision(precision, accelerator: str = "auto") -> str:
    """``16-mixed`` needs a GPU: on a CPU-only machine it falls back to ``32`` with a warning."""
    p = str(precision)
    if p in ("16", "16-mixed", "16-true") and (str(accelerator) == "cpu" or not cuda_like_available()):
        msg = (f"trainer.precision={p} needs a GPU; this run is on the CPU, so it uses precision 32 "
               "(set trainer.precision=32 or bf16-mixed to silence this)")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        print(f"WARNING: {msg}")
        return "32"
    if p not in ("32", "32-true", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64", "64-true", "bf16", "16"):
        raise ValueError(f"trainer.precision={p!r}: use 32, 16-mixed or bf16-mixed")
    return p


def resolve_strategy(name: str) -> str:
    name = str(name)
    if name.startswith("deepspeed"):
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise TrainingError(
                f"trainer.strategy={name} needs DeepSpeed, which is not installed: `pip install deepspeed` "
                "on a CUDA machine, or use trainer=ddp"
            ) from None
    return name


# ------------------------------------------------------------------------------------ the run


@dataclass
class RunContext:
    """What the checkpoint callback needs; only rank 0 has a logger and a validator."""

    run_dir: Path
    logger: RunLogger
    metadata: dict
    every_n_steps: int
    log_every_n_steps: int = 1
    validator: Any = None
    scenes: list | None = None
    tiny: bool = False


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


class RunCallback(L.Callback):
    """Writes the train lines, saves + validates checkpoints, saves one on Ctrl-C."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.seen_step = -1
        self.last_saved = -1
        self.interrupted = False
        self.exception: BaseException | None = None
        self.saved: list[Path] = []

    # -- helpers
    @property
    def ckpt_root(self) -> Path:
        return self.ctx.run_dir / CHECKPOINTS

    def on_train_start(self, trainer, pl_module):
        self.seen_step = trainer.global_step
        if trainer.global_step > 0:  # resumed: that step's checkpoint exists already
            self.last_saved = trainer.global_step
            if trainer.is_global_zero:
                # train lines after this step from before the resume are superseded by the new ones
                self.ctx.logger.event({"type": "resume", "step": trainer.global_step, "epoch": trainer.current_epoch})

    @staticmethod
    def _stopping(trainer) -> bool:
        if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            return True
        me = trainer.max_epochs
        return bool(me is not None and me >= 0 and trainer.is_last_batch and trainer.current_epoch + 1 >= me)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self.seen_step:  # still accumulating gradients
            return
        self.seen_step = step
        losses = pl_module.step_losses
        loss = torch.stack(losses).float().mean() if losses else torch.tensor(float("nan"))
        pl_module.step_losses = []
        if trainer.world_size > 1:
            loss = trainer.strategy.reduce(loss.to(pl_module.device), reduce_op="mean")
        if trainer.is_global_zero and (step % max(1, self.ctx.log_every_n_steps) == 0 or self._stopping(trainer)):
            self.ctx.logger.train(step, trainer.current_epoch, float(loss), float(pl_module.current_lr or 0.0))
        if step % max(1, self.ctx.every_n_steps) == 0 or self._stopping(trainer):
            self.save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if trainer.global_step > max(self.last_saved, 0):
            self.save(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception):
        self.exception = exception
        if isinstance(exception, KeyboardInterrupt):
            self.interrupted = True
            if trainer.is_global_zero and trainer.global_step > max(self.last_saved, 0):
                print(f"\nCtrl-C: saving a checkpoint at step {trainer.global_step} before stopping ...")
                self.save(trainer, pl_module, interrupted=True)

    # -- the checkpoint itself
    def save(self, trainer, pl_module, interrupted: bool = False) -> None:
        from kolors_story.lora import save_lora

        step, epoch = trainer.global_step, trainer.current_epoch
        name = f"step-{step:06d}"
        final = self.ckpt_root / name
        tmp = self.ckpt_root / f".{name}.tmp"
        rank0 = trainer.is_global_zero
        result = None
        validation_error = None
        files: dict = {}
        if rank0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            meta = {**self.ctx.metadata, "step": step, "epoch": epoch}
            files = save_lora(pl_module.unet, tmp, meta)
            if self.ctx.validator is not None and not interrupted:
                try:
                    result = self.ctx.validator.run(tmp, self.ctx.run_dir, step)
                except Exception as exc:  # noqa: BLE001 - a failed render must not cost the LoRA
                    validation_error = f"{type(exc).__name__}: {exc}"
                    warnings.warn(f"story validation at step {step} failed ({validation_error}); "
                                  "the checkpoint is saved without scores", RuntimeWarning, stacklevel=2)
                    print(f"WARNING: story validation at step {step} failed: {validation_error}")
        if interrupted:  # no collective calls here: other ranks may already be gone
            ckpt = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            trainer.strategy.checkpoint_io.save_checkpoint(ckpt, tmp / TRAINER_STATE)
        else:
            trainer.save_checkpoint(tmp / TRAINER_STATE, weights_only=False)  # every rank (DDP: rank 0 writes, with a barrier)
        if rank0:
            if final.exists():  # a resumed run reached this step again: the new one replaces it
                old = self.ckpt_root / f".{name}.old"
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(final)
            atomic_write_text(self.ckpt_root / LAST_FILE, name + "\n")
            self.saved.append(final)
            rel = _rel(final, self.ctx.run_dir)
            record = {
                "step": step, "epoch": epoch, "dir": rel,
                "scores": None, "mean": None, "min": None, "passed": None, "coherence": None,
                "panel": None, "images": [],
                "files": {fmt: f"{rel}/{Path(p).name}" for fmt, p in files.items()},
                "trainer_state": f"{rel}/{TRAINER_STATE}",
            }
            if result is not None:
                record.update(
                    scores=result["scores"], mean=result["mean"], min=result["min"], passed=result["passed"],
                    coherence=result["coherence"], outlier=result["outlier"], panel=f"{rel}/{result['panel']}",
                    images=[f"{rel}/{p}" for p in result["images"]],
                )
            if interrupted:
                record["interrupted"] = True
            if validation_error:
                record["validation_error"] = validation_error
            self.ctx.logger.checkpoint(record, self.ctx.scenes)
            if result is not None:
                verdict = "PASS" if result["passed"] else "below the gate"
                print(f"checkpoint {rel}: aesthetic mean {result['mean']:.3f} (min {result['min']:.3f}, "
                      f"{verdict}), coherence {result['coherence']:.3f}")
        self.last_saved = step
        if not interrupted and trainer.world_size > 1:
            trainer.strategy.barrier("kolors_story.checkpoint")


class VaeToDevice(L.Callback):
    """The VAE is not part of the trained module: rank 0 moves it to the training device for the
    story renders (other ranks never decode, so theirs stays on the CPU)."""

    def __init__(self, pipe):
        self.pipe = pipe

    def on_fit_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            self.pipe.vae.to(pl_module.device)


@dataclass
class TrainResult:
    run_dir: Path
    status: str  # finished | failed | interrupted
    step: int
    error: str | None = None
    checkpoints: list[dict] = field(default_factory=list)
    wandb_dir: Path | None = None
    wandb_error: str | None = None
    precision: str = "32"

    @property
    def last_checkpoint(self) -> Path | None:
        return last_checkpoint(self.run_dir)

    @property
    def final_mean(self) -> float | None:
        scored = [c for c in self.checkpoints if c.get("mean") is not None]
        return scored[-1]["mean"] if scored else None


def last_checkpoint(run_dir: str | Path) -> Path | None:
    f = Path(run_dir) / CHECKPOINTS / LAST_FILE
    if not f.exists():
        return None
    return Path(run_dir) / CHECKPOINTS / f.read_text(encoding="utf-8").strip()


def _get(cfg, key: str, default=None):
    node = OmegaConf.select(cfg, key, default=default) if isinstance(cfg, DictConfig) else cfg.get(key, default)
    return default if node is None else node


def resolved_config(cfg) -> dict:
    """The config as plain data, resolved, without Hydra's own node (recorded in every LoRA file)."""
    data = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)
    data.pop("hydra", None)
    try:
        data["output_dir"] = str(cfg.output_dir) if cfg.get("output_dir") is not None else None
    except Exception:  # noqa: BLE001 - ${hydra:...} outside a Hydra run
        data["output_dir"] = None
    return OmegaConf.to_container(OmegaConf.create(data), resolve=True)


def add_lora_to_unet(unet, lora_cfg) -> None:
    from kolors_story.lora import add_lora_from_config

    add_lora_from_config(unet, lora_cfg)


def _wandb_identity(cfg, run_dir: Path) -> tuple[str | None, str | None]:
    """W&B group (the sweep folder in a multirun) and name (the job's overrides)."""
    group, name = _get(cfg, "logger.group"), _get(cfg, "logger.name")
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            if group is None and hc.mode == RunMode.MULTIRUN:
                group = str(hc.sweep.dir)
            if name is None:
                name = hc.job.override_dirname or None
    except Exception:  # noqa: BLE001
        pass
    return group, name or run_dir.name


def run_training(cfg, run_dir: str | Path, items: Sequence, *, scenes: list | None = None,
                 story_embeds: dict | None = None, dataset_hash: str = "", resume_from: str | Path | None = None,
                 extra_callbacks: Sequence[L.Callback] = (), is_child: bool = False) -> TrainResult:
    """Train the LoRA on ``items`` (cache files or dicts with the cache's keys) into ``run_dir``.

    Returns a :class:`TrainResult` (status finished/failed/interrupted) instead of raising for a
    non-finite loss or Ctrl-C, after writing the status line; other errors propagate.
    """
    from kolors_story.models import ensure_model, load_pipeline, model_hash

    run_dir = Path(run_dir)
    tcfg = cfg.trainer
    L.seed_everything(int(tcfg.get("seed", 0)), workers=True, verbose=False)
    precision = resolve_precision(tcfg.get("precision", "32"), tcfg.get("accelerator", "auto"))

    # The pipeline without its text encoder, on the CPU first: Lightning moves the UNet to each
    # rank's device; only rank 0 moves the VAE (for the story renders).
    model_cfg = cfg.model
    model_path = ensure_model(model_cfg)
    pipe = load_pipeline(model_path, vae_path=model_cfg.get("vae_path"), dtype=model_cfg.get("dtype", "float32"),
                         device="cpu", text_encoder=False)
    unet = pipe.unet
    unet.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    add_lora_to_unet(unet, cfg.lora)
    for p in unet.parameters():  # LoRA weights train in fp32 even when the base is fp16/bf16
        if p.requires_grad:
            p.data = p.data.float()
    if bool(tcfg.get("gradient_checkpointing", False)):
        unet.enable_gradient_checkpointing()
    unet.train()

    module = KolorsLoraModule(
        unet, dict(pipe.scheduler.config), OmegaConf.to_container(cfg.optim, resolve=True)
        if isinstance(cfg.optim, DictConfig) else dict(cfg.optim),
        min_snr_gamma=tcfg.get("min_snr_gamma"), noise_offset=float(tcfg.get("noise_offset", 0.0) or 0.0),
    )
    loader = make_loader(items, tcfg)
    module.describe_sample = loader.dataset.describe

    tiny = bool(_get(cfg, "model.tiny"))
    resolved = resolved_config(cfg)
    metadata = {
        "base_model": str(model_cfg.get("name", "")),
        "base_model_hash": model_hash(model_path, model_cfg.get("vae_path")),
        "dataset_hash": dataset_hash,
        "config": resolved,
        "tiny_model": tiny,
    }

    wandb_mirror = None
    validator = None
    if not is_child:
        run_dir.mkdir(parents=True, exist_ok=True)
        lcfg = cfg.get("logger") or {}
        group, name = _wandb_identity(cfg, run_dir)
        id_file = run_dir / WANDB_ID_FILE
        resume_id = json.loads(id_file.read_text())["id"] if (resume_from and id_file.exists()) else None
        wandb_mirror = WandbMirror(
            project=str(lcfg.get("project", "kolors-story")), mode=str(lcfg.get("mode", "disabled")),
            run_dir=run_dir, config=resolved, entity=lcfg.get("entity"), group=group, name=name,
            tags=list(lcfg.get("tags") or []) + (["tiny-model"] if tiny else []), wandb_dir=lcfg.get("dir"),
            resume_id=resume_id,
        )
        if wandb_mirror.active:
            atomic_write_text(id_file, json.dumps({"id": wandb_mirror.run_id, "dir": str(wandb_mirror.files_dir)}))
        if bool(cfg.get("validate", True)) and story_embeds is not None and scenes:
            from kolors_story.validation import StoryValidator

            title = str(_get(cfg, "story.title", "story")) + f" | model={model_cfg.get('name', '?')}"
            if tiny:
                title += " (tiny random model: not a real result)"
            validator = StoryValidator(pipe, scenes, story_embeds, cfg.sampler, cfg.get("scorer"), title=title)
            try:
                validator.scorer  # load it now: a missing scorer must fail before training, not at step N
            except Exception as exc:  # noqa: BLE001
                raise TrainingError(f"{exc}\nOr train without the story scores at checkpoints: validate=false") from exc
    logger = RunLogger(None if is_child else run_dir, wandb_mirror)
    ctx = RunContext(
        run_dir=run_dir, logger=logger, metadata=metadata,
        every_n_steps=int(tcfg.get("checkpoint_every_n_steps", 500) or 10**12),
        log_every_n_steps=int(tcfg.get("log_every_n_steps", 1) or 1), validator=validator, scenes=scenes, tiny=tiny,
    )
    callback = RunCallback(ctx)

    max_steps = int(tcfg.get("max_steps", -1) if tcfg.get("max_steps") is not None else -1)
    max_epochs = tcfg.get("max_epochs")
    accumulate = int(tcfg.get("accumulate_grad_batches", 1) or 1)
    if max_epochs is None:  # until max_steps: enough epochs to reach it
        max_epochs = math.ceil(max_steps * accumulate / len(loader)) if max_steps > 0 else 1
    max_epochs = int(max_epochs)
    per_epoch = math.ceil(len(loader) / accumulate)
    module.total_steps = min(max_steps, per_epoch * max_epochs) if max_steps > 0 else per_epoch * max(max_epochs, 1)
    trainer = L.Trainer(
        accelerator=str(tcfg.get("accelerator", "auto")),
        devices=tcfg.get("devices", 1),
        num_nodes=int(tcfg.get("num_nodes", 1) or 1),
        strategy=resolve_strategy(tcfg.get("strategy", "auto")),
        precision=precision,
        max_epochs=max_epochs,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=tcfg.get("gradient_clip_val"),
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=bool(tcfg.get("progress_bar", True)),
        use_distributed_sampler=False,  # StreamBatchSampler shards by rank itself
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(run_dir),
        callbacks=[callback, *([VaeToDevice(pipe)] if validator is not None else []), *extra_callbacks],
    )
    loader.batch_sampler.trainer = trainer  # its state_dict reads the trainer's progress counters
    n_train = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    if not is_child:
        print(f"Training a LoRA ({n_train:,} trainable parameters; base frozen) on {len(loader.dataset)} items, "
              f"{len(loader)} batches/epoch, precision {precision} -> {run_dir}")

    status, error, exit_code = "finished", None, 0
    handoff_set = False
    import signal
    import threading

    sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT after a Ctrl-C; restored below
    try:
        if not is_child and _world_size(tcfg) > 1:
            os.environ[HANDOFF_ENV] = json.dumps({
                "config": resolved, "run_dir": str(run_dir), "items": [str(i) for i in items],
                "scenes": [s.as_dict() for s in scenes] if scenes else None, "dataset_hash": dataset_hash,
                "resume_from": str(resume_from) if resume_from else None,
            })
            handoff_set = True
        trainer.fit(module, loader, ckpt_path=str(resume_from) if resume_from else None)
    except NonFiniteLossError as exc:
        status, error, exit_code = "failed", str(exc), 1
    except (KeyboardInterrupt, SystemExit) as exc:
        if not callback.interrupted and isinstance(exc, SystemExit):
            # Lightning turns Ctrl-C into SystemExit(1); anything else is a real exit
            status, error, exit_code = "failed", f"SystemExit({exc.code})", 1
        else:
            status, error, exit_code = "interrupted", "KeyboardInterrupt", 130
    except BaseException as exc:
        status, error, exit_code = "failed", f"{type(exc).__name__}: {exc}", 1
        logger.status(status, trainer.global_step, error)
        logger.finish(exit_code)
        raise
    finally:
        if handoff_set:
            os.environ.pop(HANDOFF_ENV, None)
        if threading.current_thread() is threading.main_thread() and sigint is not None:
            signal.signal(signal.SIGINT, sigint)
    if isinstance(callback.exception, NonFiniteLossError) and status != "failed":
        status, error, exit_code = "failed", str(callback.exception), 1
    logger.status(status, trainer.global_step, error)
    logger.finish(exit_code)
    if status == "failed" and error and not is_child:
        last = last_checkpoint(run_dir)
        keep = f"The last good checkpoint is kept: {last}" if last else "No checkpoint was written before it."
        print(f"ERROR: {error}\n{keep}")
    return TrainResult(
        run_dir=run_dir, status=status, step=trainer.global_step, error=error, checkpoints=logger.checkpoints,
        wandb_dir=wandb_mirror.files_dir if wandb_mirror and wandb_mirror.active else
        (_wandb_dir_of(run_dir) if wandb_mirror and wandb_mirror.mode != "disabled" else None),
        wandb_error=wandb_mirror.error if wandb_mirror else None, precision=precision,
    )


def _wandb_dir_of(run_dir: Path) -> Path | None:
    runs = sorted((run_dir / "wandb").glob("*run-*"), key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


def _world_size(tcfg) -> int:
    devices = tcfg.get("devices", 1)
    n = devices if isinstance(devices, int) else (len(devices) if isinstance(devices, (list, tuple)) else 1)
    if isinstance(devices, str):
        n = int(devices) if devices.isdigit() else (torch.cuda.device_count() if devices in ("auto", "-1") else 1)
    if n == -1:
        n = max(1, torch.cuda.device_count())
    return max(1, n) * int(tcfg.get("num_nodes", 1) or 1)


# --------------------------------------------------------------------------------------- resume


def _current_overrides(cfg) -> tuple[list[str], dict]:
    """The command line's overrides and group choices of this job (Hydra run or compose())."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            return list(hc.overrides.task), dict(hc.runtime.choices)
    except Exception:  # noqa: BLE001
        pass
    hydra_node = cfg.get("hydra") if isinstance(cfg, DictConfig) else None
    if hydra_node is not None:
        task = OmegaConf.select(hydra_node, "overrides.task", default=[]) or []
        choices = OmegaConf.select(hydra_node, "runtime.choices", default={}) or {}
        return [str(t) for t in task], OmegaConf.to_container(choices) if isinstance(choices, DictConfig) else dict(choices)
    return [], {}


def _saved_choices(run_dir: Path) -> dict:
    f = run_dir / ".hydra" / "hydra.yaml"
    if not f.exists():
        return {}
    choices = OmegaConf.select(OmegaConf.load(f), "hydra.runtime.choices", default={}) or {}
    return OmegaConf.to_container(choices) if isinstance(choices, DictConfig) else dict(choices)


def resume_config(cfg) -> tuple[DictConfig, Path, Path]:
    """For ``resume=<run dir | checkpoint dir>``: the run's own saved config with this command
    line's plain ``key=value`` overrides applied (e.g. a larger ``trainer.max_steps``), the run
    folder (training continues there) and the trainer state to restore."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    target = Path(str(cfg.resume)).expanduser()
    if (target / TRAINER_STATE).exists():
        ckpt_dir, run_dir = target, target.parent.parent
    else:
        run_dir = target
        if not run_dir.is_dir():
            raise TrainingError(f"resume={target}: no such folder (give a run folder or one of its checkpoints/step-* folders)")
        ckpt_dir = last_checkpoint(run_dir)
        if ckpt_dir is None:
            raise TrainingError(
                f"resume={run_dir}: {run_dir / CHECKPOINTS / LAST_FILE} does not exist: the run saved no checkpoint "
                "yet, so there is nothing to resume; start a new run"
            )
    state = ckpt_dir / TRAINER_STATE
    if not state.exists():
        raise TrainingError(f"resume: {state} is missing (the checkpoint folder is incomplete); "
                            f"resume from an earlier one: resume={ckpt_dir.parent}/step-XXXXXX")
    saved_file = run_dir / ".hydra" / "config.yaml"
    if not saved_file.exists():
        raise TrainingError(f"resume: {saved_file} is missing, so the run's config is unknown")
    saved = OmegaConf.load(saved_file)
    saved.pop("hydra", None)
    overrides, choices = _current_overrides(cfg)
    old_choices = _saved_choices(run_dir)
    for ov in OverridesParser.create().parse_overrides(overrides):
        key = ov.key_or_group
        if key == "resume" or key.startswith("hydra"):
            continue
        if key in choices or key in old_choices:  # a config group choice (model=tiny ...)
            if old_choices.get(key) is not None and str(old_choices.get(key)) == str(ov.value()):
                continue
            raise TrainingError(
                f"resume: {key}={ov.value()} changes a config group of the run (it used "
                f"{key}={old_choices.get(key, '?')}); a resumed run keeps its groups - drop it or start a new run"
            )
        if key.split(".")[0] in ("lora", "model") and OmegaConf.select(saved, key) != ov.value():
            raise TrainingError(f"resume: {key} cannot change when resuming (the checkpoint was trained with "
                                f"{key}={OmegaConf.select(saved, key)})")
        if ov.is_delete():
            raise TrainingError(f"resume: ~{key} is not supported when resuming")
        OmegaConf.update(saved, key, ov.value(), force_add=ov.is_add())
    saved.resume = str(run_dir)
    saved.output_dir = str(run_dir)
    return saved, run_dir, state


def _save_run_config(cfg, run_dir: Path) -> None:
    """``.hydra/config.yaml`` (+ choices) when training is called outside a Hydra run, so
    ``resume=`` works for runs started from Python too."""
    folder = run_dir / ".hydra"
    if (folder / "config.yaml").exists():
        return
    data = OmegaConf.to_container(cfg, resolve=False)
    hydra_node = data.pop("hydra", None)
    folder.mkdir(parents=True, exist_ok=True)
    from kolors_story.io import atomic_path

    with atomic_path(folder / "config.yaml") as tmp:
        OmegaConf.save(OmegaConf.create(data), tmp)
    choices = (hydra_node or {}).get("runtime", {}).get("choices") if isinstance(hydra_node, dict) else None
    if choices:
        with atomic_path(folder / "hydra.yaml") as tmp:
            OmegaConf.save(OmegaConf.create({"hydra": {"runtime": {"choices": choices}}}), tmp)


# ------------------------------------------------------------------------------------- stages


def _run_dir(cfg) -> Path:
    try:
        out = cfg.output_dir
    except Exception as exc:  # noqa: BLE001 - ${hydra:...} outside a Hydra run
        raise TrainingError("output_dir is not set: outside `python train.py`, pass output_dir=<run folder>") from exc
    return Path(str(out))


def _check_multirun_ddp(cfg) -> None:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001
        multirun = False
    if multirun and _world_size(cfg.trainer) > 1:
        raise TrainingError(
            "trainer.devices > 1 inside a -m sweep: Lightning's DDP launcher re-runs the command line, which "
            "would start the whole sweep again in every process. Run multi-GPU jobs one by one "
            "(python train.py trainer=ddp ...), or sweep with trainer.devices=1."
        )


def data_stage(cfg, scenes):
    """Prepare the dataset (or reuse it with stage=train) and build/verify the cache."""
    from kolors_story.cache import build_cache

    stage = str(cfg.get("stage", "all"))
    if stage == "train":
        from kolors_story.data import load_prepared

        prepared = load_prepared(cfg.data_dir)
    else:
        from kolors_story.data import run_data_stage

        prepared = run_data_stage(cfg)
    cache = build_cache(cfg, prepared, scenes)
    return prepared, cache


def train_from_config(cfg) -> float | None:
    """The `train.py` job. Returns the last checkpoint's mean aesthetic score (what sweeps
    maximise), or None with stage=data / validation off."""
    from kolors_story.story import scenes_from_config

    handoff = os.environ.get(HANDOFF_ENV)
    if handoff and _secondary_process():  # a DDP child started by Lightning
        h = json.loads(handoff)
        from kolors_story.story import Scene

        scenes = [Scene(**s) for s in h["scenes"]] if h.get("scenes") else None
        run_training(OmegaConf.create(h["config"]), Path(h["run_dir"]), h["items"], scenes=scenes,
                     dataset_hash=h["dataset_hash"], resume_from=h["resume_from"], is_child=True)
        return None

    stage = str(cfg.get("stage", "all"))
    if stage not in STAGES:
        raise TrainingError(f"stage={stage!r}: use one of {', '.join(STAGES)}")
    resume_from = None
    if cfg.get("resume"):
        cfg, run_dir, resume_from = resume_config(cfg)
        print(f"Resuming {run_dir} from {resume_from.parent.name}")
    else:
        run_dir = _run_dir(cfg)
    _check_multirun_ddp(cfg)
    scenes = scenes_from_config(cfg.story, cfg.sampler)
    prepared, cache = data_stage(cfg, scenes)
    if stage == "data":
        print_data_summary(cfg, prepared, cache)
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    _save_run_config(cfg, run_dir)
    if resume_from is not None:
        _warn_if_dataset_changed(resume_from.parent, prepared.dataset_hash)

    from kolors_story.cache import load_story_embeddings

    story = load_story_embeddings(cache.story) if cache.story is not None else None
    secondary = _secondary_process()  # e.g. rank 0 of a second node: trains, writes nothing
    result = run_training(cfg, run_dir, cache.items, scenes=scenes, story_embeds=story,
                          dataset_hash=prepared.dataset_hash, resume_from=resume_from, is_child=secondary)
    if secondary:
        return None
    print_summary(cfg, result, cache)
    if result.status == "interrupted":
        raise KeyboardInterrupt
    if result.status == "failed":
        raise TrainingError(result.error or "training failed")
    return result.final_mean


def _secondary_process() -> bool:
    """Not the global rank 0 of a distributed job (Lightning, torchrun and SLURM set these)."""
    for var in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "SLURM_PROCID"):
        if os.environ.get(var, "0") not in ("", "0"):
            return True
    return False


def _warn_if_dataset_changed(ckpt_dir: Path, dataset_hash: str) -> None:
    try:
        from kolors_story.lora import read_lora

        meta = read_lora(ckpt_dir / "lora.safetensors").metadata
    except Exception:  # noqa: BLE001 - informational only
        return
    old = meta.get("dataset_hash")
    if old and dataset_hash and old != dataset_hash:
        print(f"WARNING: the dataset changed since {ckpt_dir} (dataset hash {old} -> {dataset_hash}); "
              "the resumed run trains on the new data")


# -------------------------------------------------------------------------------------- output


def _console():
    import sys

    from rich.console import Console

    # Logs and pipes get full paths on one line (rich would wrap them at 80 columns).
    return Console() if sys.stdout.isatty() else Console(width=200)


def print_data_summary(cfg, prepared, cache) -> None:
    from rich.table import Table

    t = Table(title="Data stage done (stage=data)", show_header=False)
    t.add_row("processed dataset", f"{prepared.train_dir} ({len(prepared.items)} images)")
    t.add_row("report", str(Path(prepared.data_dir) / "report.json"))
    t.add_row("cache", f"{cache.cache_dir} ({len(cache.items)} items)")
    t.add_row("story embeddings", str(cache.story))
    t.add_row("next", "the same command with stage=train (or without stage=) trains on it")
    _console().print(t)


def print_summary(cfg, result: TrainResult, cache=None) -> None:
    from rich.table import Table

    console = _console()
    colour = {"finished": "green", "failed": "red", "interrupted": "yellow"}[result.status]
    t = Table(title=f"Training {result.status} at step {result.step}", title_style=colour, show_header=False)
    t.add_row("run folder", str(result.run_dir))
    t.add_row("metrics", str(result.run_dir / "metrics.jsonl"))
    t.add_row("config", str(result.run_dir / ".hydra" / "config.yaml"))
    if cache is not None:
        t.add_row("cache", str(cache.cache_dir))
    last = result.last_checkpoint
    t.add_row("last checkpoint", str(last) if last else "-")
    if result.wandb_dir:
        mode = _get(cfg, "logger.mode", "?")
        hint = f"  (wandb sync {result.wandb_dir})" if mode == "offline" else ""
        t.add_row("W&B", f"{mode}: {result.wandb_dir}{hint}")
    elif result.wandb_error:
        t.add_row("W&B", f"off ({result.wandb_error}); metrics.jsonl is complete")
    if result.error:
        t.add_row("error", result.error)
    if last is not None:
        t.add_row("resume", f"python train.py resume={result.run_dir}")
        t.add_row("generate", f"python generate.py run={result.run_dir}")
    console.print(t)
    if result.checkpoints:
        c = Table(title=f"Checkpoints in {result.run_dir} (story panel + aesthetic scores)")
        for col in ("step", "mean", "min", "pass", "coherence", "panel"):
            c.add_column(col)
        for r in result.checkpoints:
            fmt = (lambda v: f"{v:.3f}" if isinstance(v, (int, float)) else "-")
            c.add_row(str(r["step"]), fmt(r.get("mean")), fmt(r.get("min")),
                      {True: "yes", False: "no", None: "-"}[r.get("passed")], fmt(r.get("coherence")),
                      str(r["panel"]) if r.get("panel") else "-")
        console.print(c)
    if _get(cfg, "model.tiny"):
        console.print("[bold yellow]model=tiny: a tiny random model - images and scores only exercise the "
                      "code paths, they are not a real result.[/]")
