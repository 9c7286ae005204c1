"""Automatic captions (``dataset.captioner``), after preflight and curation, before the recipe.

Which images: ``dataset.caption_mode`` missing (only those without a caption), replace (all) or
append (the generated sentence after the existing caption). Trigger words (``caption_prefix``)
always come first. Every generated caption lands in ``<data_dir>/captions.csv``
(file, sha256, source_caption, generated, final) for review: edit ``final`` (or ``generated``)
and the next run uses the edit. A row is reused while its image (sha256) is unchanged, so the
captioner only runs for new or changed images; an edited caption changes one cache entry only
(the embedding cache is keyed per caption).
"""

from __future__ import annotations

import csv
import gc
import io
from dataclasses import dataclass
from pathlib import Path

from kolors_story import tiny
from kolors_story.config import DatasetSettings
from kolors_story.data.candidates import DataError, Dropped
from kolors_story.data.preflight import StagedImage, rgb_batches
from kolors_story.data.sources import normalise_caption
from kolors_story.files import atomic_write_text, file_sha256

CAPTIONS_FILE = "captions.csv"
COLUMNS = ("file", "sha256", "source_caption", "generated", "final")
MODES = ("missing", "replace", "append")
PROMPTS = {
    "zh": "用一句话详细描述这张图片：画面主体、动作、场景、色彩、光线和画风。只输出这句话。",
    "en": "Describe this image in one detailed sentence: the subject, action, setting, colours, light and "
          "art style. Output only the sentence.",
}
SEPARATORS = {"zh": "，", "en": ", "}
# Listing problems that only mean "no caption yet": with a captioner those images are kept.
UNCAPTIONED = ("caption missing", "empty caption")


@dataclass
class CaptionRow:
    file: str
    sha256: str
    source_caption: str
    generated: str
    final: str


def enabled(dataset: DatasetSettings) -> bool:
    return str(dataset.captioner) != "none"


def check_captioning(dataset: DatasetSettings) -> None:
    from kolors_story.models.captioner import family

    if enabled(dataset):
        family(str(dataset.captioner))
    if dataset.caption_mode not in MODES:
        raise DataError(f"dataset.caption_mode={dataset.caption_mode!r}: use one of {list(MODES)}", step="captions")
    if dataset.caption_language not in PROMPTS:
        raise DataError(f"dataset.caption_language={dataset.caption_language!r}: use zh or en", step="captions")
    if int(dataset.captioner_batch_size) < 1 or int(dataset.captioner_max_tokens) < 1:
        raise DataError("dataset.captioner_batch_size and dataset.captioner_max_tokens must be >= 1", step="captions")


def allow_uncaptioned(candidates: list) -> None:
    """Images whose only problem is a missing caption stay in (the captioner writes one)."""
    for c in candidates:
        if c.problem and c.problem.startswith(UNCAPTIONED) and c.path is not None:
            c.problem, c.caption = None, ""


def read_captions_csv(path: Path) -> dict[str, CaptionRow]:
    if not path.is_file():
        return {}
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig"))))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot be read as UTF-8 CSV ({exc}); fix it or delete it to caption again",
                        step="captions") from exc
    if rows and not set(COLUMNS) <= set(rows[0]):
        raise DataError(f"{path}: needs the columns {','.join(COLUMNS)} (found {','.join(rows[0])}); "
                        "fix the header or delete the file to caption again", step="captions")
    return {r["file"]: CaptionRow(*(normalise_caption(r[c] or "") if c != "file" else r[c] for c in COLUMNS))
            for r in rows}


def write_captions_csv(path: Path, rows: list[CaptionRow]) -> None:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows([r.file, r.sha256, r.source_caption, r.generated, r.final] for r in rows)
    atomic_write_text(path, out.getvalue())


def compose(source_caption: str, generated: str, prefix: str, mode: str, language: str) -> str:
    """The training caption from the source caption and the generated sentence (trigger words first)."""
    generated = normalise_caption(generated)
    if not generated:
        return normalise_caption(source_caption)
    if mode == "append" and source_caption.strip():
        return normalise_caption(source_caption.rstrip("，,。. ") + SEPARATORS[language] + generated)
    return normalise_caption(str(prefix or "") + generated)


def edited(row: CaptionRow, prefix: str) -> bool:
    """The ``final`` column is the user's own: no mode or language composes it from the row."""
    return bool(row.final) and row.final not in {compose(row.source_caption, row.generated, prefix, m, lang)
                                                 for m in MODES for lang in SEPARATORS}


def clean(text: str) -> str:
    """One printable line (model output may hold control characters or broken byte sequences)."""
    return normalise_caption("".join(ch for ch in text if ch.isprintable() and ch != "\ufffd"))


def generate_captions(images: list[StagedImage], dataset: DatasetSettings, progress: bool) -> dict[str, str]:
    """The captioner's sentence for each image (batched, greedy: the same image gives the same text)."""
    import torch

    from kolors_story.models.captioner import (
        captioner_path,
        load_captioner,
    )

    name = str(dataset.captioner)
    path = captioner_path(name, dataset.captioner_path)
    tiny.provide_captioner(dataset, path)
    model, processor = load_captioner(name, path, str(dataset.captioner_device), str(dataset.captioner_dtype))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                 "text": PROMPTS[dataset.caption_language]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    out: dict[str, str] = {}
    try:
        for chunk, pictures in rgb_batches(images, int(dataset.captioner_batch_size), f"captions ({name})", progress):
            inputs = processor(text=[prompt] * len(chunk), images=pictures, return_tensors="pt", padding=True)
            inputs = inputs.to(model.device)
            with torch.no_grad():
                ids = model.generate(**inputs, max_new_tokens=int(dataset.captioner_max_tokens), do_sample=False)
            texts = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            out.update({s.name: clean(t) for s, t in zip(chunk, texts)})
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def _wanted(s: StagedImage, mode: str) -> bool:
    return mode != "missing" or not s.caption.strip()


def caption_images(kept: list[StagedImage], dataset: DatasetSettings, data_dir: Path,
                   progress: bool = True) -> tuple[list[StagedImage], list[Dropped], dict]:
    """Fill in the captions; (images with their final captions, images left without one, report)."""
    path = data_dir / CAPTIONS_FILE
    previous = read_captions_csv(path)
    wanted = [s for s in kept if _wanted(s, dataset.caption_mode)]
    digests = {s.name: file_sha256(s.staged) for s in wanted}
    reusable = {s.name: previous[s.name] for s in wanted
                if s.name in previous and previous[s.name].sha256 == digests[s.name] and previous[s.name].generated}
    todo = [s for s in wanted if s.name not in reusable]
    generated = generate_captions(todo, dataset, progress) if todo else {}
    rows, n_edited, prefix = [], 0, str(dataset.caption_prefix or "")
    for s in wanted:
        old = reusable.get(s.name)
        text = old.generated if old else generated.get(s.name, "")
        final = compose(s.caption, text, prefix, dataset.caption_mode, dataset.caption_language)
        if old and edited(old, prefix):
            final, n_edited = old.final, n_edited + 1  # the user's own edit of the final caption wins
        rows.append(CaptionRow(s.name, digests[s.name], s.caption, text, final))
        s.caption = final
    write_captions_csv(path, rows)
    dropped = [Dropped(s.name, "captions", "no caption: the captioner wrote no text for it (add one in "
                       f"{CAPTIONS_FILE}, column final)", str(dataset.captioner)) for s in kept if not s.caption.strip()]
    report = {"captioner": str(dataset.captioner), "mode": dataset.caption_mode, "language": dataset.caption_language,
              "file": str(path), "captioned": len(wanted), "generated": len(todo), "reused": len(reusable),
              "edited": n_edited}
    return [s for s in kept if s.caption.strip()], dropped, report


def captions_digest(data_dir: Path) -> str | None:
    """The captions.csv content hash (part of the dataset fingerprint), or None when there is none."""
    path = data_dir / CAPTIONS_FILE
    return file_sha256(path) if path.is_file() else None
