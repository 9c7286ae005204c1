"""The 8-scene story: prompts, negatives and seeds, resolved from the ``story`` and ``sampler`` settings.

Shared by every stage that sees the story: the cache encodes its prompts, training renders it at
each checkpoint, generation renders and records it. A story of one's own comes from a file
(``story.file``: ``files``); ``python -m kolors_story.story new <path>`` writes a template for one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kolors_story.config import SamplerSettings, StorySettings
from kolors_story.errors import SettingsError

STORY_LENGTH = 8


@dataclass(frozen=True)
class Scene:
    index: int  # 1-based, as the images are named 1.png..8.png
    description: str
    prompt: str
    negative: str
    seed: int
    caption_ascii: str = ""  # English description, for panels drawn without a CJK font
    prompt_en: str = ""  # the English prompt (CLIP's text tower reads English): what prompt alignment scores
    has_character: bool = False  # the prompt names story.character (the main character)

    def as_dict(self) -> dict:
        return asdict(self)


def _pick(value, language: str, where: str) -> str:
    """A story text is either one string or a {zh: ..., en: ...} mapping."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if language in value:
        return str(value[language])
    raise SettingsError(f"{where} has no '{language}' text (has: {sorted(value)}); set story.language to one of those")


def _ascii_caption(value) -> str:
    if isinstance(value, str):
        return value if value.isascii() else ""
    if value is not None and "en" in value:
        return str(value["en"])
    return ""


def scene_seeds(n: int, seeds=None, base_seed: int = 0) -> list[int]:
    if seeds is None:
        return [int(base_seed) + i for i in range(n)]
    seeds = [int(s) for s in seeds]
    if len(seeds) != n:
        raise SettingsError(f"sampler.seeds has {len(seeds)} seeds for {n} scenes; give one per scene or null")
    return seeds


def story_scenes(story: StorySettings, sampler: SamplerSettings | None = None) -> list[Scene]:
    """The scenes of ``story`` in its language, with the trigger words in front of each prompt.

    Seeds: ``sampler.seeds`` (which defaults to the story's own list), else ``sampler.base_seed``
    + scene index; without a sampler, the story's list or 0, 1, 2 ...
    """
    raw = list(story.scenes)
    if not raw:
        raise SettingsError("story.scenes is empty: a story needs its scenes (8 for the competition)")
    if sampler is not None:
        seeds = scene_seeds(len(raw), sampler.seeds, sampler.base_seed)
    else:
        seeds = scene_seeds(len(raw), story.seeds, 0)
    language, trigger = str(story.language), str(story.trigger or "")
    character = _pick(story.character, language, "story.character").strip()
    scenes = []
    for i, (item, seed) in enumerate(zip(raw, seeds), start=1):
        where = f"story.scenes[{i - 1}]"
        prompt = _pick(item.get("prompt"), language, f"{where}.prompt")
        if not prompt.strip():
            raise SettingsError(f"{where}.prompt is empty")
        scenes.append(
            Scene(
                index=i,
                description=_pick(item.get("description"), language, f"{where}.description"),
                prompt=trigger + prompt,
                negative=_pick(item.get("negative"), language, f"{where}.negative"),
                seed=seed,
                caption_ascii=_ascii_caption(item.get("description")),
                prompt_en=_ascii_caption(item.get("prompt")),
                has_character=bool(character) and character in prompt,
            )
        )
    return scenes
