"""The `generate.py` job: render a story with the configured model, LoRAs, sampler and memory
modes, then write the images, panel, prompts, scores and manifest (and a submission bundle).

    job = configs.to_settings(cfg, "generate")
    result = generate(job)
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kolors_story import tiny
from kolors_story.config import GenerateSettings
from kolors_story.evaluate.alignment import PromptAligner
from kolors_story.evaluate.scorer import AestheticScorer
from kolors_story.evaluate.summary import score_story
from kolors_story.files import publish_files
from kolors_story.generate.best_of import picker_for
from kolors_story.generate.checks import check_generate, wants_alignment, wants_scores
from kolors_story.generate.coherence import (
    StoryCoherence,
    coherence_on,
    prepare_pipeline,
)
from kolors_story.generate.comfyui import (
    API_FILE,
    UI_FILE,
    StoryWorkflow,
    check_comfyui,
    story_workflow,
    warn,
    write_workflow,
)
from kolors_story.generate.loras import LoraSpec, load_loras
from kolors_story.generate.manifest import ModelInfo, png_fields, recipe_manifest, with_files
from kolors_story.generate.memory import (
    after_prompt_encoding,
    apply_memory_modes,
    load_device,
    memory_modes,
    release_text_encoder,
)
from kolors_story.generate.outputs import (
    panel_title,
    png_metadata,
    save_story,
    write_prompts_csv,
)
from kolors_story.generate.panel import save_candidates_grid
from kolors_story.generate.render import StoryRender, generate_story
from kolors_story.generate.sampler import check_sampler
from kolors_story.generate.schedulers import build_scheduler
from kolors_story.models.loading import (
    ensure_model,
    load_pipeline,
    model_hash,
    resolve_layout,
    run_device,
    to_dtype,
)
from kolors_story.models.prompts import encode_scenes, text_pipeline
from kolors_story.records import (
    CANDIDATES_FILE,
    MANIFEST_FILE,
    PROMPTS_FILE,
    SCORES_FILE,
    Manifest,
    StoryScores,
    story_files,
)
from kolors_story.story import Scene, story_scenes


@dataclass
class GenerationResult:
    out_dir: Path
    manifest: Manifest
    images: list[Path]
    panel: Path
    render: StoryRender
    scenes: list[Scene]
    loras: list[LoraSpec]
    summary: StoryScores | None = None  # when scored
    bundle: Path | None = None
    workflow: StoryWorkflow | None = None  # the ComfyUI workflow (comfyui.enabled)


def _load(job: GenerateSettings, model_path: Path, loras: list[LoraSpec], text_encoder: bool = True):
    """The pipeline of ``model_path`` with the job's sampler, LoRAs and memory modes (``text_encoder=False``:
    without ChatGLM3, for prompts already encoded); its model identity and the memory record."""
    memory = memory_modes(job.memory)
    pipe = load_pipeline(model_path, vae_path=job.model.vae_path, dtype=job.model.dtype,
                         device=load_device(job.model.device, memory), text_encoder=text_encoder,
                         text_encoder_quant=job.model.text_encoder_quant, quantize_on=job.model.device)
    pipe.scheduler = build_scheduler(job.sampler.scheduler, pipe.scheduler.config, **job.sampler.scheduler_kwargs)
    load_loras(pipe, loras)  # before offload hooks wrap the UNet
    adapter: dict = {}

    def load_adapter(p) -> None:  # the IP-Adapter: after the attention mode, before offload hooks
        adapter["record"] = prepare_pipeline(p, job.coherence, p.unet.dtype, p.unet.device)

    memory_record = apply_memory_modes(pipe, memory, device=job.model.device, before_offload=load_adapter)
    if adapter.get("record") is not None:
        memory_record["ip_adapter"] = adapter["record"]
    info = ModelInfo(path=Path(model_path), hash=model_hash(model_path, job.model.vae_path),
                     note=tiny.note(job.model) or tiny.note(model_path))
    return pipe, info, memory_record


def encodes_alone(job: GenerateSettings) -> bool:
    """On a CPU with the text encoder released after encoding, ChatGLM3 encodes the prompts alone and
    the UNet and VAE load afterwards: the weights are never all in memory together. (On a GPU the
    memory plan decides, and counts them resident together while the prompts encode.)"""
    modes = memory_modes(job.memory)
    return modes.release_text_encoder and modes.offload == "none" and torch.device(job.model.device).type == "cpu"


def _encode_alone(job: GenerateSettings, model_path: Path, scenes: list[Scene]) -> tuple[dict[str, torch.Tensor], int]:
    """The scenes' embeddings from ChatGLM3 loaded on its own, and the bytes it held (released)."""
    layout = resolve_layout(model_path, job.model.vae_path)
    text = text_pipeline(layout, to_dtype(job.model.dtype), job.model.device, job.model.text_encoder_quant)
    embeds = encode_scenes(text, scenes, device=job.model.device)
    return embeds, release_text_encoder(text)


def _pipeline_and_embeddings(job: GenerateSettings, loras: list[LoraSpec], scenes: list[Scene]):
    """``_load``'s pipeline, identity and memory record, and the scenes' embeddings; the text encoder
    may go once they are encoded (on a CPU it encodes alone, before the rest loads)."""
    model_path = Path(ensure_model(job.model))
    if encodes_alone(job):
        embeds, released = _encode_alone(job, model_path, scenes)
        pipe, info, memory_record = _load(job, model_path, loras, text_encoder=False)
    else:
        pipe, info, memory_record = _load(job, model_path, loras)
        embeds = encode_scenes(pipe, scenes, device=run_device(pipe))
        released = after_prompt_encoding(pipe, job.memory)
    memory_record["text_encoder_released_bytes"] = released
    return pipe, info, memory_record, embeds


def _score(job: GenerateSettings, scorer: AestheticScorer, aligner: PromptAligner | None, render: StoryRender,
           scenes: list[Scene], model_note: str | None) -> StoryScores:
    summary = score_story(scorer, aligner, render.images, [s.prompt_en for s in scenes], job.scorer)
    render.scores = list(summary.scores)
    if model_note:
        summary.note = f"scored by a {model_note}" if tiny.note(job.scorer) else model_note
    return summary


def _write_outputs(job: GenerateSettings, folder: Path, scenes: list[Scene], render: StoryRender, info: ModelInfo,
                   loras: list[LoraSpec], summary: StoryScores | None,
                   workflow: StoryWorkflow | None) -> tuple[list[Path], Path, Path | None]:
    """Images with their PNG text (and the ComfyUI graph), panel, candidates grid (best-of), prompts.csv and
    scores.json into ``folder``."""
    records = [lo.as_record() for lo in loras]
    title = panel_title(job.story.title, job.model.name, info.note, records)
    graphs = (workflow.api, workflow.ui) if workflow else None
    pnginfo = [png_metadata(f, graphs) for f in png_fields(job, scenes, render, info, records)]
    written = save_story(render.images, scenes, folder, title=title, pnginfo=pnginfo)
    write_prompts_csv(folder / PROMPTS_FILE, scenes, render.seeds)
    images = [Path(p) for p in written["images"]]
    if summary is not None:
        summary.model_copy(update={"images": [p.name for p in images]}).write(folder / SCORES_FILE)
    grid = None
    if render.candidate_images:
        grid = save_candidates_grid(render.candidate_images, render.chosen, folder / CANDIDATES_FILE, render.candidates)
    return images, Path(written["panel"]), grid


def generate(job: GenerateSettings, *, out_dir: str | Path | None = None, loras: list[LoraSpec] | None = None,
             choices: list[int] | None = None, source: dict | None = None, overrides: list[str] | None = None,
             progress: bool = True) -> GenerationResult:
    """Render the story of ``job`` and write every output into ``out_dir`` (default ``job.output_dir``).

    ``loras``/``choices`` let a reproduction pass the recorded LoRA files and best-of picks. The
    outputs are staged in a hidden folder first and published together, manifest last: a failed
    run (disk full, Ctrl-C) leaves the previous story in ``out_dir`` whole.
    """
    # 1. What to render, checked before any model is loaded: settings, scenes, LoRA files, output.
    out_dir = Path(out_dir if out_dir is not None else job.output_dir)
    # A bundle carries the ComfyUI workflow: rendered as comfyui=true, its images hold the graph and
    # its recorded config says so, so reproduce= writes the same bytes again.
    comfyui = dataclasses.replace(job.comfyui, enabled=True) if job.submit.team else job.comfyui
    job = dataclasses.replace(job, output_dir=str(out_dir), sampler=check_sampler(job.sampler), comfyui=comfyui)
    if job.comfyui.enabled:
        check_comfyui(job.comfyui)
    loras = check_generate(job, out_dir, loras, reproducing=choices is not None)
    scenes = story_scenes(job.story, job.sampler)
    picking = job.sampler.best_of.n > 1 and choices is None
    scorer = AestheticScorer.from_settings(job.scorer) if (wants_scores(job) or picking) else None
    aligner = PromptAligner.from_settings(job.scorer) if wants_alignment(job, reproducing=choices is not None) else None
    picker = picker_for(job.sampler.best_of, scorer, aligner, [s.prompt_en for s in scenes], job.scorer) if picking else None
    # 2-3. The pipeline, with sampler, LoRAs and memory modes; the prompts, encoded once.
    pipe, info, memory_record, embeds = _pipeline_and_embeddings(job, loras, scenes)
    # 4. The images (best-of: chosen per scene or as a story, or the recorded picks), coherent when asked.
    coherence = StoryCoherence(pipe, scenes, job.coherence) if coherence_on(job.coherence) else None
    try:
        render = generate_story(pipe, scenes, embeds, job.sampler, picker=picker, choices=choices, progress=progress,
                                coherence=coherence)
    finally:
        if coherence is not None:
            coherence.close()
    render.coherence = coherence.record() if coherence is not None else None
    memory_record["oom_retries"] = render.retries  # batches rendered in halves after running out of memory
    summary = _score(job, scorer, aligner, render, scenes, info.note) if wants_scores(job) else None
    # 5. Files, staged in a hidden folder of out_dir, then published as one unit with the manifest last.
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".story-", dir=out_dir) as tmp:
        staging = Path(tmp)
        recipe = recipe_manifest(job, scenes=scenes, render=render, model=info, loras=[lo.as_record() for lo in loras],
                                 scheduler=pipe.scheduler, memory=memory_record, scores=summary, source=source,
                                 overrides=overrides or [], reproduced=choices is not None)
        workflow = story_workflow(recipe, job.comfyui) if job.comfyui.enabled else None
        if workflow is not None:  # before the images: they carry it in their text
            write_workflow(staging, workflow)
            warn(workflow)
        images, panel, grid = _write_outputs(job, staging, scenes, render, info, loras, summary, workflow)
        manifest = with_files(recipe, images, panel, grid)
        manifest.write(staging / MANIFEST_FILE)
        stale = [out_dir / name for name in (API_FILE, UI_FILE) if (out_dir / name).is_file()]  # not outliving its story
        publish_files(staging, out_dir, last=MANIFEST_FILE, replace=[*story_files(out_dir), *stale])
    return GenerationResult(out_dir=out_dir, manifest=manifest, images=[out_dir / p.name for p in images],
                            panel=out_dir / panel.name, render=render, scenes=scenes, loras=loras, summary=summary,
                            workflow=workflow)


def report(result: GenerationResult) -> None:
    """What the user reads at the end of `generate.py`."""
    files = f"{result.panel.name}, prompts.csv, " + (f"{API_FILE}, {UI_FILE}, " if result.workflow else "")
    line = f"Wrote {len(result.images)} images, {files}manifest.json to {result.out_dir}"
    if result.manifest.tiny_model:
        line += f" ({tiny.NOTE})"
    print(line)
    if result.summary:
        print(f"Aesthetic mean {result.summary.mean:.3f} min {result.summary.min:.3f} "
              f"({'pass' if result.summary.passed else 'FAIL'})")


def render_story(job: GenerateSettings, *, source=None, overrides: list[str] | None = None) -> GenerationResult:
    """The `generate.py` job without reproduce: render, bundle when ``submit.team`` is set, report."""
    result = generate(job, source=source.as_dict() if source else None, overrides=overrides)
    if job.submit.team:
        from kolors_story.generate.submission import write_bundle

        result.bundle = write_bundle(result, job, root=job.submit.dir or result.out_dir, source=source)
        print(f"Submission bundle: {result.bundle}")
    report(result)
    return result

