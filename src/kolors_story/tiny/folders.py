"""Building a stand-in folder once: a stamp file records what was built, a folder whose stamp
matches is reused, anything else is rebuilt aside and swapped in (never half-written). The note
files say in the folder itself that it holds a stand-in, not the real weights."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from kolors_story.files import atomic_dir

MODEL_NOTE_FILE = "TINY_MODEL.txt"  # in a stand-in Kolors folder: what it is (and that it is not Kolors)
SCORER_STAMP = "TINY_SCORER.json"  # in a stand-in aesthetic predictor folder


def stamp_matches(folder: Path, stamp_name: str, want: dict) -> bool:
    try:
        return json.loads((Path(folder) / stamp_name).read_text()) == want
    except (OSError, ValueError):
        return False


def build_stamped_folder(folder: str | Path, stamp: dict, stamp_name: str, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a temp folder and swap it in as ``folder``, unless ``folder`` already
    carries ``stamp`` (also when another process finished the same build first)."""
    folder = Path(folder).expanduser()
    if stamp_matches(folder, stamp_name, stamp):
        return folder
    with atomic_dir(folder, keep_existing=lambda f: stamp_matches(f, stamp_name, stamp)) as tmp:
        write(tmp)
        (tmp / stamp_name).write_text(json.dumps(stamp))
    return folder


def is_stand_in(folder: str | Path) -> bool:
    """A model or scorer folder this package built (it carries a stand-in note or stamp)."""
    folder = Path(folder).expanduser()
    return (folder / MODEL_NOTE_FILE).exists() or (folder / SCORER_STAMP).exists()
