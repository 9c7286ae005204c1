"""Automatic captions in the data stage (dataset.captioner) with tiny random captioners of the real
classes (Qwen2-VL, Qwen2.5-VL), built offline in the released folder layout and loaded by the same
code as the real ones: which images get a caption in each mode, trigger words first, the reviewable
captions.csv whose edits survive a re-run and re-encode only the edited captions."""

from __future__ import annotations

import csv
import io
import json

import pytest
from PIL import Image

from kolors_story.errors import MissingFileError
from tests.helpers import compose, prepare


def _folder(root, captioned=(0, 1, 2)):
    """Six distinct images; those in ``captioned`` have a .txt caption."""
    root.mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (96 + 16 * i, 96), (40 * i, 200 - 30 * i, 90)).save(root / f"p{i}.jpg", quality=95)
        if i in captioned:
            (root / f"p{i}.txt").write_text(f"hand caption {i}", encoding="utf-8")
    return root


def _overrides(tmp_path, source, *extra, captioner="qwen2_vl"):
    return ["model=tiny", "dataset=folder", f"dataset.path={source}", "dataset.name=captions", "filter=none",
            f"data_dir={tmp_path / 'data'}", f"dataset.captioner={captioner}", "dataset.captioner_tiny=true",
            f"dataset.captioner_path={tmp_path / captioner}", "dataset.captioner_max_tokens=12", *extra]


def _csv(data_dir) -> list[dict]:
    return list(csv.DictReader(io.StringIO((data_dir / "captions.csv").read_text(encoding="utf-8"))))


def test_missing_mode_captions_only_the_images_without_one(tmp_path, offline_guard):
    source = _folder(tmp_path / "src")
    prepared = prepare(compose("train", _overrides(tmp_path, source, "dataset.caption_prefix='ink，'")), progress=False)
    captions = dict(zip(prepared.names, (c for _, c in prepared.items)))
    assert sorted(captions) == [f"p{i}.jpg" for i in range(6)]  # uncaptioned images are kept, not dropped
    for i in range(3):
        assert captions[f"p{i}.jpg"] == f"ink，hand caption {i}"  # untouched
    rows = {r["file"]: r for r in _csv(prepared.data_dir)}
    assert sorted(rows) == ["p3.jpg", "p4.jpg", "p5.jpg"]
    for name, row in rows.items():
        assert row["generated"] and row["final"] == "ink，" + row["generated"] == captions[name]  # trigger first
        assert len(row["sha256"]) == 64 and row["source_caption"] == ""
    report = json.loads((prepared.data_dir / "report.json").read_text(encoding="utf-8"))
    assert report["counts"]["captions"] == {"in": 6, "kept": 6, "dropped": 0, "generated": 3, "reused": 0}
    assert offline_guard == ([], [])  # no dj-process (filter=none), no pip, no hub


@pytest.mark.parametrize("captioner", ["qwen2_vl", "qwen2_5_vl"])
def test_replace_and_append_modes(tmp_path, captioner):
    source = _folder(tmp_path / "src")
    replaced = prepare(compose("train", _overrides(tmp_path, source, "dataset.caption_mode=replace",
                                                   captioner=captioner)), progress=False)
    rows = {r["file"]: r for r in _csv(replaced.data_dir)}
    assert sorted(rows) == [f"p{i}.jpg" for i in range(6)]
    assert dict(zip(replaced.names, (c for _, c in replaced.items))) == {n: r["final"] for n, r in rows.items()}
    assert all(r["final"] == r["generated"] for r in rows.values())
    appended = prepare(compose("train", _overrides(tmp_path, source, "dataset.caption_mode=append",
                                                   "dataset.caption_language=en", captioner=captioner)),
                       progress=False)
    report = json.loads((appended.data_dir / "report.json").read_text(encoding="utf-8"))
    assert report["counts"]["captions"]["generated"] == 0  # same images: the generated text is reused
    captions = dict(zip(appended.names, (c for _, c in appended.items)))
    assert captions["p0.jpg"] == f"hand caption 0, {rows['p0.jpg']['generated']}"
    assert captions["p4.jpg"] == rows["p4.jpg"]["generated"]


def test_edits_in_captions_csv_survive_and_re_encode_only_the_edited_caption(tmp_path):
    from kolors_story.config.compose import to_settings
    from kolors_story.data.cache import build_cache

    source = _folder(tmp_path / "src")
    cfg = compose("train", _overrides(tmp_path, source))
    job = to_settings(cfg, "train")
    first = prepare(cfg, progress=False)
    build_cache(job.model, first, data_dir=job.data_dir, resolution=64)
    path = first.data_dir / "captions.csv"
    text = path.read_text(encoding="utf-8")
    row = _csv(first.data_dir)[1]
    path.write_text(text.replace("," + row["final"] + "\n", ",a fox under the moon\n"), encoding="utf-8")

    second = prepare(cfg, progress=False)
    assert not second.reused  # the edited csv is part of the dataset fingerprint
    captions = dict(zip(second.names, (c for _, c in second.items)))
    assert captions[row["file"]] == "a fox under the moon"
    report = json.loads((second.data_dir / "report.json").read_text(encoding="utf-8"))
    assert report["captions"]["edited"] == 1 and report["counts"]["captions"]["generated"] == 0
    assert {r["file"]: r["final"] for r in _csv(second.data_dir)}[row["file"]] == "a fox under the moon"
    cache = build_cache(job.model, second, data_dir=job.data_dir, resolution=64)
    assert cache.stats["embeds_computed"] == 1 and cache.stats["latents_computed"] == 0
    assert prepare(cfg, progress=False).reused  # nothing changed since: reused as it is


def test_missing_captioner_weights_name_the_download(tmp_path):
    source = _folder(tmp_path / "src")
    overrides = [o for o in _overrides(tmp_path, source) if o != "dataset.captioner_tiny=true"]
    with pytest.raises(MissingFileError, match="python -m kolors_story.download captioner"):
        prepare(compose("train", overrides), progress=False)
