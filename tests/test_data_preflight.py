"""Preflight and the processed dataset on a zoo of good and bad inputs (filter=none: no data-juicer)."""

from __future__ import annotations

import csv
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kolors_story.data import DataError, load_prepared
from kolors_story.data.processed import dataset_hash
from kolors_story.files import file_sha256
from tests.helpers import compose, prepare


def _noise_jpeg(seed: int, size=(128, 96)) -> bytes:
    arr = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _huge_png() -> bytes:
    """A valid PNG header declaring 40000 x 40000 RGB (1.6 G pixels) with almost no data."""
    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


def _write_zoo(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Images with same-name .txt captions. Returns (good name -> caption, bad name -> expected reason)."""
    root.mkdir(parents=True)
    good, bad = {}, {}

    def caption(name, text):
        (root / (Path(name).stem + ".txt")).write_text(text, encoding="utf-8")

    (root / "good_rgb.jpg").write_bytes(_noise_jpeg(0))
    caption("good_rgb.jpg", "a noisy  picture\n")
    good["good_rgb.jpg"] = "a noisy picture"  # whitespace normalised
    Image.new("CMYK", (96, 80), (0, 255, 255, 0)).save(root / "cmyk.jpg", quality=95)
    caption("cmyk.jpg", "red square in CMYK")
    good["cmyk.jpg"] = "red square in CMYK"
    rgba = Image.new("RGBA", (80, 80), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 40, 80))  # left half fully transparent (black but invisible)
    rgba.save(root / "rgba.png")
    caption("rgba.png", "half transparent")
    good["rgba.png"] = "half transparent"
    Image.fromarray(np.full((64, 72), 32896, np.uint16)).save(root / "gray16.png")  # 16-bit, mid grey
    caption("gray16.png", "16-bit grey")
    good["gray16.png"] = "16-bit grey"
    pal = Image.new("P", (64, 64), 1)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    pal.save(root / "palette.png", transparency=0)
    caption("palette.png", "palette green")
    good["palette.png"] = "palette green"
    Image.new("L", (70, 50), 90).save(root / "gray8.png")
    caption("gray8.png", "8-bit grey")
    good["gray8.png"] = "8-bit grey"

    data = bytearray(_noise_jpeg(1))
    for i in range(1000, 1200):
        data[i] = 0xFF if i % 2 else 0x00
    (root / "corrupt.jpg").write_bytes(bytes(data))
    caption("corrupt.jpg", "x")
    bad["corrupt.jpg"] = "corrupt image data"
    data = _noise_jpeg(2)
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    caption("truncated.jpg", "x")
    bad["truncated.jpg"] = "truncated image"
    (root / "zero.jpg").write_bytes(b"")
    caption("zero.jpg", "x")
    bad["zero.jpg"] = "zero-byte file"
    (root / "notes.jpg").write_text("these are my notes, not a picture\n", encoding="utf-8")
    caption("notes.jpg", "x")
    bad["notes.jpg"] = "not an image: the file contains text"
    (root / "huge.png").write_bytes(_huge_png())
    caption("huge.png", "x")
    bad["huge.png"] = "too many pixels: 40000x40000"
    (root / "empty_caption.jpg").write_bytes(_noise_jpeg(3))
    caption("empty_caption.jpg", "  \n")
    bad["empty_caption.jpg"] = "empty caption"
    (root / "uncaptioned.jpg").write_bytes(_noise_jpeg(4))
    bad["uncaptioned.jpg"] = "caption missing"
    (root / "orphan.txt").write_text("a caption whose image is gone", encoding="utf-8")
    bad["orphan.txt"] = "missing file"
    (root / "readme.md").write_text("not part of the dataset", encoding="utf-8")
    return good, bad


def _cfg(tmp_path: Path, path: Path, *extra: str):
    return compose("train", ["model=tiny", "dataset=folder", f"dataset.path={path}", "filter=none",
                             f"data_dir={tmp_path / 'data'}", *extra])


def _csv_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture()
def zoo(tmp_path):
    good, bad = _write_zoo(tmp_path / "zoo")
    return tmp_path / "zoo", good, bad


def test_zoo_keeps_every_good_image_and_reports_every_bad_one(tmp_path, zoo):
    root, good, bad = zoo
    prepared = prepare(_cfg(tmp_path, root), progress=False)
    report = json.loads((tmp_path / "data" / "report.json").read_text(encoding="utf-8"))
    assert report == prepared.report and report["status"] == "ok"

    # Good images: all kept, in source order, with their captions, as RGB JPEGs.
    assert prepared.names == sorted(good)
    assert [c for _, c in prepared.items] == [good[n] for n in sorted(good)]
    rows = _csv_rows(prepared.metadata_csv)
    assert [r["file_name"] for r in rows] == [f"{i}.jpg" for i in range(len(good))]
    assert [r["text"] for r in rows] == [good[n] for n in sorted(good)]
    for path, _ in prepared.items:
        with Image.open(path) as im:
            assert (im.format, im.mode) == ("JPEG", "RGB")

    # Every bad file is reported once, by name, with its reason.
    dropped = {d["file"]: d for d in report["dropped"]}
    assert set(dropped) == set(bad)
    for name, reason in bad.items():
        assert reason in dropped[name]["reason"], (name, dropped[name])
        assert dropped[name]["step"] == "preflight"
    assert report["counts"]["source"] == len(good) + len(bad)
    assert report["counts"]["preflight"] == {"in": len(good) + len(bad), "kept": len(good), "dropped": len(bad)}
    assert report["counts"]["final"] == len(good)
    assert report["ignored"] == ["readme.md"]
    assert report["dataset_hash"] == prepared.dataset_hash == dataset_hash(
        [(file_sha256(p), c) for p, c in prepared.items])


def test_zoo_conversions_keep_what_a_viewer_sees(tmp_path, zoo):
    root, good, _ = zoo
    prepared = prepare(_cfg(tmp_path, root), progress=False)
    out = dict(zip(prepared.names, (p for p, _ in prepared.items)))

    # An RGB JPEG is copied byte for byte: its pixels are exactly the original's.
    assert out["good_rgb.jpg"].read_bytes() == (root / "good_rgb.jpg").read_bytes()

    def px(name, xy):
        with Image.open(out[name]) as im:
            return np.array(im.getpixel(xy), dtype=int)

    assert np.abs(px("cmyk.jpg", (48, 40)) - [255, 0, 0]).max() <= 3
    assert np.abs(px("rgba.png", (10, 40)) - [255, 255, 255]).max() <= 3  # transparent -> white, not black
    assert np.abs(px("rgba.png", (70, 40)) - [0, 0, 255]).max() <= 3
    assert np.abs(px("gray16.png", (30, 30)) - [128, 128, 128]).max() <= 2  # rescaled, not clipped to 255
    assert np.abs(px("palette.png", (30, 30)) - [0, 200, 0]).max() <= 3
    assert np.abs(px("gray8.png", (30, 30)) - [90, 90, 90]).max() <= 2
    conv = {c["file"]: c["conversion"] for c in prepared.report["converted"]}
    assert conv["cmyk.jpg"] == "CMYK -> RGB" and conv["gray16.png"] == "I;16 -> RGB" and "good_rgb.jpg" not in conv


def test_fail_policy_stops_with_the_full_list_and_keeps_the_previous_dataset(tmp_path, zoo):
    root, good, bad = zoo
    ok_dir = tmp_path / "ok"
    ok_dir.mkdir()
    for name in ("good_rgb.jpg", "good_rgb.txt"):
        (ok_dir / name).write_bytes((root / name).read_bytes())
    first = prepare(_cfg(tmp_path, ok_dir), progress=False)
    before = {p.name: p.read_bytes() for p in first.train_dir.iterdir()}

    with pytest.raises(DataError) as err:
        prepare(_cfg(tmp_path, root, "dataset.on_bad_file=fail"), progress=False)
    msg = str(err.value)
    assert "dataset.on_bad_file=fail" in msg and f"{len(bad)} bad file(s)" in msg
    for name in bad:
        assert name in msg
    assert err.value.step == "preflight"
    assert {d["file"] for d in err.value.report["dropped"]} == set(bad)
    failed = json.loads((tmp_path / "data" / "report.failed.json").read_text(encoding="utf-8"))
    assert failed["status"] == "failed" and {d["file"] for d in failed["dropped"]} == set(bad)

    # The earlier good result is untouched and still loads.
    assert {p.name: p.read_bytes() for p in first.train_dir.iterdir()} == before
    again = load_prepared(tmp_path / "data")
    assert again.dataset_hash == first.dataset_hash and len(again.items) == 1


def test_all_bad_dataset_stops_saying_preflight_removed_everything(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"")
    (root / "a.txt").write_text("x")
    (root / "b.jpg").write_text("not an image")
    (root / "b.txt").write_text("x")
    with pytest.raises(DataError, match="preflight removed every image") as err:
        prepare(_cfg(tmp_path, root), progress=False)
    assert "a.jpg: zero-byte file" in str(err.value) and "b.jpg: not an image" in str(err.value)
    assert not (tmp_path / "data" / "train").exists()
    assert (tmp_path / "data" / "report.failed.json").is_file()


def test_empty_source_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="source step found no images"):
        prepare(_cfg(tmp_path, tmp_path / "empty"), progress=False)
    with pytest.raises(DataError, match="dataset folder not found"):
        prepare(_cfg(tmp_path, tmp_path / "nowhere"), progress=False)


@pytest.mark.parametrize("content", ["", "file_name,text\n"])
def test_empty_metadata_is_reported(tmp_path, content):
    root = tmp_path / "meta"
    root.mkdir()
    (root / "a.jpg").write_bytes(_noise_jpeg(0))
    (root / "metadata.csv").write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="empty metadata") as err:
        prepare(_cfg(tmp_path, root), progress=False)
    assert "metadata.csv" in str(err.value)
    assert err.value.report["dropped"] == [{"file": "metadata.csv", "step": "source", "reason": "empty metadata: metadata.csv has no rows"}]


def test_metadata_csv_rows_prefix_and_rows_pointing_nowhere(tmp_path):
    root = tmp_path / "meta"
    (root / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.jpg", "sub/b.jpg", "c.jpg", "unlisted.jpg"]):
        (root / name).write_bytes(_noise_jpeg(i))
    with open(root / "metadata.csv", "w", encoding="utf-8-sig", newline="") as f:  # BOM, as pandas writes it
        w = csv.writer(f)
        w.writerows([["file_name", "text"], ["a.jpg", "first, with a comma"], ["sub/b.jpg", "second"],
                     ["gone.jpg", "points nowhere"], ["c.jpg", ""]])
    prepared = prepare(_cfg(tmp_path, root, "dataset.caption_prefix='二次元，'"), progress=False)
    assert [c for _, c in prepared.items] == ["二次元，first, with a comma", "二次元，second"]
    assert prepared.names == ["a.jpg", "sub/b.jpg"]
    assert [r["text"] for r in _csv_rows(prepared.metadata_csv)] == ["二次元，first, with a comma", "二次元，second"]
    dropped = {d["file"]: d["reason"] for d in prepared.report["dropped"]}
    assert dropped["gone.jpg"].startswith("missing file: metadata.csv row 4 names gone.jpg")
    assert dropped["c.jpg"].startswith("empty caption: metadata.csv row 5")
    assert dropped["unlisted.jpg"] == "caption missing: unlisted.jpg is not listed in metadata.csv"

    # default_caption fills in for images that have none; the result is rebuilt (config changed).
    again = prepare(_cfg(tmp_path, root, "dataset.default_caption=ink style"), progress=False)
    assert not again.reused and dict(zip(again.names, (c for _, c in again.items)))["unlisted.jpg"] == "ink style"


def test_metadata_jsonl_with_a_broken_line(tmp_path):
    root = tmp_path / "meta"
    root.mkdir()
    (root / "a.png").write_bytes(_noise_jpeg(0))  # a JPEG named .png: content decides, not the name
    (root / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{not json\n', encoding="utf-8")
    prepared = prepare(_cfg(tmp_path, root), progress=False)
    assert [c for _, c in prepared.items] == ["ok"]
    assert prepared.report["dropped"][0]["file"] == "metadata.jsonl line 2"
    assert "invalid JSON" in prepared.report["dropped"][0]["reason"]


def test_unchanged_inputs_are_reused_and_a_changed_caption_rebuilds(tmp_path, zoo):
    root, good, _ = zoo
    first = prepare(_cfg(tmp_path, root), progress=False)
    second = prepare(_cfg(tmp_path, root), progress=False)
    assert second.reused and second.dataset_hash == first.dataset_hash and second.items == first.items
    (root / "cmyk.txt").write_text("a new caption", encoding="utf-8")
    third = prepare(_cfg(tmp_path, root), progress=False)
    assert not third.reused and third.dataset_hash != first.dataset_hash
    assert dict(zip(third.names, (c for _, c in third.items)))["cmyk.jpg"] == "a new caption"
    # A processed image edited by hand is noticed: the dataset is rebuilt instead of trusted.
    third.items[0][0].write_bytes(_noise_jpeg(99))
    fourth = prepare(_cfg(tmp_path, root), progress=False)
    assert not fourth.reused and fourth.dataset_hash == third.dataset_hash


def test_bad_policy_value_and_forbidden_op_fail_early(tmp_path, zoo):
    root, _, _ = zoo
    with pytest.raises(DataError, match="on_bad_file='maybe'"):
        prepare(_cfg(tmp_path, root, "dataset.on_bad_file=maybe"), progress=False)
    cfg = _cfg(tmp_path, root, "filter.process=[{image_deduplicator: {}}]")
    with pytest.raises(DataError, match="image_deduplicator is not allowed"):
        prepare(cfg, progress=False)


def test_a_run_killed_mid_swap_leaves_a_usable_dataset(tmp_path, zoo):
    root, _, _ = zoo
    first = prepare(_cfg(tmp_path, root), progress=False)
    data = tmp_path / "data"
    # Killed between "train -> .train.old-N" and ".train.tmp-N -> train", with a half-built temp dir.
    (data / "train").rename(data / ".train.old-4242")
    (data / ".train.tmp-4242").mkdir()
    (data / ".train.tmp-4242" / "0.jpg").write_bytes(b"half")
    again = prepare(_cfg(tmp_path, root), progress=False)
    assert again.reused and again.dataset_hash == first.dataset_hash
    assert sorted(p.name for p in data.iterdir() if p.name.startswith(".train")) == []


def test_parallel_preflight_equals_the_serial_one(tmp_path, zoo):
    """dataset.workers=2 (spawned processes) keeps the same files, with the same bytes, drops the same
    files for the same reasons, in the same order."""
    from kolors_story.data.preflight import preflight
    from kolors_story.data.sources import list_folder

    root, good, bad = zoo
    listing = list_folder(root)
    serial = preflight(listing.candidates, tmp_path / "serial", progress=False)
    parallel = preflight(list_folder(root).candidates, tmp_path / "parallel", progress=False, workers=2)
    assert [d.as_dict() for d in parallel.dropped] == [d.as_dict() for d in serial.dropped]
    assert len(serial.dropped) == len(bad) and len(serial.kept) == len(good)
    assert parallel.converted == serial.converted
    for a, b in zip(serial.kept, parallel.kept, strict=True):
        assert (a.id, a.name, a.caption, a.width, a.height, a.converted) == (b.id, b.name, b.caption, b.width,
                                                                              b.height, b.converted)
        assert a.staged.read_bytes() == b.staged.read_bytes()
    with pytest.raises(DataError, match="dataset.workers=0"):
        preflight(listing.candidates, tmp_path / "none", progress=False, workers=0)
    prepared = prepare(_cfg(tmp_path, root, "dataset.workers=2"), progress=False)  # through the data stage
    assert prepared.names == sorted(good)


@pytest.mark.parametrize("override,message", [
    ("filter.executor=foo", "filter.executor='foo'"), ("dataset.workers=0", "dataset.workers=0"),
    ("dataset.caption_mode=bad", "dataset.caption_mode='bad'"), ("dataset.caption_language=fr", "caption_language='fr'"),
    ("filter.dedup_distance=64", "filter.dedup_distance=64")])
def test_data_keys_are_checked_before_any_work(tmp_path, override, message):
    """train.py's checks (before any model or file is read) name a bad data-stage key, captioner off or on."""
    from kolors_story.train.checks import check_data_settings
    from tests.helpers import settings

    job = settings("train", ["model=tiny", "dataset=demo", "filter=none", override])
    with pytest.raises(DataError, match=message.replace("[", r"\[")):
        check_data_settings(job.dataset, job.filter)
