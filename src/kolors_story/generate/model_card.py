"""The bundle's ``README.md``: what the organisers and other users read about a submitted LoRA
(style, trigger words, base model, files with rank/alpha, training config, scores, the story and
how to use it, in ComfyUI too), built from the manifest and the LoRA files' own metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from kolors_story.generate.comfyui import API_FILE, UI_FILE, StoryWorkflow, comfyui_sampler, model_files
from kolors_story.records import CharacterMade, Manifest, RecordError, StoryScores


@dataclass
class LoraDetails:
    """What a bundled LoRA file says about itself (read back by ``lora.read_lora``)."""

    rank: int | None = None
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=list)
    format: str | None = None
    type: str = "lora"
    skipped: dict = field(default_factory=dict)  # format -> why that file was not written
    metadata: dict = field(default_factory=dict)  # the LoRA's own metadata (style, training config, ...)
    error: str | None = None  # the file could not be read


@dataclass
class BundleFile:
    """One LoRA file in the bundle: a LoRA itself (with its scale and details) or a sibling format."""

    file: str
    format: str
    sha256: str
    scale: float | None = None
    details: LoraDetails | None = None


def _blank(value) -> str:
    return "" if value is None else str(value)


def _md(text) -> str:
    return str(text if text is not None else "").replace("|", "\\|").replace("\n", " ")


def _header(name: str, manifest: Manifest, details: list[LoraDetails], style: str | None) -> list[str]:
    story, model = manifest.story, manifest.model
    trigger = (story.trigger or "").strip()
    style = style or next((d.metadata["style"] for d in details if d.metadata.get("style")), None)
    lines = [f"# {name}", ""]
    if manifest.tiny_model:
        lines += ["> **Made with the tiny model: not a real result.** This bundle exercises the pipeline",
                  "> end to end on a tiny Kolors-architecture model (random, or pre-trained on simple drawn",
                  "> scenes); its 64x64 images and its LoRA are not a usable style.", ""]
    return lines + [
        f"A Kolors style LoRA and the 8-image story **{story.title}** rendered with it "
        "(Kolors-LoRA Style Story Challenge).",
        "", "## Style", "",
        f"- Style: {style or 'see the story prompts below'}",
        f"- Trigger words: {('`' + trigger + '`') if trigger else 'none (the prompts carry the style)'}",
        f"- Prompt language: {story.language}",
        "", "## Base model", "",
        f"- Kolors (Kwai-Kolors/Kolors), loaded from `{model.path}` ({model.name}, hash `{model.hash}`, {model.dtype})",
        f"- VAE: {('`' + str(model.vae_path) + '`') if model.vae_path else 'the release vae/'}",
    ]


def _lora_section(lora_rows: list[BundleFile], details: list[LoraDetails], training_yaml: str | None,
                  training_from: str | None) -> list[str]:
    lines = ["", "## LoRA files", "", "| file | format | rank | alpha | scale | sha256 |", "|---|---|---|---|---|---|"]
    for row in lora_rows:
        d = row.details or LoraDetails()
        lines.append(f"| `{row.file}` | {row.format} | {_blank(d.rank)} | {_blank(d.alpha)} | {_blank(row.scale)} | "
                     f"`{row.sha256[:16]}...` |")
    if not lora_rows:
        lines.append("| (none: rendered with the base model only) | | | | | |")
    targets = sorted({t for d in details for t in d.target_modules})
    if targets:
        lines += ["", f"Target modules: {', '.join(f'`{t}`' for t in targets)}. Rank and alpha are stored in every file."]
    kinds = sorted({d.type for d in details})
    if kinds != ["lora"]:
        lines += ["", f"Adapter type: {', '.join(kinds)} (`lora.type`)."]
    for fmt, why in sorted({(f, w) for d in details for f, w in d.skipped.items()}):
        lines += ["", f"No {fmt} file: {why}."]
    lines += ["", "## Training config", ""]
    if training_yaml:
        lines += [f"From {training_from}:", "", "```yaml", training_yaml.rstrip(), "```"]
    else:
        lines += ["Not recorded in the LoRA file."]
    return lines


def _character_section(lora_rows: list[BundleFile]) -> list[str]:
    """How a character LoRA (``character=auto``) was made, from its own metadata."""
    lines = []
    for row in lora_rows:
        raw = (row.details.metadata if row.details else {}).get("character")
        if raw is None:
            continue
        try:
            made = CharacterMade.from_json(json.loads(raw) if isinstance(raw, str) else raw, source=f"{row.file} metadata")
        except (RecordError, json.JSONDecodeError) as exc:  # another tool's key of that name: say so, do not guess
            lines += ["", "## Character LoRA", "", f"`{row.file}`: its `character` metadata is unreadable ({exc})."]
            continue
        lines += ["", "## Character LoRA", "",
                  f"`{row.file}` (scale {row.scale}) is an entity LoRA of **{_md(made.prompt)}**, made "
                  "automatically before the style LoRA (`character=auto`) after The Chosen One (Avrahami et al., "
                  f"SIGGRAPH 2024): in each round the model (from round 2 with the previous round's LoRA) rendered "
                  f"{made.candidates} images of the character from the phrasings below, their CLIP embeddings "
                  f"were clustered, and a rank-{made.rank} LoRA was trained for {made.steps} steps "
                  f"(lr {made.lr}) on " + (f"the tightest cluster of at least {made.min_cluster} renders." if
                                           made.cluster == "tightest" else "as many renders picked at random: "
                                           "a control run (`character.cluster=random`), not for a submission."), "",
                  "| round | renders | chosen | cluster similarity | all renders' similarity | trained |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r.round} | {r.candidates} | {r.cluster_size} | {r.cluster_similarity:.4f} | "
                  f"{r.candidates_similarity:.4f} | {'yes' if r.trained else 'no'} |" for r in made.rounds]
        lines += ["", "Phrasings: " + "; ".join(f"`{_md(p)}`" for p in made.phrasings)]
    return lines


def _scores_section(scores: StoryScores | None) -> list[str]:
    lines = ["", "## Aesthetic scores", ""]
    if not scores:
        return lines + ["Not computed for this bundle (`python evaluate.py images=<this folder>` scores it)."]
    lines += ["| image | score |", "|---|---|"]
    lines += [f"| {n}.png | {s:.4f} |" for n, s in enumerate(scores.scores, 1)]
    lines += ["", f"Mean **{scores.mean:.4f}**, min {scores.min:.4f}, threshold {scores.threshold:g}: "
              f"**{'pass' if scores.passed else 'FAIL'}**."]
    if scores.coherence is not None:
        lines.append(f"Story coherence (mean pairwise CLIP cosine) {scores.coherence:.4f}; "
                     f"most out-of-style scene: {scores.outlier}.")
    if scores.clip_t is not None:
        lines.append(f"Prompt alignment (CLIP-T, mean cosine of each image with its English prompt) {scores.clip_t:.4f}.")
    if scores.story_objective is not None:
        lines.append(f"Copy-paste: {len(scores.duplicate_pairs)} near-duplicate pair(s) "
                     f"(share {scores.copy_paste:.2f}); story objective {scores.story_objective:.4f}.")
    if scores.note:
        lines.append(f"Note: {scores.note}.")
    return lines


def _story_section(manifest: Manifest) -> list[str]:
    lines = ["", "## Story", "", "![story panel](panel.png)", "",
             "| scene | description | prompt | negative prompt | seed |", "|---|---|---|---|---|"]
    for s in manifest.scenes:
        lines.append(f"| {s.index} | {_md(s.description)} | {_md(s.prompt)} | {_md(s.negative)} | {s.seed} |")
    sampler = manifest.sampler
    gen = [f"sampler `{sampler.scheduler}` ({sampler.scheduler_class})", f"{sampler.steps} steps",
           f"cfg {sampler.cfg}", f"{sampler.size[1]}x{sampler.size[0]}"]
    if manifest.hires:
        h = manifest.hires
        gen.append(f"two-stage hires from {h.stage1_size[1]}x{h.stage1_size[0]} ({h.upscaler} upscale, "
                   f"img2img strength {h.strength}, {h.steps} steps)")
    if manifest.best_of:
        by = manifest.best_of.selected_by
        how = "the 8 chosen together by the story objective" if by == "story objective" else f"per scene by {by}"
        gen.append(f"best of {manifest.best_of.n} seeds per scene, {how}")
    return lines + ["", "## Generation settings", "", "- " + ", ".join(gen), *_coherence_lines(manifest),
                    "- Full resolved config: `config.yaml`; per-image settings are also in each PNG's text chunks."]


def _coherence_lines(manifest: Manifest) -> list[str]:
    """How the characters were kept consistent (generate.coherence), if they were."""
    c = manifest.coherence
    lines = []
    if c and c.sharing:
        sh = c.sharing
        lines.append(f"- Consistent self-attention: scenes attend to the tokens of scene(s) {sh.references} "
                     f"(strength {sh.strength}, blocks {', '.join(sh.blocks)}, denoising {sh.window[0]:g}-"
                     f"{sh.window[1]:g}, {sh.token_ratio:g} of the tokens)")
    if c and c.reference:
        ref, image = c.reference, c.reference.image
        source = (f"the reference image `{image.bundle_file or image.name}` (sha256 {image.sha256[:12]}...)"
                  if image else f"scene {ref.scene}'s image, rendered first")
        lines.append(f"- Kolors-IP-Adapter-Plus conditioned the scenes on {source}, strength per scene {ref.scales}")
    return lines


def generate_command(lora_rows: list[BundleFile]) -> str:
    """The `generate.py` line that renders with this bundle's LoRA file(s) at their scales."""
    used = [r for r in lora_rows if r.scale is not None]
    args = []
    if used:
        args.append(f"lora_path={used[0].file} lora_scale={used[0].scale}")
    if len(used) > 1:
        extra = ", ".join(f"{{path: {r.file}, scale: {r.scale}}}" for r in used[1:])
        args.append(f"'loras=[{extra}]'")
    return " ".join(["python generate.py story=<story>", *args])


def _use_section(lora_rows: list[BundleFile], details: list[LoraDetails], comfyui: bool) -> list[str]:
    lines = [
        "", "## Use", "",
        "With this repository (rank/alpha are read from the file):", "", "```bash",
        generate_command(lora_rows),
        "python generate.py reproduce=.   # regenerate the 8 images here and check them pixel by pixel",
        "```", "",
    ]
    diffusers_file = next((r.file for r in lora_rows if not r.file.endswith(("_kohya.safetensors", ".ckpt"))
                           and (r.details or LoraDetails()).type in ("lora", "dora")), None)
    if diffusers_file or not lora_rows:
        lines += [
            "With diffusers:", "", "```python",
            "from diffusers import KolorsPipeline",
            "pipe = KolorsPipeline.from_pretrained('Kwai-Kolors/Kolors-diffusers', variant='fp16').to('cuda')",
            f"pipe.load_lora_weights('.', weight_name='{diffusers_file or 'lora.safetensors'}')",
            "```", "",
        ]
    kohya = next((r.file for r in lora_rows if r.file.endswith("_kohya.safetensors")), None)
    if kohya and comfyui:
        lines += ["With ComfyUI: `workflow.json` (section ComfyUI below) loads the kohya file(s) from `models/loras/` "
                  "with the core `LoraLoaderModelOnly` node.", ""]
    elif kohya:
        lines += [f"With ComfyUI: copy `{kohya}` to `models/loras/` and apply it with the core `LoraLoaderModelOnly` "
                  "node to the Kolors model loaded by the ComfyUI-Kolors-MZ nodes.", ""]
    if any(r.file.endswith("lora_diffsynth.ckpt") for r in lora_rows):
        d0 = details[0] if details else LoraDetails()
        lines += ["With DiffSynth-Studio (the competition's `load_lora`): "
                  f"`load_lora(pipe.unet, lora_rank={d0.rank or 16}, lora_alpha={d0.alpha or 4.0}, "
                  "lora_path='lora_diffsynth.ckpt')`.", ""]
    return lines


def _comfyui_section(manifest: Manifest, workflow: StoryWorkflow, lora_rows: list[BundleFile]) -> list[str]:
    """How to open the story in ComfyUI: the files it loads and where they go, the sampler, the notes."""
    bundled = {r.file for r in lora_rows}
    lines = ["## ComfyUI", "",
             f"`{UI_FILE}` opens the whole story in ComfyUI (Load, or drag any of the PNGs in: each carries the "
             f"graph); `{API_FILE}` is the same graph in ComfyUI's API format. It needs the ComfyUI-Kolors-MZ nodes "
             "and these files under `ComfyUI/`:", "", "| node | file | folder |", "|---|---|---|"]
    for title, file, folder in model_files(workflow):
        here = " (in this bundle)" if file in bundled else ""
        lines.append(f"| {_md(title)} | `{file}`{here} | `{folder}` |")
    sampler_name, scheduler, _ = comfyui_sampler(manifest.sampler.scheduler)
    lines += ["", "The UNet and the VAE are the files `python -m kolors_story.download` fetches "
              "(`models/kolors/Kolors/unet/`, `models/sdxl-vae-fp16-fix/`); ChatGLM3 has to be one safetensors file "
              "(`Kijai/ChatGLM3-safetensors`, as ComfyUI-Kolors-MZ's README says).",
              "", f"Sampler `{manifest.sampler.scheduler}` -> KSampler `{sampler_name}` / `{scheduler}`.", ""]
    return lines + [f"- {note}" for note in workflow.notes] + [""]


def model_card(name: str, manifest: Manifest, lora_rows: list[BundleFile], details: list[LoraDetails],
               scores: StoryScores | None,
               training_yaml: str | None, training_from: str | None, style: str | None = None,
               workflow: StoryWorkflow | None = None) -> str:
    """The model card's markdown; ``style`` (story.style) wins over a style in the LoRA metadata;
    ``workflow``: the bundle's ComfyUI workflow."""
    return "\n".join([
        *_header(name, manifest, details, style),
        *_lora_section(lora_rows, details, training_yaml, training_from),
        *_character_section(lora_rows),
        *_scores_section(scores),
        *_story_section(manifest),
        *_use_section(lora_rows, details, workflow is not None),
        *(_comfyui_section(manifest, workflow, lora_rows) if workflow else []),
    ])
