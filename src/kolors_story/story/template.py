"""The template ``python -m kolors_story.story new <path>`` writes: 8 scenes of one character, in
Chinese and English, as YAML (with comments), JSON or CSV by the file's extension."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

# (description, prompt zh, prompt en): one small story, a little fox's day, to be replaced by yours
SCENES = [
    ("清晨醒来", "水墨画，一只红色小狐狸在竹林里醒来，晨雾，远山", "ink painting, a little red fox wakes up in a bamboo grove, morning mist, far mountains"),
    ("去河边", "水墨画，一只红色小狐狸走在小路上，去河边，柳树", "ink painting, a little red fox walks along a path to the river, willow trees"),
    ("遇见白鹤", "水墨画，一只红色小狐狸在河边遇见一只白鹤，涟漪", "ink painting, a little red fox meets a white crane by the river, ripples"),
    ("一起捕鱼", "水墨画，一只红色小狐狸和白鹤在浅水里捕鱼，水花", "ink painting, a little red fox and a white crane fishing in shallow water, splashes"),
    ("下雨了", "水墨画，一只红色小狐狸在荷叶下躲雨，细雨", "ink painting, a little red fox shelters from the rain under a lotus leaf, drizzle"),
    ("雨后彩虹", "水墨画，一只红色小狐狸望着雨后的彩虹，湿润的草地", "ink painting, a little red fox looks at a rainbow after the rain, wet grass"),
    ("夕阳回家", "水墨画，一只红色小狐狸在夕阳下走回竹林，长长的影子", "ink painting, a little red fox walks home to the bamboo grove at sunset, long shadows"),
    ("月下入睡", "水墨画，一只红色小狐狸在月光下蜷缩着睡着了，星空", "ink painting, a little red fox curled up asleep under the moon, starry sky"),
]
NEGATIVE = {"zh": "丑陋，变形，嘈杂，模糊，低对比度", "en": "ugly, deformed, noisy, blurry, low contrast"}

YAML_HEAD = """\
# A story of your own: python train.py story.file=<this_file>  /  python generate.py story.file=<this_file>
# Every scene has a prompt and a negative prompt, each one text or {zh: ..., en: ...} (Kolors reads
# both; story.language picks which one renders; the English one is what CLIP-T scores against).
# Optional per scene: description (shown under the panel) and seed (give every scene one, or none:
# then sampler.base_seed + scene index). Prompts longer than 256 ChatGLM tokens are refused.
# The competition asks for exactly 8 scenes; another count renders with a warning.
title: FoxDay            # the bundle is named <Team>-KolorsTraining-<title>
language: zh             # zh or en: which text of each scene renders
character: {zh: 红色小狐狸, en: little red fox}   # how the prompts name the main character (coherence)
scenes:
"""


def _scene(n: int, description: str, zh: str, en: str) -> dict:
    return {"description": description, "prompt": {"zh": zh, "en": en}, "negative": dict(NEGATIVE), "seed": n}


def template_text(suffix: str) -> str:
    """The template in the format of ``suffix`` (.yaml, .yml, .json or .csv)."""
    scenes = [_scene(n, *s) for n, s in enumerate(SCENES)]
    if suffix == ".json":
        story = {"title": "FoxDay", "language": "zh", "character": {"zh": "红色小狐狸", "en": "little red fox"},
                 "scenes": scenes}
        return json.dumps(story, ensure_ascii=False, indent=2) + "\n"
    if suffix == ".csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["description", "prompt_zh", "prompt_en", "negative_zh", "negative_en", "seed"])
        for s in scenes:
            writer.writerow([s["description"], s["prompt"]["zh"], s["prompt"]["en"], NEGATIVE["zh"], NEGATIVE["en"],
                             s["seed"]])
        return buf.getvalue()
    lines = [YAML_HEAD]
    for s in scenes:
        lines.append(f"  - description: {s['description']}\n"
                     f"    prompt:\n      zh: {s['prompt']['zh']}\n      en: {s['prompt']['en']}\n"
                     f"    negative: {{zh: {NEGATIVE['zh']}, en: \"{NEGATIVE['en']}\"}}\n"
                     f"    seed: {s['seed']}\n")
    return "".join(lines)


def write_template(path: str | Path, overwrite: bool = False) -> Path:
    from kolors_story.errors import OutputExistsError, SettingsError
    from kolors_story.files import atomic_write_text
    from kolors_story.story.files import FORMATS

    path = Path(path).expanduser()
    if path.suffix.lower() not in FORMATS:
        raise SettingsError(f"{path}: name the story file .yaml, .json or .csv")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass --force to replace it")
    return atomic_write_text(path, template_text(path.suffix.lower()))
