"""The lowres_anime source through a stand-in for ``modelscope.msdatasets`` (no network here)."""

from __future__ import annotations

import sys
import types

import pytest
from PIL import Image

from kolors_story.data import DataError
from tests.helpers import compose, prepare


def _fake_modelscope(monkeypatch, load):
    """Install a ``modelscope.msdatasets`` module whose ``MsDataset.load`` is ``load``."""
    module = types.ModuleType("modelscope.msdatasets")
    module.MsDataset = type("MsDataset", (), {"load": staticmethod(load)})
    monkeypatch.setitem(sys.modules, "modelscope.msdatasets", module)


def _cfg(tmp_path, *extra):
    return compose("train", ["model=tiny", "dataset=lowres_anime", "filter=none", f"data_dir={tmp_path / 'data'}", *extra])


def test_lowres_anime_downloads_once_with_the_baseline_caption(tmp_path, monkeypatch):
    calls = []

    def load(repo, **kw):
        calls.append((repo, kw))
        rows = [{"image": Image.new("RGB", (96 + 8 * i, 64), (40 * i, 90, 200))} for i in range(4)]
        rows.insert(2, {"image": None})  # a row without an image is reported, not fatal
        rows.append({"image": Image.new("CMYK", (64, 64), (0, 0, 0, 0))})
        return rows

    _fake_modelscope(monkeypatch, load)
    prepared = prepare(_cfg(tmp_path), progress=False)
    assert calls[0][0] == "AI-ModelScope/lowres_anime"
    assert calls[0][1]["subset_name"] == "default" and calls[0][1]["split"] == "train"
    assert [c for _, c in prepared.items] == ["二次元"] * 5
    with Image.open(prepared.items[4][0]) as im:  # the CMYK row, converted
        assert im.mode == "RGB" and im.size == (64, 64)
    assert [d["file"] for d in prepared.report["dropped"]] == ["AI-ModelScope/lowres_anime row 2"]
    assert "image not readable" in prepared.report["dropped"][0]["reason"]

    # Second run: the images are on disk, nothing is downloaded again.
    again = prepare(_cfg(tmp_path), progress=False)
    assert len(calls) == 1 and again.reused and again.dataset_hash == prepared.dataset_hash
    # limit + caption_prefix change what is written: downloaded again, captions prefixed.
    third = prepare(_cfg(tmp_path, "dataset.limit=2", "dataset.caption_prefix='anime, '"), progress=False)
    assert len(calls) == 2 and [c for _, c in third.items] == ["anime, 二次元"] * 2


def test_lowres_anime_network_failure_is_a_clear_error(tmp_path, monkeypatch):
    def load(repo, **kw):
        raise ConnectionError("Failed to establish a new connection: [Errno -3] Temporary failure in name resolution")

    _fake_modelscope(monkeypatch, load)
    with pytest.raises(DataError) as err:
        prepare(_cfg(tmp_path), progress=False)
    msg = str(err.value)
    assert "could not download ModelScope dataset AI-ModelScope/lowres_anime" in msg
    assert "ConnectionError" in msg and "network" in msg and "dataset=folder" in msg
    assert err.value.step == "source" and (tmp_path / "data" / "report.failed.json").is_file()


def test_lowres_anime_failing_midway_and_missing_loader(tmp_path, monkeypatch):
    def rows():
        yield {"image": Image.new("RGB", (64, 64))}
        raise TimeoutError("read timed out")

    _fake_modelscope(monkeypatch, lambda repo, **kw: rows())
    with pytest.raises(DataError, match="failed part-way: TimeoutError"):
        prepare(_cfg(tmp_path), progress=False)

    monkeypatch.setitem(sys.modules, "modelscope.msdatasets", None)  # import fails like a missing extra
    with pytest.raises(DataError, match=r"modelscope's dataset loader does not import.*modelscope\[datasets\]"):
        prepare(_cfg(tmp_path), progress=False)
