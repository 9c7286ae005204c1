"""`python evaluate.py images=<dir>`: the competition's aesthetic score of a story, plus coherence
(CLIP-I), copy-paste pairs and, when the story's English prompts are recorded beside the images
(``manifest.json`` of a generate run, ``scores.json`` of a training checkpoint), prompt alignment (CLIP-T).

Which files are scored (non-recursive, hidden files skipped, extensions in ``IMAGE_SUFFIXES``):
- a folder with numbered images (``1.png`` .. ``8.png``, any image extension) is a story: those
  are scored in numeric order and other images beside them (``panel.png`` of a generate run, a
  cover...) are listed as ignored;
- otherwise every image file is scored, in alphabetical order.

Results go to ``scores.json`` beside the images (``output_dir`` overrides), the same place a
training checkpoint keeps its ``scores.json``, and a table is printed. Note the competition's own
loop scores *every* file of the folder it is given: hand it only the 8 story images.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from kolors_story.config import EvaluateSettings, ScorerSettings
from kolors_story.errors import UserError
from kolors_story.evaluate.alignment import PromptAligner
from kolors_story.evaluate.objective import Objective
from kolors_story.evaluate.scorer import AestheticScorer
from kolors_story.evaluate.summary import story_scores
from kolors_story.files import atomic_write_json
from kolors_story.records import MANIFEST_FILE, SCORES_FILE, CheckpointScores, Manifest, RecordError
from kolors_story.story import STORY_LENGTH

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_NUMBERED = re.compile(r"^(\d+)$")


class EvaluationError(UserError, RuntimeError):
    """Bad input to the evaluation (folder missing/empty, unreadable image, bad key)."""


class StoryLengthWarning(UserWarning):
    """The story does not have the competition's 8 images (it is scored anyway)."""


def find_images(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """``(images to score, image files ignored)`` in a folder; see the module docstring for the rule."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise EvaluationError(f"images={folder}: no such folder. Pass images=<folder with the story images>")
    if not folder.is_dir():
        raise EvaluationError(f"images={folder} is a file, not a folder. Pass the folder that holds the story images")
    files = sorted(
        (p for p in folder.iterdir()
         if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: (p.name.lower(), p.name),
    )
    numbered = [p for p in files if _NUMBERED.match(p.stem)]
    if numbered:
        numbered.sort(key=lambda p: (int(p.stem), p.name))
        return numbered, [p for p in files if p not in numbered]
    return files, []


def _empty_folder_message(folder: Path) -> str:
    msg = f"images={folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder."
    # A training run keeps its story images one level down, per checkpoint: point there.
    subdirs = [d for pattern in ("*", "*/*") for d in folder.glob(pattern) if d.is_dir()]
    with_images = sorted(
        d for d in subdirs
        if any(f.suffix.lower() in IMAGE_SUFFIXES for f in d.iterdir() if f.is_file())
    )
    if with_images:
        shown = ", ".join(str(d) for d in with_images[:3]) + (" ..." if len(with_images) > 3 else "")
        msg += f" Sub-folders with images: {shown} -- pass one of them as images=..."
    return msg


def load_images(paths: list[Path]) -> list[Image.Image]:
    """Open and fully decode every image; all unreadable ones are named in one error.

    Images keep their mode (RGBA, L, P...): the CLIPProcessor converts them to RGB exactly as in
    the competition's loop, which passes ``Image.open(...)`` straight to it.
    """
    images, bad = [], []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.load()  # decode now: a truncated file fails here, with its name, not mid-batch
                images.append(im.copy())
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            bad.append(f"{path}: {type(exc).__name__}: {exc}")
    if bad:
        raise EvaluationError(
            f"{len(bad)} unreadable image(s); fix or remove them and run again:\n  " + "\n  ".join(bad)
        )
    return images


def recorded_prompts(folder: Path, paths: list[Path]) -> list[str] | None:
    """The English prompt of each numbered image, from the ``manifest.json`` (generate) or
    ``scores.json`` (training checkpoint) beside it; None when neither records them."""
    for name, record in ((MANIFEST_FILE, Manifest), (SCORES_FILE, CheckpointScores)):
        if not (folder / name).is_file():
            continue
        try:
            scenes = record.read(folder / name).scenes
        except RecordError:
            continue  # another tool's file of that name: no prompts from it
        by_image = {s.image: s.prompt_en or "" for s in scenes}
        texts = [by_image.get(p.name, "") for p in paths]
        if any(texts):
            return texts
    return None


def _story_paths(folder_or_paths) -> tuple[Path, list[Path], list[Path]]:
    """(folder, the story's image paths, files ignored in the folder) of a folder or a list of paths."""
    if isinstance(folder_or_paths, (str, Path)):
        folder = Path(folder_or_paths).expanduser()
        paths, ignored = find_images(folder)
        if not paths:
            raise EvaluationError(_empty_folder_message(folder))
        return folder, paths, ignored
    paths = [Path(p) for p in folder_or_paths]
    if not paths:
        raise EvaluationError("No images given to evaluate")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise EvaluationError(f"Image file(s) not found: {', '.join(missing)}")
    return paths[0].parent, paths, []


def _per_image(result: dict) -> list[dict]:
    """One row per image: its score, similarity to the others, CLIP-T and whether it is a copy."""
    copies = {i for pair in result["duplicate_pairs"] for i in pair["panels"]}
    alignment = result["alignment"] or [None] * len(result["images"])
    return [{"index": i + 1, "image": name, "score": s, "similarity_to_others": sim, "clip_t": t, "copy": i + 1 in copies}
            for i, (name, s, sim, t) in enumerate(zip(result["images"], result["scores"], result["similarity_to_others"],
                                                      alignment))]


def evaluate_images(folder_or_paths, scorer: AestheticScorer, threshold: float | None = None,
                    expected: int = STORY_LENGTH, progress: bool = True, *, settings: ScorerSettings | None = None,
                    aligner: PromptAligner | None = None) -> dict:
    """Score a story: per-image aesthetic scores, mean/min/max, pass/fail, CLIP-I coherence and
    outlier, copy-paste pairs, CLIP-T (with an ``aligner`` and recorded prompts), story objective.

    ``folder_or_paths`` is a folder (scored per :func:`find_images`) or a list of image paths
    (scored in the given order). A count other than ``expected`` (8) is scored anyway with a
    :class:`StoryLengthWarning`, recorded under ``warnings``. ``settings`` (the scorer group)
    gives the copy thresholds and objective weights; ``threshold`` overrides its gate.
    """
    settings = settings or ScorerSettings()
    threshold = settings.threshold if threshold is None else threshold
    folder, paths, ignored = _story_paths(folder_or_paths)
    images = load_images(paths)

    notes = []
    if len(paths) != expected:
        notes.append(
            f"{len(paths)} image(s) found but the competition story needs exactly {expected}: "
            "scored anyway, but this folder is not a valid submission as is"
        )
        warnings.warn(notes[-1], StoryLengthWarning, stacklevel=2)

    scores, embeds = scorer.score_and_embed(images, progress=progress)
    texts = recorded_prompts(folder, paths)
    alignment = aligner.alignment(images, texts) if (aligner is not None and texts) else None
    result = {"folder": str(folder.resolve()), "images": [_rel(p, folder) for p in paths]}
    if alignment is None:
        result["alignment_note"] = (f"no English prompts recorded beside the images ({MANIFEST_FILE}/{SCORES_FILE})"
                                    if texts is None else "prompt alignment off (scorer.alignment=false)") + ": CLIP-T not computed"
    summary = story_scores(scores, embeds, threshold, images=images, alignment=alignment,
                           max_pixel_distance=settings.duplicate_pixels, min_cosine=settings.duplicate_cosine,
                           objective=Objective.from_settings(dataclasses.replace(settings, threshold=threshold)))
    result.update(summary.to_json())
    result["outlier_image"] = result["images"][result["outlier"] - 1] if result["outlier"] else None
    if len(images) < 2:
        notes.append("coherence needs at least 2 images: not computed")
    result["per_image"] = _per_image(result)
    result.update(
        n_images=len(paths),
        expected_images=expected,
        story_complete=len(paths) == expected,
        ignored=[_rel(p, folder) for p in ignored],
        warnings=notes,
        scorer={"path": str(scorer.path) if scorer.path else None, "tiny": scorer.note is not None,
                "batch_size": scorer.batch_size, "device": str(scorer.device)},
    )
    if scorer.note:
        result["note"] = f"scored by a stand-in predictor ({scorer.note}): these scores are not the competition's"
    return result


def _rel(path: Path, folder: Path) -> str:
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)


def print_report(result: dict, console=None) -> None:
    """The per-image table and the verdict, with rich."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"Aesthetic scores: {result['folder']}")
    table.add_column("#", justify="right")
    table.add_column("image")
    table.add_column("score", justify="right")
    table.add_column("sim. to others", justify="right")
    table.add_column("CLIP-T", justify="right")
    table.add_column("")
    for row in result["per_image"]:
        flags = []
        if row["score"] < result["threshold"]:
            flags.append(f"< {result['threshold']:g}")
        if result["outlier"] == row["index"]:
            flags.append("most out-of-style")
        if row["copy"]:
            flags.append("copy of another panel")
        sim = "-" if row["similarity_to_others"] is None else f"{row['similarity_to_others']:.4f}"
        clip_t = "-" if row["clip_t"] is None else f"{row['clip_t']:.4f}"
        table.add_row(str(row["index"]), row["image"], f"{row['score']:.4f}", sim, clip_t, ", ".join(flags))
    console.print(table)
    verdict = "[bold green]PASS[/]" if result["passed"] else "[bold red]FAIL[/]"
    console.print(f"mean {result['mean']:.4f}  min {result['min']:.4f}  max {result['max']:.4f}  "
                  f"-> {verdict} (mean >= {result['threshold']:g})")
    if result["coherence"] is not None:
        console.print(f"CLIP-I coherence {result['coherence']:.4f} (mean pairwise cosine of CLIP image embeddings); "
                      f"most out-of-style: #{result['outlier']} {result['outlier_image']}")
    if result["clip_t"] is not None:
        console.print(f"CLIP-T prompt alignment {result['clip_t']:.4f} (mean cosine of each image with its prompt)")
    for pair in result["duplicate_pairs"]:
        i, j = pair["panels"]
        console.print(f"[bold yellow]copy-paste:[/] #{i} and #{j} are near-duplicates ({' and '.join(pair['why'])}: "
                      f"pixel distance {pair['pixel_distance']:.4f}, cosine {pair['cosine']:.4f})")
    console.print(f"copy-paste share {result['copy_paste']:.2f}  story objective {result['story_objective']:.4f}")
    if result.get("alignment_note"):
        console.print(f"[dim]{result['alignment_note']}[/]")
    for name in result["ignored"]:
        console.print(f"[dim]ignored (not a numbered story image): {name}[/]")
    for note in result["warnings"]:
        console.print(f"[bold yellow]warning:[/] {note}")
    if result.get("note"):
        console.print(f"[yellow]{result['note']}[/]")


def evaluate_folder(job: EvaluateSettings) -> dict:
    """``images=<dir>``: score the folder, write scores.json, print the table."""
    folder = Path(str(job.images)).expanduser()
    paths, _ = find_images(folder)  # folder problems are reported before the scorer loads
    if not paths:
        raise EvaluationError(_empty_folder_message(folder))
    scorer = AestheticScorer.from_settings(job.scorer)
    wants_alignment = bool(job.scorer.alignment) and recorded_prompts(folder, paths) is not None
    aligner = PromptAligner.from_settings(job.scorer) if wants_alignment else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StoryLengthWarning)  # shown in the report instead
        result = evaluate_images(folder, scorer, expected=job.expected_images, settings=job.scorer, aligner=aligner)
    out_dir = Path(str(job.output_dir)).expanduser() if job.output_dir else folder
    out = out_dir / SCORES_FILE
    try:
        atomic_write_json(out, result)
    except OSError as exc:
        raise EvaluationError(f"Cannot write {out}: {exc}. Pass output_dir=<writable folder>") from exc
    result["scores_json"] = str(out)
    print_report(result)
    print(f"Wrote {out}")
    return result
