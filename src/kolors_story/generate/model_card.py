"""The bundle's ``README.md``: what the organisers and other users read about a submitted LoRA
(style, trigger words, base model, files with rank/alpha, training config, scores, the story and
how to use it), built from the manifest and the LoRA files' own metadata."""

from __future__ import annotations

from kolors_story.records import Manifest, StoryScores


def _md(text) -> str:
    return str(text if text is not None else "").replace("|", "\\|").replace("\n", " ")


def _header(name: str, manifest: Manifest, details: list[dict], style: str | None) -> list[str]:
    story, model = manifest["story"], manifest["model"]
    trigger = (story.get("trigger") or "").strip()
    style = style or next((d.get("metadata", {}).get("style") for d in details if d.get("metadata", {}).get("style")),
                          None)
    lines = [f"# {name}", ""]
    if manifest.get("tiny_model"):
        lines += ["> **Made with the tiny model: not a real result.** This bundle exercises the pipeline",
                  "> end to end on a tiny Kolors-architecture model (random, or pre-trained on simple drawn",
                  "> scenes); its 64x64 images and its LoRA are not a usable style.", ""]
    return lines + [
        f"A Kolors style LoRA and the 8-image story **{story.get('title')}** rendered with it "
        "(Kolors-LoRA Style Story Challenge).",
        "", "## Style", "",
        f"- Style: {style or 'see the story prompts below'}",
        f"- Trigger words: {('`' + trigger + '`') if trigger else 'none (the prompts carry the style)'}",
        f"- Prompt language: {story.get('language')}",
        "", "## Base model", "",
        f"- Kolors (Kwai-Kolors/Kolors), loaded from `{model['path']}` ({model['name']}, hash `{model['hash']}`, "
        f"{model['dtype']})",
        f"- VAE: {('`' + str(model['vae_path']) + '`') if model.get('vae_path') else 'the release vae/'}",
    ]


def _lora_section(lora_rows: list[dict], details: list[dict], training_yaml: str | None,
                  training_from: str | None) -> list[str]:
    lines = ["", "## LoRA files", "", "| file | format | rank | alpha | scale | sha256 |", "|---|---|---|---|---|---|"]
    for row in lora_rows:
        d = row.get("details") or {}
        lines.append(f"| `{row['file']}` | {row['format']} | {d.get('rank', '')} | {d.get('alpha', '')} | "
                     f"{row.get('scale', '')} | `{row['sha256'][:16]}...` |")
    if not lora_rows:
        lines.append("| (none: rendered with the base model only) | | | | | |")
    targets = sorted({t for d in details for t in d.get("target_modules", [])})
    if targets:
        lines += ["", f"Target modules: {', '.join(f'`{t}`' for t in targets)}. Rank and alpha are stored in every file."]
    kinds = sorted({d.get("type", "lora") for d in details})
    if kinds != ["lora"]:
        lines += ["", f"Adapter type: {', '.join(kinds)} (`lora.type`)."]
    for fmt, why in sorted({(f, w) for d in details for f, w in (d.get("skipped") or {}).items()}):
        lines += ["", f"No {fmt} file: {why}."]
    lines += ["", "## Training config", ""]
    if training_yaml:
        lines += [f"From {training_from}:", "", "```yaml", training_yaml.rstrip(), "```"]
    else:
        lines += ["Not recorded in the LoRA file."]
    return lines


def _scores_section(scores: StoryScores | None) -> list[str]:
    lines = ["", "## Aesthetic scores", ""]
    if not scores:
        return lines + ["Not computed for this bundle (`python evaluate.py images=<this folder>` scores it)."]
    lines += ["| image | score |", "|---|---|"]
    lines += [f"| {n}.png | {s:.4f} |" for n, s in enumerate(scores["scores"], 1)]
    lines += ["", f"Mean **{scores['mean']:.4f}**, min {scores['min']:.4f}, threshold {scores['threshold']:g}: "
              f"**{'pass' if scores['passed'] else 'FAIL'}**."]
    if scores.get("coherence") is not None:
        lines.append(f"Story coherence (mean pairwise CLIP cosine) {scores['coherence']:.4f}; "
                     f"most out-of-style scene: {scores.get('outlier')}.")
    if scores.get("clip_t") is not None:
        lines.append(f"Prompt alignment (CLIP-T, mean cosine of each image with its English prompt) {scores['clip_t']:.4f}.")
    if scores.get("story_objective") is not None:
        lines.append(f"Copy-paste: {len(scores.get('duplicate_pairs') or [])} near-duplicate pair(s) "
                     f"(share {scores['copy_paste']:.2f}); story objective {scores['story_objective']:.4f}.")
    if scores.get("note"):
        lines.append(f"Note: {scores['note']}.")
    return lines


def _story_section(manifest: Manifest) -> list[str]:
    lines = ["", "## Story", "", "![story panel](panel.png)", "",
             "| scene | description | prompt | negative prompt | seed |", "|---|---|---|---|---|"]
    for s in manifest["scenes"]:
        lines.append(f"| {s['index']} | {_md(s['description'])} | {_md(s['prompt'])} | {_md(s['negative'])} | {s['seed']} |")
    sampler = manifest["sampler"]
    gen = [f"sampler `{sampler['scheduler']}` ({sampler['scheduler_class']})", f"{sampler['steps']} steps",
           f"cfg {sampler['cfg']}", f"{sampler['size'][1]}x{sampler['size'][0]}"]
    if manifest.get("hires"):
        h = manifest["hires"]
        gen.append(f"two-stage hires from {h['stage1_size'][1]}x{h['stage1_size'][0]} ({h['upscaler']} upscale, "
                   f"img2img strength {h['strength']}, {h['steps']} steps)")
    if manifest.get("best_of"):
        by = manifest["best_of"].get("selected_by", "aesthetic score")
        how = "the 8 chosen together by the story objective" if by == "story objective" else f"per scene by {by}"
        gen.append(f"best of {manifest['best_of']['n']} seeds per scene, {how}")
    return lines + ["", "## Generation settings", "", "- " + ", ".join(gen), *_coherence_lines(manifest),
                    "- Full resolved config: `config.yaml`; per-image settings are also in each PNG's text chunks."]


def _coherence_lines(manifest: Manifest) -> list[str]:
    """How the characters were kept consistent (generate.coherence), if they were."""
    c = manifest.get("coherence") or {}
    lines = []
    if c.get("sharing"):
        sh = c["sharing"]
        lines.append(f"- Consistent self-attention: scenes attend to the tokens of scene(s) {sh['references']} "
                     f"(strength {sh['strength']}, blocks {', '.join(sh['blocks'])}, denoising {sh['window'][0]:g}-"
                     f"{sh['window'][1]:g}, {sh['token_ratio']:g} of the tokens)")
    if c.get("reference"):
        ref = c["reference"]
        image = ref.get("image") or {}
        source = (f"the reference image `{image.get('bundle_file', image.get('name'))}` (sha256 {image.get('sha256', '')[:12]}...)"
                  if ref.get("image") else f"scene {ref['scene']}'s image, rendered first")
        lines.append(f"- Kolors-IP-Adapter-Plus conditioned the scenes on {source}, strength per scene {ref['scales']}")
    return lines


def generate_command(lora_rows: list[dict]) -> str:
    """The `generate.py` line that renders with this bundle's LoRA file(s) at their scales."""
    used = [r for r in lora_rows if r.get("scale") is not None]
    args = []
    if used:
        args.append(f"lora_path={used[0]['file']} lora_scale={used[0]['scale']}")
    if len(used) > 1:
        extra = ", ".join(f"{{path: {r['file']}, scale: {r['scale']}}}" for r in used[1:])
        args.append(f"'loras=[{extra}]'")
    return " ".join(["python generate.py story=<story>", *args])


def _use_section(lora_rows: list[dict], details: list[dict]) -> list[str]:
    lines = [
        "", "## Use", "",
        "With this repository (rank/alpha are read from the file):", "", "```bash",
        generate_command(lora_rows),
        "python generate.py reproduce=.   # regenerate the 8 images here and check them pixel by pixel",
        "```", "",
    ]
    diffusers_file = next((r["file"] for r in lora_rows if not r["file"].endswith(("_kohya.safetensors", ".ckpt"))
                           and (r.get("details") or {}).get("type", "lora") in ("lora", "dora")), None)
    if diffusers_file or not lora_rows:
        lines += [
            "With diffusers:", "", "```python",
            "from diffusers import KolorsPipeline",
            "pipe = KolorsPipeline.from_pretrained('Kwai-Kolors/Kolors-diffusers', variant='fp16').to('cuda')",
            f"pipe.load_lora_weights('.', weight_name='{diffusers_file or 'lora.safetensors'}')",
            "```", "",
        ]
    kohya = next((r["file"] for r in lora_rows if r["file"].endswith("_kohya.safetensors")), None)
    if kohya:
        lines += [f"With ComfyUI: copy `{kohya}` to `models/loras/` and apply it with the core `LoraLoaderModelOnly` "
                  "node to the Kolors model loaded by the ComfyUI-Kolors-MZ nodes.", ""]
    if any(r["file"].endswith("lora_diffsynth.ckpt") for r in lora_rows):
        d0 = details[0] if details else {}
        lines += ["With DiffSynth-Studio (the competition's `load_lora`): "
                  f"`load_lora(pipe.unet, lora_rank={d0.get('rank', 16)}, lora_alpha={d0.get('alpha', 4.0)}, "
                  "lora_path='lora_diffsynth.ckpt')`.", ""]
    return lines


def model_card(name: str, manifest: Manifest, lora_rows: list[dict], details: list[dict], scores: StoryScores | None,
               training_yaml: str | None, training_from: str | None, style: str | None = None) -> str:
    """The model card's markdown; ``style`` (story.style) wins over a style in the LoRA metadata."""
    return "\n".join([
        *_header(name, manifest, details, style),
        *_lora_section(lora_rows, details, training_yaml, training_from),
        *_scores_section(scores),
        *_story_section(manifest),
        *_use_section(lora_rows, details),
    ])
