"""Curation of the preflighted images, before the data-juicer recipe (the competition's advice:
"filter out low-aesthetic images"): near-duplicates removed by perceptual hash (``filter.dedup``)
and images below an aesthetic score dropped (``filter.min_aesthetic``), scored by the
competition's own predictor (the project's scorer). Both are off by default.

Order: score every preflighted image (when a threshold is set), group near-duplicates and keep
the best-scored (else the largest) of each group, then drop what scores below the threshold.
Everything is recorded in report.json (every score, every group); ``scores_hist.png`` and the
contact sheets ``dropped_aesthetic.png`` / ``duplicates.png`` show what was removed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kolors_story.config import FilterSettings, ScorerSettings
from kolors_story.data.candidates import DataError, Dropped
from kolors_story.data.preflight import StagedImage, rgb_batches

HIST_FILE = "scores_hist.png"
DROPPED_SHEET = "dropped_aesthetic.png"
DUPLICATES_SHEET = "duplicates.png"
HASH_BITS = 64  # imagehash.phash with hash_size 8
SCORE_CHUNK = 64  # images held in memory at once while scoring


@dataclass
class Curation:
    kept: list[StagedImage]
    dropped: list[Dropped] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)  # source name -> aesthetic score
    groups: list[dict] = field(default_factory=list)  # {"kept": name, "dropped": [names], "distance": max}
    pictures: list[str] = field(default_factory=list)  # file names written into data_dir


def enabled(recipe: FilterSettings) -> bool:
    return recipe.min_aesthetic is not None or bool(recipe.dedup)


def check_curation(recipe: FilterSettings) -> None:
    """The curation keys are sane (before any work)."""
    if recipe.min_aesthetic is not None:
        try:
            float(recipe.min_aesthetic)
        except (TypeError, ValueError):
            raise DataError(f"filter.min_aesthetic={recipe.min_aesthetic!r}: give a score such as 5.0, or null",
                            step="curation") from None
    if not 0 <= int(recipe.dedup_distance) < HASH_BITS:
        raise DataError(f"filter.dedup_distance={recipe.dedup_distance}: a Hamming distance in [0, {HASH_BITS}) "
                        "(0 = identical hashes only; 6 is a usual near-duplicate threshold)", step="curation")


def scorer_fingerprint(scorer: ScorerSettings) -> str:
    """Which predictor scored: its files' sampled fingerprints (a different predictor rebuilds the dataset)."""
    from kolors_story.models.loading import file_fingerprint

    folder = Path(str(scorer.path)).expanduser()
    h = hashlib.sha256()
    for f in sorted(p for p in folder.glob("*") if p.is_file()):
        h.update(f"{file_fingerprint(f)}\n".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------ aesthetic score


def score_images(kept: list[StagedImage], scorer: ScorerSettings, progress: bool) -> dict[str, float]:
    """The competition's aesthetic score of each staged image, batched; the model is released after."""
    import gc

    from kolors_story.evaluate.scorer import AestheticScorer

    model = AestheticScorer.from_settings(scorer)
    scores: dict[str, float] = {}
    try:
        for chunk, images in rgb_batches(kept, SCORE_CHUNK, "aesthetic curation", progress):
            scores.update(zip((s.name for s in chunk), model.score(images)))
    finally:
        del model
        gc.collect()
    return scores


# ------------------------------------------------------------------------------ near-duplicates


def perceptual_hashes(kept: list[StagedImage]) -> np.ndarray:
    """``[N, 64]`` bool: imagehash's pHash (DCT of a 32x32 grey thumbnail) of each image."""
    import imagehash
    from PIL import Image

    rows = []
    for s in kept:
        with Image.open(s.staged) as im:
            rows.append(np.asarray(imagehash.phash(im).hash, dtype=bool).reshape(-1))
    return np.stack(rows) if rows else np.zeros((0, HASH_BITS), dtype=bool)


def duplicate_groups(hashes: np.ndarray, max_distance: int) -> list[list[int]]:
    """Indices grouped transitively by Hamming distance <= ``max_distance`` (groups of 2+, in order)."""
    n = len(hashes)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    bits = hashes.astype(np.int32)
    for start in range(0, n, 1024):  # distance matrix a block of rows at a time
        block = bits[start : start + 1024]
        dist = block @ (1 - bits).T + (1 - block) @ bits.T
        for i, j in zip(*np.nonzero(dist <= max_distance)):
            a, b = root(start + int(i)), root(int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def _best(group: list[int], kept: list[StagedImage], scores: dict[str, float]) -> int:
    """The image a group keeps: the best-scored, else the most pixels, else the first."""
    def key(i: int):
        s = kept[i]
        return (scores.get(s.name, 0.0), s.width * s.height, -i)

    return max(group, key=key)


def dedup(kept: list[StagedImage], scores: dict[str, float], max_distance: int) -> tuple[list[int], list[dict]]:
    """(indices dropped as duplicates, the groups for the report)."""
    hashes = perceptual_hashes(kept)
    dropped, report = [], []
    for group in duplicate_groups(hashes, max_distance):
        best = _best(group, kept, scores)
        others = [i for i in group if i != best]
        dist = max(int((hashes[best] != hashes[i]).sum()) for i in others)
        dropped.extend(others)
        report.append({"kept": kept[best].name, "dropped": [kept[i].name for i in others], "distance": dist})
    return sorted(dropped), report


# ------------------------------------------------------------------------------ the step


def curate(kept: list[StagedImage], recipe: FilterSettings, scorer: ScorerSettings | None, data_dir: Path,
           progress: bool = True) -> Curation:
    """Dedup then the aesthetic threshold on the preflighted images; writes the pictures into ``data_dir``
    (pictures of an earlier run are removed first, so none is left over from other settings)."""
    from kolors_story.data.curation_pictures import contact_sheet, score_histogram

    for stale in (HIST_FILE, DROPPED_SHEET, DUPLICATES_SHEET):
        (data_dir / stale).unlink(missing_ok=True)
    out = Curation(kept=list(kept))
    threshold = None if recipe.min_aesthetic is None else float(recipe.min_aesthetic)
    if threshold is not None:
        if scorer is None:
            raise DataError("filter.min_aesthetic needs the scorer settings (the `scorer` group)", step="curation")
        out.scores = score_images(kept, scorer, progress)
    if recipe.dedup:
        gone, out.groups = dedup(kept, out.scores, int(recipe.dedup_distance))
        for g in out.groups:
            out.dropped += [Dropped(name, "curation", f"near-duplicate of {g['kept']} (perceptual hash distance "
                                    f"<= {g['distance']})", "dedup") for name in g["dropped"]]
        gone_set = set(gone)
        out.kept = [s for i, s in enumerate(kept) if i not in gone_set]
        if out.groups:
            by_name = {s.name: s for s in kept}
            contact_sheet([[by_name[g["kept"]], *(by_name[n] for n in g["dropped"])] for g in out.groups],
                          data_dir / DUPLICATES_SHEET, out.scores, keep_first=True)
            out.pictures.append(DUPLICATES_SHEET)
    if threshold is not None:
        low = [s for s in out.kept if out.scores[s.name] < threshold]
        out.dropped += [Dropped(s.name, "curation", f"aesthetic score {out.scores[s.name]:.3f} < "
                                f"filter.min_aesthetic {threshold:g}", "min_aesthetic") for s in low]
        out.kept = [s for s in out.kept if out.scores[s.name] >= threshold]
        score_histogram(out.scores, threshold, data_dir / HIST_FILE)
        out.pictures.append(HIST_FILE)
        if low:
            contact_sheet([low], data_dir / DROPPED_SHEET, out.scores)
            out.pictures.append(DROPPED_SHEET)
    return out
