"""Probe versions of the three built-in stories for the character LoRA on the pre-trained tiny model.

The tiny model cannot draw the real stories' characters, so each probe gives its story a character
the tiny model leaves open (an object in a colour it never drew an object in: the seed picks its
look, as it picks a real character's look the prompt does not fix) and 8 scenes it draws as asked
(a sky and a ground it follows), in the story's order of settings.

``python -m kolors_story.tiny.probes <story> <out.json>`` writes one as a story file (``story.file=``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kolors_story.files import atomic_write_text

# Skies and grounds the pre-trained tiny Kolors draws as asked next to an object of an unknown colour
# (measured over 12 seeds: mean caption distance 8-33; the other pairs 57-133).
BACKGROUNDS = {"blue": ("蓝色的天空", "蓝色的大海", "blue sky, blue sea"),
               "pink": ("粉色的天空", "蓝色的大海", "pink sky, blue sea"),
               "dusk": ("橙色的晚霞", "黄色的沙漠", "orange sunset, yellow desert")}
PLACES = {"左边": "on the left", "中间": "in the middle", "右边": "on the right"}
PROBES = {  # story: (its character, its 8 scenes as "background place")
    "ink_dream": ({"zh": "灰色的小人", "en": "grey figure"},
                  ["blue 左边", "dusk 中间", "pink 右边", "blue 右边", "dusk 左边", "pink 中间", "blue 中间", "dusk 右边"]),
    "warrior_dragon": ({"zh": "金色的方块", "en": "golden block"},
                       ["dusk 左边", "blue 中间", "pink 左边", "dusk 右边", "blue 右边", "pink 中间", "dusk 中间", "blue 左边"]),
    "idol_diary": ({"zh": "银色的圆形", "en": "silver disc"},
                   ["pink 左边", "blue 左边", "dusk 中间", "pink 右边", "blue 中间", "dusk 左边", "pink 中间", "blue 右边"]),
}


def probe_story(story: str) -> dict:
    """The probe version of ``story`` as a story file's contents."""
    if story not in PROBES:
        raise KeyError(f"no probe story {story!r}; one of {sorted(PROBES)}")
    character, specs = PROBES[story]
    scenes = []
    for i, spec in enumerate(specs):
        background, place = spec.split()
        sky, ground, english = BACKGROUNDS[background]
        scenes.append({"description": {"zh": f"第{i + 1}幕", "en": f"scene {i + 1}"}, "negative": "",
                       "prompt": {"zh": f"{sky}，{ground}，{place}一个{character['zh']}",
                                  "en": f"{english}, a {character['en']} {PLACES[place]}"}})
    return {"title": f"probe_{story}", "language": "zh", "character": character, "scenes": scenes}


def write_probe_story(story: str, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(probe_story(story), ensure_ascii=False, indent=1))
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in PROBES:
        print(f"usage: python -m kolors_story.tiny.probes <{'|'.join(PROBES)}> <out.json>", file=sys.stderr)
        return 2
    print(f"wrote {write_probe_story(*args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
