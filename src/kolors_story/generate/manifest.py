"""How a story was made, written down: the PNG text of each image and ``manifest.json`` (enough to
regenerate every image: resolved config, model hash, LoRA sha256s, sampler, seeds, best-of picks,
versions and thread count). ``records.Manifest`` is its shape."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from kolors_story.config import GenerateSettings, plain
from kolors_story.files import file_sha256
from kolors_story.generate.render import StoryRender
from kolors_story.generate.schedulers import describe
from kolors_story.records import (
    MANIFEST_FORMAT,
    AdapterRecord,
    CandidateRecord,
    CoherenceRecord,
    LoraRecord,
    Manifest,
    ModelRecord,
    SceneRecord,
    StoryRecord,
    StoryScores,
)
from kolors_story.story import Scene


@dataclass
class ModelInfo:
    """The model a story was rendered with."""

    path: Path  # the folder actually loaded
    hash: str  # models.loading.model_hash
    note: str | None = None  # a stand-in model's note about itself (model=tiny); None for real weights


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


def sampler_record(job: GenerateSettings, render: StoryRender, scheduler) -> dict:
    s = job.sampler
    return {"scheduler": s.scheduler, "scheduler_class": describe(scheduler)["class"], "steps": s.steps,
            "cfg": s.cfg, "stage1_size": [s.height, s.width], "size": list(render.size), "batch_size": s.batch_size}


def hires_record(job: GenerateSettings, render: StoryRender) -> dict | None:
    s, h = job.sampler, job.sampler.hires
    if not h.enabled:
        return None
    return {"enabled": True, "stage1_size": [s.height, s.width], "final_size": list(render.size),
            "upscaler": h.upscaler, "scale": h.scale, "strength": h.strength, "steps": h.steps,
            "refine_steps_run": int(h.steps * h.strength), "cfg": s.cfg if h.cfg is None else h.cfg,
            "pipeline": "KolorsImg2ImgPipeline (same components)"}


SELECTED_BY = {"scene": "aesthetic score", "story": "story objective"}


def best_of_record(job: GenerateSettings, render: StoryRender, reproduced: bool) -> dict | None:
    b = job.sampler.best_of
    if b.n <= 1:
        return None
    return {"n": b.n, "seed_stride": b.seed_stride,
            "selected_by": "recorded choice (reproduction)" if reproduced else SELECTED_BY[b.select],
            "chosen": render.chosen}


def _coherence_record(render: StoryRender, memory: dict) -> CoherenceRecord | None:
    """What coherence did, with the adapter's identity (its weight file's sha256) when one was loaded."""
    if render.coherence is None:
        return None
    out = CoherenceRecord.from_json(render.coherence, source="the coherence record")
    if out.reference is not None and "ip_adapter" in memory:
        out.reference.adapter = AdapterRecord.from_json(memory["ip_adapter"], source="the IP-Adapter record")
    return out


def _png_coherence(record: CoherenceRecord, n: int) -> dict:
    """This image's part of the coherence record: which scenes it read, which image conditioned it."""
    out = {}
    if record.sharing:
        out["shared_from_scenes"] = record.sharing.references
    if record.reference:
        ref = record.reference
        out["reference"] = {"scale": ref.scales[n], "scene": ref.scene,
                            "image_sha256": ref.image.sha256 if ref.image else None}
    return out


def png_fields(job: GenerateSettings, scenes: list[Scene], render: StoryRender, model: ModelInfo,
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
            "loras": [{"file": lo.file, "sha256": lo.sha256, "scale": lo.scale} for lo in loras],
        }
        if hires:
            fields["hires"] = {k: hires[k] for k in ("stage1_size", "upscaler", "strength", "steps", "cfg")}
        if s.best_of.n > 1:
            fields["best_of"] = {"n": s.best_of.n, "candidate": render.chosen[n]}
        if render.coherence:
            fields["coherence"] = _png_coherence(CoherenceRecord.from_json(render.coherence), n)
        if model.note:
            fields["tiny_model"] = model.note
        out.append(fields)
    return out


def scene_records(scenes: list[Scene], render: StoryRender) -> list[SceneRecord]:
    """Each scene as rendered, its image named as ``save_story`` names it (hashed by :func:`with_files`)."""
    out = []
    for n, scene in enumerate(scenes):
        rec = SceneRecord(**{**scene.as_dict(), "seed": render.seeds[n]}, scene_seed=scene.seed,
                          image=f"{scene.index}.png", score=render.scores[n] if render.scores else None)
        if render.candidates:
            rec.candidates = [CandidateRecord.from_json(c) for c in render.candidates[n]]
            rec.chosen_candidate = render.chosen[n]
        out.append(rec)
    return out


def story_record(story) -> StoryRecord:
    """The story's title, language and trigger, and the story file it came from (with its sha256
    while the file is there: a reproduction renders the scenes the config recorded, file or not)."""
    path = Path(story.file).expanduser() if story.file else None
    return StoryRecord(title=story.title, language=story.language, trigger=story.trigger,
                       file=str(story.file) if story.file else None,
                       file_sha256=file_sha256(path) if path is not None and path.is_file() else None)


def recipe_manifest(job: GenerateSettings, *, scenes: list[Scene], render: StoryRender, model: ModelInfo,
                    loras: list[LoraRecord], scheduler, memory: dict, scores: StoryScores | None, source: dict | None,
                    overrides: list[str], reproduced: bool) -> Manifest:
    """The manifest before its files exist: how every image was made (what a ComfyUI workflow is built
    from, so the images can carry it); :func:`with_files` adds the files and their sha256s."""
    config = plain(job)
    return Manifest(
        format=MANIFEST_FORMAT,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        tiny_model=model.note is not None,
        note=f"Made with the {model.note}" if model.note else None,
        model=ModelRecord(name=job.model.name, path=str(job.model.path), path_resolved=str(model.path.resolve()),
                          vae_path=job.model.vae_path, hash=model.hash, dtype=str(job.model.dtype),
                          device=str(job.model.device), text_encoder_quant=job.model.text_encoder_quant),
        loras=loras,
        scheduler=describe(scheduler),
        sampler=sampler_record(job, render, scheduler),
        hires=hires_record(job, render),
        best_of=best_of_record(job, render, reproduced),
        selection=render.selection,
        coherence=_coherence_record(render, memory),
        memory=memory,
        story=story_record(job.story),
        scenes=scene_records(scenes, render),
        scores=scores,
        source=source,
        config=config,
        overrides=overrides,
        versions=versions(),
        seconds=round(render.seconds, 3),
    )


def with_files(manifest: Manifest, images: list[Path], panel: Path, candidates_panel: Path | None) -> Manifest:
    """``manifest`` with the written images (sha256 per scene and in the table), panel and candidates grid."""
    out = manifest.model_copy(deep=True)
    for rec, path in zip(out.scenes, images):
        rec.image, rec.sha256 = path.name, file_sha256(path)
    out.candidates_panel = candidates_panel.name if candidates_panel else None
    out.images = {p.name: file_sha256(p) for p in images}
    out.panel = panel.name
    return out


def build_manifest(job: GenerateSettings, *, scenes: list[Scene], render: StoryRender, model: ModelInfo,
                   loras: list[LoraRecord], scheduler, memory: dict, images: list[Path], panel: Path,
                   candidates_panel: Path | None, scores: StoryScores | None, source: dict | None, overrides: list[str],
                   reproduced: bool) -> Manifest:
    """The manifest of a written story in one call (:func:`recipe_manifest` + :func:`with_files`)."""
    recipe = recipe_manifest(job, scenes=scenes, render=render, model=model, loras=loras, scheduler=scheduler,
                             memory=memory, scores=scores, source=source, overrides=overrides, reproduced=reproduced)
    return with_files(recipe, images, panel, candidates_panel)
