"""``character=auto``: the same character in every panel, by teaching the model its own most
consistent rendering of it ("The Chosen One", Avrahami et al., SIGGRAPH 2024), before the style
LoRA trains.

Each round:
1. render ``character.candidates`` images of the character (``story.character`` or
   ``character.prompt``) from ``character.phrasings`` in turn, each from its own seed, with the
   job's sampler group (the validation renders' settings) and the previous round's LoRA;
2. embed them with the aesthetic scorer's CLIP tower and keep the tightest cluster of at least
   ``character.min_cluster`` renders (``character_parts``: how, and why);
3. train an entity LoRA (rank ``character.rank``, ``character.steps`` steps) on that cluster with
   the project's own trainer: the renders' VAE latents and their phrasings' prompt embeddings.

The loop stops after ``character.rounds`` rounds, or earlier when the chosen cluster is no tighter
than the round before's (by more than ``character.min_gain``); the last LoRA trained is the
character LoRA. The phrasings are encoded once, by the text encoder alone, which is released
before the UNet loads.

Writes ``<run>/character/round-N/`` (``candidates.png``, ``cluster.png``, ``round.json`` and the
round's training run ``lora/``) and ``<run>/character/lora.safetensors``, ``lora_kohya.safetensors``
and ``lora_diffsynth.ckpt``; each round is a ``character`` line in the run's metrics.jsonl and W&B.
A run that has the LoRA already (``resume=``) reuses it.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kolors_story import tiny
from kolors_story.config import LoraSettings, OptimSettings, RewardSettings, TrainSettings
from kolors_story.errors import TrainingError
from kolors_story.evaluate.scorer import AestheticScorer
from kolors_story.files import atomic_save_image, atomic_write_json
from kolors_story.generate.render import Job, render_jobs
from kolors_story.generate.sampler import check_sampler
from kolors_story.generate.schedulers import build_scheduler
from kolors_story.lora import load_lora_into_pipeline
from kolors_story.models.loading import ensure_model, load_pipeline
from kolors_story.records import CHARACTER_DIR, FILE_NAMES, CharacterLine, CharacterMade, RunMetrics
from kolors_story.train.character_parts import (
    CHARACTER_ADAPTER,
    CONTROL_NOTE,
    candidates_sheet,
    character_text,
    choose_cluster,
    cluster_sheet,
    encode_phrasings,
    pair_similarity,
    phrasing_scenes,
    random_group,
    release,
    training_items,
)

METHOD = ("The Chosen One (Avrahami et al., SIGGRAPH 2024): render the character many times, cluster the renders' "
          "CLIP embeddings, train a LoRA on the tightest cluster, repeat with that LoRA")


@dataclass
class CharacterResult:
    """The run's character LoRA and how it was made (``rounds``: empty when an earlier run made it)."""

    lora: Path  # <run>/character/lora.safetensors
    scale: float
    rounds: list[CharacterLine] = field(default_factory=list)


def character_lora(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHARACTER_DIR / FILE_NAMES["diffusers"]


@dataclass
class _Round:
    """One round's renders and the cluster chosen from them."""

    images: list
    labels: list[int]  # the phrasing of each render
    items: list[dict]  # the chosen renders as training items
    record: CharacterLine


def _render(job: TrainSettings, embeds: dict, lora: Path | None, seeds: list[int], labels: list[int]):
    """The pipeline without its text encoder (with the previous round's LoRA) and the candidates."""
    pipe = load_pipeline(ensure_model(job.model), vae_path=job.model.vae_path, dtype=job.model.dtype,
                         device=job.model.device, text_encoder=False)
    pipe.scheduler = build_scheduler(job.sampler.scheduler, pipe.scheduler.config, **job.sampler.scheduler_kwargs)
    if job.memory.vae_slicing:  # as the validation renders decode (the plan counts the same)
        pipe.vae.enable_slicing()
    if job.memory.vae_tiling:
        pipe.vae.enable_tiling()
    if lora is not None:
        load_lora_into_pipeline(pipe, lora, scale=1.0, adapter_name=CHARACTER_ADAPTER)
    unet = pipe.unet
    on_device = {k: v.to(device=unet.device, dtype=unet.dtype) for k, v in embeds.items()}
    jobs = [Job(scene=label, seed=seed) for label, seed in zip(labels, seeds)]
    with torch.random.fork_rng(devices=[]):  # the renders draw from their own generators only
        images = render_jobs(pipe, jobs, on_device, job.sampler, progress=False)
    return pipe, images


def _choose(job: TrainSettings, folder: Path, run_dir: Path, embeds: dict, lora: Path | None,
            number: int) -> _Round:
    """Render, embed and cluster one round; its sheets and the training items of the chosen renders."""
    c, t0 = job.character, time.perf_counter()
    labels = [i % len(embeds["prompt_embeds"]) for i in range(c.candidates)]
    seeds = [int(c.seed) + (number - 1) * c.candidates + i for i in range(c.candidates)]
    pipe, images = _render(job, embeds, lora, seeds, labels)
    try:
        embeddings = AestheticScorer.from_settings(job.scorer).embed(images)
        cluster = choose_cluster(embeddings, labels, c.min_cluster)
        if c.cluster == "random":  # the control: as many renders as the tightest cluster, any of them
            cluster = random_group(embeddings, labels, len(cluster.members), seed=[int(c.seed), number])
        items = training_items(pipe.vae, images, labels, embeds, cluster.members, job.sampler.batch_size)
    finally:
        del pipe
        release()
    title = tiny.PANEL_NOTE if tiny.note(job.model) else None
    sheets = {"candidates": folder / "candidates.png", "cluster": folder / "cluster.png"}
    atomic_save_image(candidates_sheet(images, labels, cluster.members, title), sheets["candidates"])
    picked = CONTROL_NOTE if c.cluster == "random" else ""
    label = f"round {number}: {len(cluster.members)} of {len(images)} renders{picked}, similarity {cluster.similarity:.4f}"
    atomic_save_image(cluster_sheet(images, cluster.members, label, title), sheets["cluster"])
    record = CharacterLine(
        round=number, candidates=len(images), phrasings=len(embeds["prompt_embeds"]), clusters=cluster.clusters,
        cluster_size=len(cluster.members), cluster_similarity=cluster.similarity, cluster_excess=cluster.excess,
        candidates_similarity=pair_similarity(embeddings, labels), chosen=cluster.members, choice=c.cluster,
        sheets={k: str(v.relative_to(run_dir)) for k, v in sheets.items()}, seconds=time.perf_counter() - t0)
    return _Round(images, labels, items, record)


def entity_job(job: TrainSettings, out_dir: Path, number: int) -> TrainSettings:
    """The settings the entity LoRA trains with: the character group's rank, steps and rate, the
    job's model and loss; one process, no renders, no W&B run of its own, no caption dropout."""
    c, t = job.character, job.trainer
    trainer = dataclasses.replace(
        t, max_steps=int(c.steps), max_epochs=None, steps_per_epoch=int(c.steps), checkpoint_every_n_steps=int(c.steps),
        batch_size=int(c.batch_size), accumulate_grad_batches=1, validation_split=0.0, keep_last_n=None,
        ema=dataclasses.replace(t.ema, enabled=False), devices=1, num_nodes=1, strategy="auto",
        seed=int(c.seed) + number, save_formats=list(FILE_NAMES), progress_bar=False)
    return dataclasses.replace(
        job, lora=LoraSettings(rank=int(c.rank), alpha=float(c.alpha)), optim=OptimSettings(lr=float(c.lr)),
        trainer=trainer, reward=RewardSettings(), dataset=dataclasses.replace(job.dataset, caption_dropout=0.0),
        logger=dataclasses.replace(job.logger, mode="disabled", tensorboard=False), validate=False,
        before_after=False, resume=None, stage="train", output_dir=str(out_dir), trigger=character_text(job),
        character=dataclasses.replace(c, enabled=False))


def _metadata(job: TrainSettings, rounds: list[CharacterLine]) -> dict:
    """What the character LoRA's files say about how it was made (the bundle's model card shows it)."""
    c = job.character
    made = CharacterMade(prompt=character_text(job), method=METHOD, phrasings=[s.prompt for s in phrasing_scenes(job)],
                         candidates=c.candidates, min_cluster=c.min_cluster, cluster=c.cluster, rank=c.rank,
                         steps=c.steps, lr=c.lr,
                         rounds=rounds)
    return {"character": made.to_json()}


def _train(job: TrainSettings, fit: Callable, folder: Path, run_dir: Path, found: _Round,
           rounds: list[CharacterLine]) -> Path:
    """Train the round's entity LoRA on the chosen renders; its file (all three formats beside it)."""
    out = folder / "lora"
    number = found.record.round
    found.record.trained, found.record.steps = True, int(job.character.steps)  # what the LoRA's metadata says of it
    result = fit(entity_job(job, out, number), out, found.items,
                 lora_metadata=_metadata(job, [*rounds, found.record]))
    if result.status == "interrupted":
        raise KeyboardInterrupt
    if result.status != "finished" or result.last_checkpoint is None:
        raise TrainingError(f"the character LoRA of round {number} did not finish ({result.status}: {result.error})")
    train = RunMetrics.read(out).train
    lora = result.last_checkpoint / FILE_NAMES["diffusers"]
    found.record.steps = int(result.step)
    found.record.loss = train[-1].loss if train else None
    found.record.lora = str(lora.relative_to(run_dir))
    return lora


def _publish(lora: Path, folder: Path) -> Path:
    """The last round's files as the run's character LoRA (``lora.safetensors`` last: it marks it done)."""
    names = sorted(FILE_NAMES.values(), key=lambda n: n == FILE_NAMES["diffusers"])
    for name in names:
        if (lora.parent / name).is_file():
            shutil.copy2(lora.parent / name, folder / f".{name}.tmp")
            (folder / f".{name}.tmp").replace(folder / name)
    return folder / FILE_NAMES["diffusers"]


def train_character(job: TrainSettings, run_dir: str | Path, fit: Callable, log: Callable = print) -> CharacterResult | None:
    """The character loop of ``job`` into ``run_dir`` (nothing when ``character.enabled`` is off).
    ``fit``: the project's trainer (``train.job.run_training``, passed in: this module sits below the job)."""
    c, run_dir = job.character, Path(run_dir)
    if not c.enabled:
        return None
    done = character_lora(run_dir)
    if done.is_file():
        log(f"character LoRA: reusing {done}")
        return CharacterResult(done, float(c.scale))
    job = dataclasses.replace(job, sampler=check_sampler(dataclasses.replace(job.sampler)))
    folder = run_dir / CHARACTER_DIR
    embeds = encode_phrasings(job, phrasing_scenes(job))
    rounds: list[CharacterLine] = []
    lora = None
    for number in range(1, int(c.rounds) + 1):
        round_dir = folder / f"round-{number}"
        found = _choose(job, round_dir, run_dir, embeds, lora, number)
        last = rounds[-1].cluster_similarity if rounds else None
        if last is not None and found.record.cluster_similarity <= last + float(c.min_gain):
            found.record.stopped = f"no gain: cluster similarity {found.record.cluster_similarity:.4f} <= {last:.4f}"
        else:
            lora = _train(job, fit, round_dir, run_dir, found, rounds)
            if number == int(c.rounds):
                found.record.stopped = f"{number} rounds done"
        atomic_write_json(round_dir / "round.json", found.record.to_json())
        rounds.append(found.record)
        picked = CONTROL_NOTE if found.record.choice == "random" else ""
        log(f"character round {number}: {found.record.cluster_size} of {found.record.candidates} renders{picked}, "
            f"cluster similarity {found.record.cluster_similarity:.4f}, all renders {found.record.candidates_similarity:.4f}"
            + (f" ({found.record.stopped})" if found.record.stopped else ""))
        if found.record.stopped:
            break
    return CharacterResult(_publish(lora, folder), float(c.scale), rounds)
