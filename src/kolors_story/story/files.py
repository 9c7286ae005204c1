"""Your own story in one file (``story.file=<path>``): a YAML, JSON or CSV file of scenes.

- YAML / JSON: a list of scenes, or a mapping with ``scenes`` and, optionally, ``title``,
  ``language``, ``character`` and ``style``.
- CSV: one row per scene.
Each scene has ``prompt`` and ``negative`` (and may have ``description`` and ``seed``); a text is one
string or ``{zh: ..., en: ...}`` (CSV columns ``prompt_zh``, ``prompt_en``, ``negative_zh`` ...).
The file is checked before any model loads: an unreadable or non-UTF-8 file, an unknown column or
key, an empty prompt each stop the run with one line naming the file and the scene. A count other
than the competition's 8 is allowed and said loudly. The prompts' length in ChatGLM tokens is
checked where the tokenizer is at hand (``models.prompts.check_prompt_tokens``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import warnings
from pathlib import Path

from kolors_story.errors import MissingFileError, SettingsError

TEXT_FIELDS = ("prompt", "negative", "description")  # a text, or {zh, en}
SCENE_FIELDS = (*TEXT_FIELDS, "seed")
STORY_FIELDS = ("title", "language", "character", "style", "scenes")
LANGUAGES = ("zh", "en")
FORMATS = (".yaml", ".yml", ".json", ".csv")
COMPETITION_LENGTH = 8


class StoryFileError(SettingsError):
    """A story file that cannot be used; the message names the file, the scene and the fix."""


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise MissingFileError(f"story.file={path}: no such file; write one with `python -m kolors_story.story new "
                               f"{path}`")
    if path.suffix.lower() not in FORMATS:
        raise StoryFileError(f"story.file={path}: use a .yaml, .json or .csv file")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise StoryFileError(f"story.file={path} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None


def _csv_scenes(path: Path, text: str) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO(text)))
    columns = set(rows[0]) if rows else set()
    known = {f for f in SCENE_FIELDS} | {f"{f}_{lang}" for f in TEXT_FIELDS for lang in LANGUAGES}
    unknown = sorted(c for c in columns if c not in known)
    if unknown:
        raise StoryFileError(f"story.file={path}: unknown column(s) {unknown}; use {sorted(known)}")
    scenes = []
    for row in rows:
        scene: dict = {}
        for field in TEXT_FIELDS:
            both = {lang: row[f"{field}_{lang}"] for lang in LANGUAGES if (row.get(f"{field}_{lang}") or "").strip()}
            if both:
                scene[field] = both
            elif (row.get(field) or "").strip():
                scene[field] = row[field]
        if (row.get("seed") or "").strip():
            scene["seed"] = row["seed"]
        scenes.append(scene)
    return scenes


def _structured(path: Path, text: str) -> dict:
    import yaml

    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise StoryFileError(f"story.file={path} cannot be parsed ({str(exc).splitlines()[0]})") from None
    data = {"scenes": data} if isinstance(data, list) else data
    if not isinstance(data, dict) or not isinstance(data.get("scenes"), list):
        raise StoryFileError(f"story.file={path}: expected a list of scenes or a mapping with 'scenes'")
    unknown = sorted(set(data) - set(STORY_FIELDS))
    if unknown:
        raise StoryFileError(f"story.file={path}: unknown key(s) {unknown}; use {list(STORY_FIELDS)}")
    return data


def _check_scene(path: Path, n: int, scene) -> dict:
    where = f"story.file={path}, scene {n}"
    if not isinstance(scene, dict):
        raise StoryFileError(f"{where}: a scene is a mapping with prompt and negative (found {type(scene).__name__})")
    unknown = sorted(set(scene) - set(SCENE_FIELDS))
    if unknown:
        raise StoryFileError(f"{where}: unknown key(s) {unknown}; use {list(SCENE_FIELDS)}")
    prompt = scene.get("prompt")
    texts = prompt.values() if isinstance(prompt, dict) else [prompt]
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise StoryFileError(f"{where}: the prompt is empty; every scene needs its prompt")
    if "seed" in scene:
        try:
            scene = {**scene, "seed": int(scene["seed"])}
        except (TypeError, ValueError):
            raise StoryFileError(f"{where}: seed={scene['seed']!r} is not a whole number") from None
    return scene


def read_story_file(path: str | Path) -> dict:
    """The story in ``path`` as ``{scenes: [...], title?, language?, character?, style?}``, checked."""
    path = Path(path).expanduser()
    text = _read_text(path)
    data = {"scenes": _csv_scenes(path, text)} if path.suffix.lower() == ".csv" else _structured(path, text)
    data["scenes"] = [_check_scene(path, n, s) for n, s in enumerate(data["scenes"], start=1)]
    if not data["scenes"]:
        raise StoryFileError(f"story.file={path} has no scenes")
    if len(data["scenes"]) != COMPETITION_LENGTH:
        message = (f"story.file={path} has {len(data['scenes'])} scenes: the competition asks for exactly "
                   f"{COMPETITION_LENGTH}; rendered as given")
        warnings.warn(message, stacklevel=2)
        print(f"WARNING: {message}")
    return data


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()


def apply_story_file(job):
    """``job`` with its story taken from ``story.file`` when set: the scenes (with their seeds), and
    the title, language, character and style the file gives (the title defaults to the file's name).
    The sampler's seeds follow the file's unless they were set apart from the story's."""
    story = job.story
    if not story.file:
        return job
    data = read_story_file(story.file)
    followed = job.sampler.seeds == story.seeds  # sampler.seeds defaults to ${story.seeds}
    seeds = [s.get("seed") for s in data["scenes"]]
    if any(s is not None for s in seeds) and None in seeds:
        raise StoryFileError(f"story.file={story.file}: scene {seeds.index(None) + 1} has no seed while others do; "
                             "give every scene a seed, or none (then sampler.base_seed + scene index)")
    story.seeds = seeds if seeds and seeds[0] is not None else None
    story.scenes = [{k: v for k, v in s.items() if k != "seed"} for s in data["scenes"]]
    story.title = str(data.get("title") or Path(story.file).stem)
    story.language = str(data.get("language") or story.language)
    story.character = data.get("character")
    story.style = data.get("style", story.style)
    if followed:
        job.sampler.seeds = story.seeds
    return job


STORY_COPY = "story"  # <run or bundle>/story.<yaml|json|csv>: the story file the run was made from


def copy_story_file(story, folder: str | Path) -> Path | None:
    """A copy of ``story.file`` in ``folder`` (a run or a bundle), so the story travels with what
    was made from it; None when the story is a built-in one."""
    if not story.file:
        return None
    from kolors_story.files import atomic_path

    src = Path(story.file).expanduser()
    dest = Path(folder) / f"{STORY_COPY}{src.suffix.lower()}"
    if src.resolve() != dest.resolve():
        with atomic_path(dest) as tmp:
            tmp.write_bytes(src.read_bytes())
    return dest


def story_copy_in(folder: str | Path) -> Path | None:
    """The story file a run or bundle keeps (see :func:`copy_story_file`), if any."""
    found = sorted(p for p in Path(folder).glob(f"{STORY_COPY}.*") if p.suffix.lower() in FORMATS)
    return found[0] if found else None
