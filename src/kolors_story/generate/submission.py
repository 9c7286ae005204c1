"""The competition submission: ``<Team>-KolorsTraining-<title>/`` with everything the organisers ask for.

The competition wants the LoRA file, a model introduction, at least 8 images and their prompts,
so that they can reproduce the result. The bundle holds: the LoRA file(s) (plus the kohya and
DiffSynth copies when they sit beside a checkpoint's ``lora.safetensors``), ``README.md`` (the
model card), ``1.png``..``8.png`` (each carrying the story's ComfyUI graph), ``panel.png``,
``prompts.csv``, ``scores.json`` (when scored), ``config.yaml`` (the exact resolved config),
``workflow_api.json`` + ``workflow.json`` (the story as a ComfyUI workflow) and ``manifest.json``,
from which ``python generate.py reproduce=<bundle>`` regenerates and checks every image.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from kolors_story.config import GenerateSettings, config_yaml
from kolors_story.errors import OutputExistsError, SettingsError
from kolors_story.files import (
    atomic_dir,
    atomic_save_image,
    atomic_write_text,
    file_sha256,
)
from kolors_story.generate.comfyui import StoryWorkflow, story_workflow, write_workflow
from kolors_story.generate.model_card import BundleFile, LoraDetails, model_card
from kolors_story.generate.outputs import png_metadata
from kolors_story.records import MANIFEST_FILE, SCORES_FILE, BundleRecord, Manifest, with_suffix
from kolors_story.story.files import copy_story_file

SIBLING_FORMATS = {"lora_kohya.safetensors": "kohya (ComfyUI, WebUI)", "lora_diffsynth.ckpt": "DiffSynth-Studio"}
_UNSAFE = re.compile(r'[\\/:*?"<>|\s]+')


def bundle_name(team: str, title: str) -> str:
    """``<Team>-KolorsTraining-<title>``, the naming the competition asks for, safe as a folder name."""
    clean_team = _UNSAFE.sub("_", str(team).strip()).strip("_.")
    clean_title = _UNSAFE.sub("_", str(title or "story").strip()).strip("_.") or "story"
    if not clean_team:
        raise SettingsError(f"submit.team={team!r} is empty after removing characters not allowed in a folder name")
    return f"{clean_team}-KolorsTraining-{clean_title}"


def _lora_files(loras: list) -> list[tuple[Path, str, int | None]]:
    """(source file, name inside the bundle, index of the LoRA it belongs to or None for siblings)."""
    files = []
    prefix_all = len(loras) > 1
    for n, spec in enumerate(loras):
        prefix = f"lora{n + 1}-" if prefix_all else ""
        files.append((spec.path, prefix + spec.path.name, n))
        if spec.path.name in ("lora.safetensors", "lora_ema.safetensors"):  # a checkpoint: the other formats too
            suffix = "_ema" if spec.path.name == "lora_ema.safetensors" else ""
            for sibling in (with_suffix(name, suffix) for name in SIBLING_FORMATS):
                if (spec.path.parent / sibling).is_file():
                    files.append((spec.path.parent / sibling, prefix + sibling, None))
    return files


def _lora_details(path: Path) -> LoraDetails:
    """rank/alpha/targets/metadata read from the file (the LoRA module's reader)."""
    try:
        from kolors_story.lora import read_lora

        lf = read_lora(path)
    except Exception as err:  # noqa: BLE001 - the card still gets written; the reason is shown in it
        return LoraDetails(error=f"{type(err).__name__}: {err}")
    return LoraDetails(rank=lf.rank, alpha=lf.alpha, target_modules=list(lf.target_modules), format=lf.format,
                       type=lf.type, skipped=dict(lf.info.get("skipped") or {}), metadata=dict(lf.metadata or {}))


def _training_config(details: list[LoraDetails], source) -> tuple[str | None, str | None]:
    """(YAML text, where it came from): the LoRA's own metadata first, else the run's config."""
    import yaml

    for d in details:
        meta = d.metadata
        for key in ("config", "train_config", "training_config", "resolved_config"):
            value = meta.get(key)
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    value = yaml.safe_load(value)
            if isinstance(value, dict) and value:
                return yaml.safe_dump(value, sort_keys=False, allow_unicode=True), f"LoRA metadata ({key})"
    config = getattr(source, "config", None)
    if config is not None and Path(config).is_file():
        return Path(config).read_text(encoding="utf-8"), f"{config}"
    return None, None


def _copy_loras(result, folder: Path, manifest: Manifest) -> tuple[list[BundleFile], list[LoraDetails]]:
    """Copy the LoRA file(s) into the bundle: one row per file (+ rank/alpha details for the
    LoRAs themselves), and each LoRA's ``bundle_file`` noted in the manifest."""
    rows, details = [], []
    for src, dest, idx in _lora_files(result.loras):
        shutil.copy2(src, folder / dest)
        fmt = SIBLING_FORMATS.get(src.name.replace("_ema.", "."),
                                  "diffusers" if src.suffix == ".safetensors" else src.suffix.lstrip("."))
        row = BundleFile(file=dest, format=fmt, sha256=file_sha256(folder / dest))
        if idx is not None:
            d = _lora_details(src)
            details.append(d)
            row.scale, row.details, row.format = result.loras[idx].scale, d, d.format or fmt
            manifest.loras[idx].bundle_file = dest
        rows.append(row)
    return rows, details


def _embed_workflow(folder: Path, manifest: Manifest, workflow: StoryWorkflow) -> None:
    """Images rendered without comfyui=true get the graph in their text here (pixels untouched, the
    other chunks as they were); the manifest copy records their sha256s and comfyui.enabled, so
    reproduce= of the bundle writes these bytes again."""
    from PIL import Image

    for rec in manifest.scenes:
        path = folder / rec.image
        with Image.open(path) as im:
            text, image = dict(im.text), im.copy()
        recorded = json.loads(text.get("parameters", "{}"))
        fields = {key: recorded.get(key, value) for key, value in text.items() if key != "parameters"}
        atomic_save_image(image, path, pnginfo=png_metadata(fields, (workflow.api, workflow.ui)))
        rec.sha256 = manifest.images[rec.image] = file_sha256(path)
    manifest.config.setdefault("comfyui", {})["enabled"] = True


def write_bundle(result, job: GenerateSettings, root: str | Path, source=None) -> Path:
    """Write the bundle of a finished generation (``generate.job.GenerationResult``) into ``root``
    as ``<submit.team>-KolorsTraining-<story.title>/``.

    Built in a temp folder and swapped into place: an interrupted write never leaves a partial
    bundle, and an existing bundle is only replaced with ``submit.overwrite``.
    """
    team = str(job.submit.team)
    name = bundle_name(team, job.story.title)
    final = Path(root) / name
    if final.exists() and not job.submit.overwrite:
        raise OutputExistsError(f"{final} already exists; set submit.overwrite=true to replace it, or submit.dir=<folder>")
    with atomic_dir(final) as tmp:
        manifest = result.manifest.model_copy(deep=True)
        rows, details = _copy_loras(result, tmp, manifest)
        for p in [*result.images, result.panel, result.out_dir / "prompts.csv"]:
            shutil.copy2(p, tmp / Path(p).name)
        if job.story.file and Path(job.story.file).expanduser().is_file():
            copy_story_file(job.story, tmp)  # story.<yaml|json|csv>: the file the scenes came from
        reference = manifest.reference_image
        if reference:  # the character sheet the story was conditioned on: reproduce= finds it here
            reference.bundle_file = f"reference_{reference.name}"
            shutil.copy2(reference.image, tmp / reference.bundle_file)
        scores = result.summary
        if scores is not None:
            scores.model_copy(update={"images": [p.name for p in result.images]}).write(tmp / SCORES_FILE)
        workflow = story_workflow(manifest, job.comfyui)  # the graph the images carry (built from the same record)
        write_workflow(tmp, workflow)
        if not (manifest.config.get("comfyui") or {}).get("enabled"):
            _embed_workflow(tmp, manifest, workflow)
        manifest.bundle = BundleRecord(name=name, team=team, lora_files=[r.file for r in rows])
        manifest.write(tmp / MANIFEST_FILE)
        atomic_write_text(tmp / "config.yaml", config_yaml(manifest.config))
        training_yaml, training_from = _training_config(details, source)
        atomic_write_text(tmp / "README.md", model_card(name, manifest, rows, details, scores, training_yaml,
                                                        training_from, style=job.story.style, workflow=workflow))
    return final
