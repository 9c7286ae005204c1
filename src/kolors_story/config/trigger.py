"""One trigger: ``trigger=<words>`` is put before every training caption (the data stage) and every
rendered prompt (validation renders, before/after, ``generate.py``, the bundle), so a LoRA is never
validated without the words it was trained on.

The two keys this replaces, ``dataset.caption_prefix`` and ``story.trigger``, still work as
deprecated aliases (with a one-line warning): either one alone sets both, as ``trigger`` does.
"""

from __future__ import annotations

import unicodedata
import warnings

CJK_SEPARATOR, LATIN_SEPARATOR = "，", ", "


def trigger_text(words: str) -> str:
    """The trigger as it is put before a caption or prompt: the words and a separator (a Chinese
    comma after Chinese words, ``", "`` otherwise), unless they already end in punctuation."""
    words = words.strip()
    if not words:
        return ""
    last = words[-1]
    if unicodedata.category(last).startswith("P"):
        return words if not last.isascii() else words + " "
    return words + (CJK_SEPARATOR if not last.isascii() else LATIN_SEPARATOR)


def apply_trigger(job):
    """``job`` (train or generate settings) with ``trigger`` applied to the captions' prefix and the
    story's prompts; an alias given without ``trigger`` is taken as the trigger, with a warning."""
    dataset = getattr(job, "dataset", None)
    aliases = {"story.trigger": job.story.trigger or ""}
    if dataset is not None:
        aliases["dataset.caption_prefix"] = dataset.caption_prefix or ""
    text = trigger_text(job.trigger or "")
    for key, value in aliases.items():
        if not value or value == text:
            continue
        if text:
            warnings.warn(f"{key}={value!r} is ignored: trigger={job.trigger!r} sets the captions and prompts",
                          stacklevel=2)
        else:
            warnings.warn(f"{key} is deprecated: use trigger=<words> (one key for captions and prompts); "
                          f"{value!r} is used for both", stacklevel=2)
            text = value
    job.story.trigger = text
    if dataset is not None:
        dataset.caption_prefix = text
    return job
