"""Is this story renderable? Every setting and input file checked before any model is loaded
(with real Kolors, before the 12.5 GB text encoder): bad values name their key, a bad LoRA file is
refused from its own contents, and an output folder already holding a story is not overwritten
unless ``overwrite=true``."""

from __future__ import annotations

from pathlib import Path

from kolors_story import tiny
from kolors_story.config import GenerateSettings
from kolors_story.errors import OutputExistsError
from kolors_story.evaluate.alignment import check_clip_folder
from kolors_story.evaluate.scorer import check_scorer_folder
from kolors_story.generate.best_of import check_select
from kolors_story.generate.coherence import check_coherence
from kolors_story.generate.loras import LoraSpec, lora_specs
from kolors_story.generate.memory import memory_modes
from kolors_story.generate.sampler import (
    check_sampler,
    check_size_for,
    warn_if_guidance_off,
)
from kolors_story.generate.submission import bundle_name
from kolors_story.lora.keys import arch_index, check_shapes
from kolors_story.lora.reader import read_lora
from kolors_story.models.loading import ensure_model, model_configs, resolve_layout
from kolors_story.models.prompts import check_prompt_tokens
from kolors_story.models.quantization import check_text_encoder_quant
from kolors_story.records import story_files
from kolors_story.story import story_scenes


def wants_scores(job: GenerateSettings) -> bool:
    return job.score or bool(job.submit.team and job.submit.score)


def wants_alignment(job: GenerateSettings, reproducing: bool = False) -> bool:
    """CLIP-T is computed when the story is scored, or when best-of chooses the 8 panels together."""
    choosing_story = job.sampler.best_of.n > 1 and job.sampler.best_of.select == "story" and not reproducing
    return bool(job.scorer.alignment) and (wants_scores(job) or choosing_story)


def check_output(job: GenerateSettings, out_dir: Path) -> None:
    """Refuse to replace an earlier story (or bundle) unless the user said so."""
    existing = story_files(out_dir)
    if existing and not job.overwrite:
        raise OutputExistsError(
            f"output_dir={out_dir} already holds a story ({', '.join(p.name for p in existing[:4])}"
            f"{' ...' if len(existing) > 4 else ''}); set overwrite=true to replace it, or choose another output_dir")
    if job.submit.team:
        bundle = Path(job.submit.dir or out_dir) / bundle_name(str(job.submit.team), job.story.title)
        if bundle.exists() and not job.submit.overwrite:
            raise OutputExistsError(f"{bundle} already exists; set submit.overwrite=true to replace it, "
                                    "or submit.dir=<folder>")


def check_generate(job: GenerateSettings, out_dir: Path, loras: list[LoraSpec] | None = None,
                   reproducing: bool = False) -> list[LoraSpec]:
    """All of a generation's settings and inputs, checked without loading weights; returns the
    LoRA files to stack (each already read and fitted to this model's UNet). A reproduction picks
    its best-of candidates from the record, so it needs no scorer."""
    check_sampler(job.sampler)
    check_select(job.sampler.best_of)
    memory_modes(job.memory)
    check_text_encoder_quant(job.model.text_encoder_quant, job.model.device, job.memory.offload)
    check_coherence(job.coherence, story_scenes(job.story, job.sampler))
    configs = model_configs(job.model)  # the model folder is complete (a stand-in is built)
    check_prompt_tokens(resolve_layout(ensure_model(job.model), job.model.vae_path), story_scenes(job.story, job.sampler))
    check_size_for(configs["unet"], configs["vae"], job.sampler)
    warn_if_guidance_off(job.sampler)
    specs = lora_specs(job) if loras is None else loras
    index = arch_index(configs["unet"])
    for spec in specs:  # the file's own contents: format, rank/alpha, every key lands on this UNet
        check_shapes(read_lora(spec.path, unet_config=configs["unet"]).state_dict, index, str(spec.path))
    if (wants_scores(job) or (job.sampler.best_of.n > 1 and not reproducing)) and not tiny.provides(job.scorer):
        check_scorer_folder(job.scorer.path)
    if wants_alignment(job, reproducing) and not tiny.provides(job.scorer):
        check_clip_folder(job.scorer.clip_path)
    check_output(job, out_dir)
    return specs
