"""The default data-juicer recipe on the demo set, run for real as a dj-process subprocess (once per
module: it takes ~15 s to start), with a watchdog in the subprocess that records every process it
spawns and refuses every non-loopback connection."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from kolors_story.tiny.demo import DEMO_SIZES, draw_demo_image, make_demo_dataset
from tests.helpers import compose, prepare, run_data_stage

pytestmark = pytest.mark.slow  # one real dj-process run (~15-60 s on a busy 2-core CPU) shared by the module

WATCHDOG = '''
import os, socket, subprocess, sys
_LOG = os.environ["KS_WATCHDOG_LOG"]
def _log(msg):
    with open(_LOG, "a", encoding="utf-8") as f:
        f.write(msg + "\\n")
_log("started " + " ".join(sys.argv))
_popen_init = subprocess.Popen.__init__
def _popen(self, args, *a, **kw):
    _log("spawn " + repr(args))
    return _popen_init(self, args, *a, **kw)
subprocess.Popen.__init__ = _popen
_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex
def _guard(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
        _log("connect " + repr(address))
        raise OSError("network blocked by the test watchdog")
socket.socket.connect = lambda self, address: (_guard(self, address), _connect(self, address))[1]
socket.socket.connect_ex = lambda self, address: (_guard(self, address), _connect_ex(self, address))[1]
'''


def _keep(w: int, h: int) -> bool:
    """The baseline recipe: min 1024 x 1024, aspect w/h in [0.5, 2.0], bounds inclusive."""
    return w >= 1024 and h >= 1024 and 0.5 <= w / h <= 2.0


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    hook = root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(WATCHDOG, encoding="utf-8")
    log = root / "watchdog.log"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(hook))  # dj-process inherits it: the watchdog loads at its start
        mp.setenv("KS_WATCHDOG_LOG", str(log))
        cfg = compose("train", ["model=tiny", "dataset=demo", f"data_dir={root / 'data'}"])
        prepared = prepare(cfg, progress=False)
    return prepared, log, cfg, root


def test_default_recipe_keeps_exactly_the_images_within_the_bounds(demo_run):
    prepared, _, _, _ = demo_run
    raw = prepared.data_dir / "raw"
    sizes = {}
    for p in sorted(raw.glob("ink_*.*")):
        with Image.open(p) as im:
            sizes[p.name] = im.size
    assert len(sizes) == len(DEMO_SIZES) == 24
    expected = sorted(n for n, (w, h) in sizes.items() if _keep(w, h))
    # The set straddles every bound, so the check means something: on-bound sizes kept, just-outside dropped.
    on_bounds = {(1024, 1024), (2048, 1024), (1024, 2048)}
    assert on_bounds <= {sizes[n] for n in expected}
    assert {(1023, 1024), (1024, 1000), (2080, 1024), (1024, 2080)} <= {s for n, s in sizes.items() if n not in expected}
    assert 0 < len(expected) < len(sizes)

    assert prepared.names == expected
    for (path, caption), name in zip(prepared.items, prepared.names):
        with Image.open(path) as im:
            assert im.size == sizes[name] and im.mode == "RGB"
        assert caption.startswith("水墨画风格")

    r = prepared.report
    dropped = {d["file"]: d for d in r["dropped"]}
    assert set(dropped) == set(sizes) - set(expected)
    assert all(d["step"] == "filter" for d in dropped.values())
    ops = {o["op"]: o for o in r["counts"]["filter"]["ops"]}
    shape_fail = [n for n, (w, h) in sizes.items() if not (w >= 1024 and h >= 1024)]
    assert ops["image_shape_filter"] == {"op": "image_shape_filter", "in": 24, "kept": 24 - len(shape_fail), "dropped": len(shape_fail)}
    assert ops["image_aspect_ratio_filter"]["kept"] == len(expected)
    for name in shape_fail:
        assert dropped[name]["op"] == "image_shape_filter"
        w, h = sizes[name]
        assert f"image_width={w}, image_height={h}" in dropped[name]["reason"]
    assert dropped["ink_17.jpg"]["op"] == "image_aspect_ratio_filter"
    assert r["counts"]["final"] == len(expected) and r["counts"]["preflight"]["dropped"] == 0


def test_data_juicer_really_ran_hardened(demo_run):
    prepared, _, _, _ = demo_run
    f = prepared.report["filter"]
    assert f["ran"] and f["name"] == "default" and f["notes"] == []  # per-op counts parsed from dj's own log
    export = Path(f["export"])
    rows = [json.loads(line) for line in export.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(prepared.items)
    log = Path(f["log"]).read_text(encoding="utf-8")
    assert "OP [image_shape_filter] Done" in log and "OP [image_aspect_ratio_filter] Done" in log
    recipe = yaml.safe_load((export.parent.parent / "recipe.yaml").read_text(encoding="utf-8"))
    assert all(next(iter(op.values()))["batch_size"] == 1 for op in recipe["process"])
    assert Path(recipe["ds_cache_dir"]).is_relative_to(prepared.data_dir)
    assert Path(recipe["work_dir"]).is_relative_to(prepared.data_dir)


def test_no_network_and_no_install_happened(demo_run):
    prepared, log, _, _ = demo_run
    lines = log.read_text(encoding="utf-8").splitlines()
    assert any(line.startswith("started") and "dj-process" in line for line in lines), lines[:3]  # the watchdog was live
    assert not [line for line in lines if line.startswith("connect")]
    spawned = [line for line in lines if line.startswith("spawn")]
    assert not [line for line in spawned if "pip" in line or "install" in line or "'uv'" in line], spawned
    dj_log = Path(prepared.report["filter"]["log"]).read_text(encoding="utf-8").lower()
    assert "installing" not in dj_log and "pip install" not in dj_log


def test_second_run_reuses_without_running_data_juicer(demo_run, capsys):
    prepared, _, cfg, _ = demo_run
    log = Path(prepared.report["filter"]["log"])
    mtime = log.stat().st_mtime_ns
    again = run_data_stage(cfg)
    out = capsys.readouterr().out
    assert again.reused and again.dataset_hash == prepared.dataset_hash and again.items == prepared.items
    assert log.stat().st_mtime_ns == mtime
    assert f"{len(prepared.items)} training images, reused" in out
    assert "image_shape_filter -" in out and str(prepared.train_dir) in out and prepared.dataset_hash in out


def test_filter_none_keeps_every_demo_image(demo_run, tmp_path):
    prepared, _, _, _ = demo_run
    raw = prepared.data_dir / "raw"
    cfg = compose("train", ["model=tiny", "dataset=demo", f"dataset.path={raw}", "filter=none", f"data_dir={tmp_path}"])
    out = prepare(cfg, progress=False)
    assert len(out.items) == 24 and out.report["counts"]["filter"]["ops"] == []
    assert not out.report["filter"]["ran"] and not (tmp_path / "work" / "data_juicer").exists()


def test_demo_is_deterministic_and_captioned(demo_run):
    prepared, _, _, _ = demo_run
    raw = prepared.data_dir / "raw"
    meta = [json.loads(line) for line in (raw / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [m["file_name"][:6] for m in meta] == [f"ink_{i:02d}" for i in range(24)]
    assert len({m["text"] for m in meta}) >= 20 and all("水墨画风格" in m["text"] for m in meta)
    for i in (0, 15):  # redraw two images: identical pixels, identical file bytes
        w, h, _ = DEMO_SIZES[i]
        im, caption = draw_demo_image(i, w, h, seed=0)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=92)
        assert buf.getvalue() == (raw / f"ink_{i:02d}.jpg").read_bytes() and caption == meta[i]["text"]
    other, _ = draw_demo_image(0, *DEMO_SIZES[0][:2], seed=1)
    assert other.tobytes() != draw_demo_image(0, *DEMO_SIZES[0][:2], seed=0)[0].tobytes()
    assert make_demo_dataset(raw) == raw  # already there: not redrawn


def test_ray_executor_keeps_the_same_images_with_the_same_report(demo_run, tmp_path):
    """filter.executor=ray: the default recipe on the demo set through data-juicer's Ray executor (a
    Ray instance of its own, started and stopped with the run), offline, under the same watchdog."""
    prepared, _, _, root = demo_run
    hook = root / "hook"
    log = tmp_path / "watchdog.log"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(hook))
        mp.setenv("KS_WATCHDOG_LOG", str(log))
        cfg = compose("train", ["model=tiny", "dataset=demo", f"dataset.path={prepared.data_dir / 'raw'}",
                                f"data_dir={tmp_path / 'data'}", "filter.executor=ray"])
        ray_run = prepare(cfg, progress=False)
    assert ray_run.names == prepared.names  # exactly the same images, in the same order
    assert [c for _, c in ray_run.items] == [c for _, c in prepared.items]
    assert ray_run.report["counts"]["filter"] == prepared.report["counts"]["filter"]  # same per-op counts
    assert ray_run.report["filter"]["notes"] == []
    assert {d["file"]: d["op"] for d in ray_run.report["dropped"]} == {d["file"]: d["op"] for d in
                                                                        prepared.report["dropped"]}
    recipe = yaml.safe_load((tmp_path / "data" / "work" / "data_juicer" / "recipe.yaml").read_text(encoding="utf-8"))
    assert (recipe["executor_type"], recipe["ray_address"]) == ("ray", "local")
    lines = log.read_text(encoding="utf-8").splitlines()
    assert any(line.startswith("started") and "dj-process" in line for line in lines)
    assert not [line for line in lines if line.startswith("connect")], [ln for ln in lines if "connect" in ln][:3]
    assert not [line for line in lines if line.startswith("spawn") and ("pip" in line or "install" in line)]
