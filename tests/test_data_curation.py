"""Curation in the data stage (filter.min_aesthetic, filter.dedup) on a folder of generated images:
exactly the images below the threshold go (checked against scores computed here with the same
tiny predictor), near-duplicates (resized / re-encoded copies) collapse to one each, the report
and the pictures are written, a re-run reuses, and nothing touches the network or installs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from kolors_story.data.candidates import DataError
from tests.helpers import compose, prepare, settings

N_DISTINCT = 8


def _pattern(seed: int, size=(160, 128)) -> Image.Image:
    """Coarse random colour blocks: strong low-frequency content, so pHashes of different seeds differ."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize(size, Image.NEAREST)


def _folder(root, duplicates: bool = False):
    """RGB JPEGs with .txt captions (preflight copies such files byte for byte)."""
    root.mkdir(parents=True)
    for i in range(N_DISTINCT):
        _pattern(i).save(root / f"img_{i}.jpg", quality=95)
        (root / f"img_{i}.txt").write_text(f"pattern {i}", encoding="utf-8")
    if duplicates:
        _pattern(0).resize((112, 90), Image.BILINEAR).save(root / "img_0_small.jpg", quality=95)
        _pattern(1).save(root / "img_1_q60.jpg", quality=60)
        _pattern(1).resize((120, 96), Image.BICUBIC).save(root / "img_1_small.jpg", quality=80)
        for name in ("img_0_small", "img_1_q60", "img_1_small"):
            (root / f"{name}.txt").write_text("copy", encoding="utf-8")
    return root


def _overrides(tmp_path, source, *extra):
    return ["model=tiny", "dataset=folder", f"dataset.path={source}", "dataset.name=curation", "filter=none",
            f"data_dir={tmp_path / 'data'}", f"scorer.path={tmp_path / 'scorer'}", *extra]


def test_aesthetic_curation_drops_exactly_the_images_below_the_threshold(tmp_path, offline_guard):
    from kolors_story.evaluate.scorer import AestheticScorer

    source = _folder(tmp_path / "src")
    job = settings("train", _overrides(tmp_path, source))
    scorer = AestheticScorer.from_settings(job.scorer)  # the same tiny predictor, scored here independently
    names = [f"img_{i}.jpg" for i in range(N_DISTINCT)]
    expected = dict(zip(names, scorer.score([Image.open(source / n).convert("RGB") for n in names])))
    threshold = float(np.median(list(expected.values())))
    prepared = prepare(compose("train", _overrides(tmp_path, source, f"filter.min_aesthetic={threshold}")),
                       progress=False)

    assert sorted(prepared.names) == sorted(n for n, s in expected.items() if s >= threshold)
    assert 0 < len(prepared.names) < N_DISTINCT
    report = json.loads((prepared.data_dir / "report.json").read_text(encoding="utf-8"))
    assert report["curation"]["scores"] == pytest.approx(expected, abs=1e-6)
    drops = {d["file"]: d for d in report["dropped"] if d["step"] == "curation"}
    assert set(drops) == {n for n, s in expected.items() if s < threshold}
    assert all(d["op"] == "min_aesthetic" and "aesthetic score" in d["reason"] for d in drops.values())
    assert report["counts"]["curation"] == {"in": N_DISTINCT, "kept": len(prepared.names), "dropped": len(drops)}
    for picture in ("scores_hist.png", "dropped_aesthetic.png"):
        with Image.open(prepared.data_dir / picture) as im:
            assert im.width > 100 and im.height > 100
    assert report["curation"]["pictures"] == ["scores_hist.png", "dropped_aesthetic.png"]
    spawned, connects = offline_guard
    assert spawned == [] and connects == []  # no dj-process (filter=none), no pip, no hub

    again = prepare(compose("train", _overrides(tmp_path, source, f"filter.min_aesthetic={threshold}")),
                    progress=False)
    assert again.reused and again.names == prepared.names
    lower = prepare(compose("train", _overrides(tmp_path, source, f"filter.min_aesthetic={min(expected.values())}")),
                    progress=False)
    assert not lower.reused and len(lower.names) == N_DISTINCT  # the threshold is part of the fingerprint
    assert not (lower.data_dir / "dropped_aesthetic.png").exists()  # no stale sheet from the earlier run


def test_near_duplicates_collapse_to_the_largest_copy(tmp_path, offline_guard):
    source = _folder(tmp_path / "src", duplicates=True)
    prepared = prepare(compose("train", _overrides(tmp_path, source, "filter.dedup=true")), progress=False)
    assert sorted(prepared.names) == sorted(f"img_{i}.jpg" for i in range(N_DISTINCT))  # every distinct image kept
    report = json.loads((prepared.data_dir / "report.json").read_text(encoding="utf-8"))
    groups = {g["kept"]: sorted(g["dropped"]) for g in report["curation"]["duplicate_groups"]}
    assert groups == {"img_0.jpg": ["img_0_small.jpg"], "img_1.jpg": ["img_1_q60.jpg", "img_1_small.jpg"]}
    assert all(g["distance"] <= 6 for g in report["curation"]["duplicate_groups"])
    with Image.open(prepared.data_dir / "duplicates.png") as im:
        assert im.height >= 2 * 128  # one row per group
    assert offline_guard == ([], [])


def test_curation_settings_and_an_empty_result_are_named(tmp_path):
    source = _folder(tmp_path / "src")
    with pytest.raises(DataError, match="filter.dedup_distance=64"):
        prepare(compose("train", _overrides(tmp_path, source, "filter.dedup=true", "filter.dedup_distance=64")),
                progress=False)
    with pytest.raises(DataError, match="curation removed every image") as err:
        prepare(compose("train", _overrides(tmp_path, source, "filter.min_aesthetic=1e9")), progress=False)
    assert err.value.step == "curation"
    assert (tmp_path / "data" / "report.failed.json").is_file()
