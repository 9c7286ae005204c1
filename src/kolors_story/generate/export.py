"""``python -m kolors_story.export <checkpoint> --name <Team>-KolorsTraining-<x>``: a checkpoint as the
files one uploads to ModelScope's model hub, named as the competition asks.

The folder ``<out>/<name>/`` holds the checkpoint's LoRA files renamed after the model
(``<name>.safetensors`` for diffusers, ``<name>_kohya.safetensors`` for ComfyUI/WebUI,
``<name>.ckpt`` for DiffSynth-Studio, the competition's loader), its validation story when it has
one (``1.png``..``8.png``, ``panel.png``, ``scores.json``), the ModelScope model card ``README.md``
(front matter: framework, task, base model) and ``configuration.json``. Built aside and swapped in.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from kolors_story.errors import MissingFileError, OutputExistsError, SettingsError
from kolors_story.files import atomic_dir
from kolors_story.records import FILE_NAMES, SCORES_FILE, CheckpointScores, RecordError

NAME = re.compile(r"^[A-Za-z0-9_.]+-KolorsTraining-[A-Za-z0-9_.-]+$")
UPLOAD_NAMES = {"diffusers": "{name}.safetensors", "kohya": "{name}_kohya.safetensors", "diffsynth": "{name}.ckpt"}
MODELSCOPE_CONFIG = {"framework": "pytorch", "task": "text-to-image-synthesis", "model": {"type": "lora"},
                     "base_model": "Kwai-Kolors/Kolors"}


def check_name(name: str) -> str:
    if not NAME.match(name or ""):
        raise SettingsError(f"--name {name!r}: the competition names a model <Team>-KolorsTraining-<title> (letters, "
                            "digits, '_' and '.'), e.g. MyTeam-KolorsTraining-InkDream")
    return name


def _card(name: str, files: dict[str, str], meta: dict, scores: CheckpointScores | None) -> str:
    trigger = str(meta.get("trigger") or "").strip()
    lines = ["---", "frameworks:", "  - Pytorch", "license: apache-2.0", "tasks:", "  - text-to-image-synthesis",
             "base_model:", "  - Kwai-Kolors/Kolors", "base_model_relation: adapter", "---", "", f"# {name}", "",
             "A Kolors style LoRA (Kolors-LoRA Style Story Challenge), trained with kolors-story.", "",
             f"- Trigger words: {('`' + trigger + '`') if trigger else 'none'}",
             f"- Base model hash: `{meta.get('base_model_hash', '?')}`, checkpoint step {meta.get('step', '?')}", "",
             "| file | for |", "|---|---|"]
    use = {"diffusers": "diffusers `load_lora_weights`", "kohya": "ComfyUI `LoraLoaderModelOnly`, WebUI",
           "diffsynth": "DiffSynth-Studio `load_lora` (the competition's loader)"}
    lines += [f"| `{file}` | {use[fmt]} |" for fmt, file in files.items()]
    if scores is not None:
        lines += ["", "## The story at this checkpoint", "", "![story](panel.png)", "",
                  f"Aesthetic mean {scores.mean:.4f} (min {scores.min:.4f}, gate {scores.threshold:g}: "
                  f"{'pass' if scores.passed else 'FAIL'})."]
    return "\n".join(lines) + "\n"


def _story_files(ckpt: Path) -> tuple[list[Path], CheckpointScores | None]:
    try:
        scores = CheckpointScores.read(ckpt / SCORES_FILE) if (ckpt / SCORES_FILE).is_file() else None
    except RecordError:
        scores = None
    pictures = [p for p in ckpt.glob("*.png") if p.stem.isdigit() or p.name == "panel.png"]
    return sorted(pictures) + ([ckpt / SCORES_FILE] if scores is not None else []), scores


def export_checkpoint(checkpoint: Path, name: str, out_dir: Path, overwrite: bool = False) -> Path:
    """Write ``<out_dir>/<name>/`` from the checkpoint folder ``checkpoint``; returns it."""
    from kolors_story.lora import read_lora

    check_name(name)
    present = {fmt: checkpoint / file for fmt, file in FILE_NAMES.items() if (checkpoint / file).is_file()}
    if not present:
        raise MissingFileError(f"{checkpoint} holds no LoRA file ({', '.join(FILE_NAMES.values())}): give a "
                               "checkpoints/step-XXXXXX folder, a run folder or a best.yaml")
    final = Path(out_dir) / name
    if final.exists() and not overwrite:
        raise OutputExistsError(f"{final} already exists; pass --force to replace it")
    meta = read_lora(next(iter(present.values()))).metadata
    story, scores = _story_files(checkpoint)
    with atomic_dir(final) as tmp:
        files = {}
        for fmt, src in present.items():
            files[fmt] = UPLOAD_NAMES[fmt].format(name=name)
            shutil.copy2(src, tmp / files[fmt])
        for path in story:
            shutil.copy2(path, tmp / path.name)
        (tmp / "README.md").write_text(_card(name, files, meta, scores), encoding="utf-8")
        (tmp / "configuration.json").write_text(json.dumps(MODELSCOPE_CONFIG, indent=2) + "\n", encoding="utf-8")
    return final
