"""How a story was made, written down: the PNG text of each image and ``manifest.json`` (enough to
regenerate every image: resolved config, model hash, LoRA sha256s, sampler, seeds, best-of picks,
versions and thread count). ``records.Manifest`` is its shape."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import OmegaConf

from kolors_story.files import file_sha256
from kolors_story.generate.render import StoryRender
from kolors_story.generate.schedulers import describe
from kolors_story.records import (
    MANIFEST_FORMAT,
    TINY_NOTE,
    LoraRecord,
    Manifest,
    SceneRecord,
)
from kolors_story.settings import GenerateConfig
from kolors_story.story import Scene


@dataclass
class ModelInfo:
    """The model a story was rendered with."""

    path: Path  # the folder actually loaded
    hash: str  # models.loading.model_hash
    tiny: bool


def versions() -> dict:
    import importlib.metadata as md

    # CPU float reductions depend on the thread count: reproduce restores it (see reproduce.py).
    out = {"python": platform.python_version(), "torch_threads": torch.get_num_threads()}
    for name in ("kolors-story", "torch", "diffusers", "transformers", "peft"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def sampler_record(job: GenerateConfig, render: StoryRender, scheduler) -> dict:
    s = job.sampler
    return {"scheduler": s.scheduler, "scheduler_class": describe(scheduler)["class"], "steps": s.steps,
            "cfg": s.cfg, "stage1_size": [s.height, s.width], "size": list(render.size), "batch_size": s.batch_size}


def hires_record(job: GenerateConfig, render: StoryRender) -> dict | None:
    s, h = job.sampler, job.sampler.hires
    if not h.enabled:
        return None
    return {"enabled": True, "stage1_size": [s.height, s.width], "final_size": list(render.size),
            "upscaler": h.upscaler, "scale": h.scale, "strength": h.strength, "steps": h.steps,
            "refine_steps_run": int(h.steps * h.strength), "cfg": s.cfg if h.cfg is None else h.cfg,
            "pipeline": "KolorsImg2ImgPipeline (same components)"}


SELECTED_BY = {"scene": "aesthetic score", "story": "story objective"}


def best_of_record(job: GenerateConfig, render: StoryRender, reproduced: bool) -> dict | None:
    b = job.sampler.best_of
    if b.n <= 1:
        return None
    return {"n": b.n, "seed_stride": b.seed_stride,
            "selected_by": "recorded choice (reproduction)" if reproduced else SELECTED_BY[b.select],
            "chosen": render.chosen}


def _coherence_record(render: StoryRender, memory: dict) -> dict | None:
    """What coherence did, with the adapter's identity (its weight file's sha256) when one was loaded."""
    if render.coherence is None:
        return None
    out = dict(render.coherence)
    if "reference" in out and memory.get("ip_adapter"):
        out["reference"] = {**out["reference"], "adapter": memory["ip_adapter"]}
    return out


def _png_coherence(record: dict, n: int) -> dict:
    """This image's part of the coherence record: which scenes it read, which image conditioned it."""
    out = {}
    if record.get("sharing"):
        out["shared_from_scenes"] = record["sharing"]["references"]
    if record.get("reference"):
        ref = record["reference"]
        out["reference"] = {"scale": ref["scales"][n], "scene": ref["scene"],
                            "image_sha256": (ref.get("image") or {}).get("sha256")}
    return out


def png_fields(job: GenerateConfig, scenes: list[Scene], render: StoryRender, model: ModelInfo,
               loras: list[LoraRecord]) -> list[dict]:
    """What each image's PNG text chunks say about how it was made."""
    s = job.sampler
    height, width = render.size
    hires = hires_record(job, render)
    out = []
    for n, scene in enumerate(scenes):
        fields = {
            "prompt": scene.prompt, "negative_prompt": scene.negative, "scene": scene.index, "seed": render.seeds[n],
            "sampler": s.scheduler, "steps": s.steps, "cfg": s.cfg, "size": f"{width}x{height}",
            "model": str(job.model.name), "model_hash": model.hash,
            "loras": [{"file": lo["file"], "sha256": lo["sha256"], "scale": lo["scale"]} for lo in loras],
        }
        if hires:
            fields["hires"] = {k: hires[k] for k in ("stage1_size", "upscaler", "strength", "steps", "cfg")}
        if s.best_of.n > 1:
            fields["best_of"] = {"n": s.best_of.n, "candidate": render.chosen[n]}
        if render.coherence:
            fields["coherence"] = _png_coherence(render.coherence, n)
        if model.tiny:
            fields["tiny_model"] = TINY_NOTE
        out.append(fields)
    return out


def scene_records(scenes: list[Scene], render: StoryRender, images: list[Path]) -> list[SceneRecord]:
    out = []
    for n, scene in enumerate(scenes):
        rec = SceneRecord(**{**scene.as_dict(), "seed": render.seeds[n]}, scene_seed=scene.seed, image=images[n].name,
                          sha256=file_sha256(images[n]), score=render.scores[n] if render.scores else None)
        if render.candidates:
            rec.update(candidates=render.candidates[n], chosen_candidate=render.chosen[n])
        out.append(rec)
    return out


def build_manifest(job: GenerateConfig, *, scenes: list[Scene], render: StoryRender, model: ModelInfo,
                   loras: list[LoraRecord], scheduler, memory: dict, images: list[Path], panel: Path,
                   candidates_panel: Path | None, scores: dict | None, source: dict | None, overrides: list[str], reproduced: bool) -> Manifest:
    config = OmegaConf.to_container(OmegaConf.structured(job))
    return Manifest(
        format=MANIFEST_FORMAT,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        tiny_model=model.tiny,
        note=f"Made with the {TINY_NOTE}" if model.tiny else None,
        model={"name": job.model.name, "path": str(job.model.path), "path_resolved": str(model.path.resolve()),
               "vae_path": job.model.vae_path, "hash": model.hash, "dtype": str(job.model.dtype),
               "device": str(job.model.device)},
        loras=loras,
        scheduler=describe(scheduler),
        sampler=sampler_record(job, render, scheduler),
        hires=hires_record(job, render),
        best_of=best_of_record(job, render, reproduced),
        selection=render.selection,
        coherence=_coherence_record(render, memory),
        candidates_panel=candidates_panel.name if candidates_panel else None,
        memory=memory,
        story={"title": job.story.title, "language": job.story.language, "trigger": job.story.trigger},
        scenes=scene_records(scenes, render, images),
        images={p.name: file_sha256(p) for p in images},
        panel=panel.name,
        scores=scores,
        source=source,
        config=config,
        overrides=overrides,
        versions=versions(),
        seconds=round(render.seconds, 3),
    )
