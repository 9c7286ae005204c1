"""What must hold when a user (or the machine) does something unexpected: nothing is read from
outside the dataset, nothing half-written is left looking complete, bad values stop the run before
any heavy work, and every user error is one line with exit code 2."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO, compose, prepare


def _image(path: Path, seed: int, size=(80, 64)) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


class FifoWatch:
    """Fails the test if anyone opens ``fifo`` for reading: a writer's non-blocking open succeeds
    only while a reader has it open (and it then unblocks that reader, so nothing hangs)."""

    def __init__(self, fifo: Path):
        self.fifo, self.opened, self._stop = fifo, False, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        while not self._stop.is_set():
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: no reader
                time.sleep(0.02)
                continue
            self.opened = True
            os.close(fd)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------- 1. nothing read from outside


def test_files_outside_the_dataset_folder_are_rejected_unread(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    trap = outside / "trap.png"
    os.mkfifo(trap)  # reading it would block: the watch sees any open
    secret = outside / "secret.png"
    _image(secret, 9)  # a valid image: if it were read, it would be trained on
    root = tmp_path / "ds"
    (root / "sub").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        _image(root / name, len(name))
    (root / "link_trap.png").symlink_to(trap)
    (root / "link_secret.png").symlink_to(secret)
    rows = ["a.png,first", "b.png,second", "../outside/trap.png,up", f"{secret},absolute", "link_trap.png,link",
            "sub/../../outside/secret.png,walk out"]
    (root / "metadata.csv").write_text("file_name,text\n" + "\n".join(rows) + "\n", encoding="utf-8")
    cfg = compose("train", ["model=tiny", "dataset=folder", f"dataset.path={root}", "filter=none",
                            f"data_dir={tmp_path / 'data'}"])
    with FifoWatch(trap) as watch:
        prepared = prepare(cfg, progress=False)
    assert not watch.opened, "a file outside the dataset folder was opened"
    assert [t for _, t in prepared.items] == ["first", "second"]
    outside_rows = {d["file"]: d["reason"] for d in prepared.report["dropped"] if "outside the dataset folder" in d["reason"]}
    assert set(outside_rows) == {"../outside/trap.png", str(secret), "link_trap.png", "sub/../../outside/secret.png",
                                 "link_secret.png"}
    assert all("allow_outside" in r for r in outside_rows.values())
    # the same folder with the switch: the image outside is a real training image then
    cfg = compose("train", ["model=tiny", "dataset=folder", f"dataset.path={root}", "filter=none",
                            f"data_dir={tmp_path / 'data2'}", "dataset.allow_outside=true"])
    (root / "metadata.csv").write_text(f"file_name,text\na.png,first\n{secret},absolute\n", encoding="utf-8")
    assert [t for _, t in prepare(cfg, progress=False).items] == ["first", "absolute"]


def test_a_caption_linked_from_outside_is_not_read(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    trap = outside / "caption.txt"
    os.mkfifo(trap)
    root = tmp_path / "ds"
    root.mkdir()
    _image(root / "a.png", 1)
    (root / "a.txt").write_text("a caption", encoding="utf-8")
    _image(root / "b.png", 2)
    (root / "b.txt").symlink_to(trap)
    cfg = compose("train", ["model=tiny", "dataset=folder", f"dataset.path={root}", "filter=none",
                            f"data_dir={tmp_path / 'data'}"])
    with FifoWatch(trap) as watch:
        prepared = prepare(cfg, progress=False)
    assert not watch.opened
    assert [t for _, t in prepared.items] == ["a caption"]
    assert any(d["file"] == "b.png" and "outside the dataset folder" in d["reason"] for d in prepared.report["dropped"])


# ------------------------------------------------------------- 2. outputs published as one unit


def _story_state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_disk_full_mid_generate_leaves_the_previous_story_whole(tmp_path, tiny_model_dir, monkeypatch):
    from kolors_story.cli import generate_from_config
    from kolors_story.errors import OutputExistsError
    from kolors_story.generate import outputs

    out = tmp_path / "story"
    first = generate_from_config(compose("generate", ["model=tiny", "sampler.steps=1", f"output_dir={out}"]))
    before = _story_state(out)
    manifest = json.loads(before["manifest.json"])
    assert set(manifest["images"]) == {f"{i}.png" for i in range(1, 9)} and len(first.images) == 8

    # a second run into the same folder is refused unless asked for, before any model work
    with pytest.raises(OutputExistsError, match="overwrite=true"):
        generate_from_config(compose("generate", ["model=tiny", "sampler.steps=2", f"output_dir={out}"]))

    real = outputs.atomic_save_image
    written = []

    def disk_full_at_the_fifth(image, path, **kw):
        if len(written) == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path)
        return real(image, path, **kw)

    monkeypatch.setattr(outputs, "atomic_save_image", disk_full_at_the_fifth)
    with pytest.raises(OSError) as err:
        generate_from_config(compose("generate", ["model=tiny", "sampler.steps=2", f"output_dir={out}",
                                                  "overwrite=true"]))
    assert err.value.errno == errno.ENOSPC
    assert _story_state(out) == before, "the previous story (images, panel, prompts, manifest) is untouched"
    assert [p for p in out.iterdir() if p.name.startswith(".")] == []  # no staging folder left behind

    monkeypatch.setattr(outputs, "atomic_save_image", real)  # disk space back: the new story replaces the old
    second = generate_from_config(compose("generate", ["model=tiny", "sampler.steps=2", f"output_dir={out}",
                                                       "overwrite=true"]))
    after = json.loads((out / "manifest.json").read_text())
    assert after["sampler"]["steps"] == 2 and after["images"] != manifest["images"]
    from kolors_story.files import file_sha256

    assert {p.name: file_sha256(p) for p in second.images} == after["images"]


# ----------------------------------------------------------------- 4. reproduce checks its record


@pytest.fixture(scope="module")
def small_story(tmp_path_factory, tiny_model_dir):
    from kolors_story.cli import generate_from_config

    out = tmp_path_factory.mktemp("story") / "out"
    generate_from_config(compose("generate", ["model=tiny", "sampler.steps=1", f"output_dir={out}"]))
    return out


@pytest.mark.parametrize("field, edit", [
    ("scenes[2].seed", lambda m: m["scenes"][2].update(seed=m["scenes"][2]["seed"] + 7)),
    ("scenes[4].prompt", lambda m: m["scenes"][4].update(prompt=m["scenes"][4]["prompt"] + "，水墨")),
    ("scenes[1].sha256", lambda m: m["scenes"][1].update(sha256="0" * 64)),
])
def test_an_edited_manifest_is_not_reproduced(small_story, tmp_path, field, edit):
    import shutil

    from kolors_story.generate.reproduce import format_report, reproduce

    copy = tmp_path / "copy"
    shutil.copytree(small_story, copy)
    manifest = json.loads((copy / "manifest.json").read_text(encoding="utf-8"))
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False), encoding="utf-8")
    report = reproduce(copy, tmp_path / "again", progress=False)
    assert report["identical"] == 8  # the pixels come back: only the record lies
    assert report["all_identical"] is False
    assert any(p.startswith(field) for p in report["manifest_problems"]), report["manifest_problems"]
    assert "NOT reproduced" in format_report(report) and field in format_report(report)


def test_an_untouched_manifest_has_no_problems(small_story, tmp_path):
    from kolors_story.generate.reproduce import reproduce

    report = reproduce(small_story, tmp_path / "again", progress=False)
    assert report["all_identical"] is True and report["manifest_problems"] == []


# ------------------------------------------------ 5/7. bad values refused before any heavy work


def _forbid_work(monkeypatch):
    """Any data-stage or model-loading call fails the test: checks must come first. (The modules
    are imported before patching, so no module binds a patched loader for later tests.)"""
    import kolors_story.cli
    import kolors_story.generate.checks
    import kolors_story.train.checks  # noqa: F401
    from kolors_story.generate import job as generate_run
    from kolors_story.models import loading
    from kolors_story.train import job as train_run

    def forbidden(*a, **k):
        raise AssertionError("heavy work started before the settings were checked")

    for module, name in ((train_run, "data_stage"), (train_run, "run_training"), (loading, "load_pipeline"),
                         (loading, "load_text_encoder"), (loading, "load_unet"), (loading, "load_vae"),
                         (generate_run, "load_pipeline")):
        monkeypatch.setattr(module, name, forbidden)


@pytest.mark.parametrize("override, message", [
    ("lora.rank=0", "lora.rank=0"),
    ("lora.rank=-1", "lora.rank=-1"),
    ("lora.alpha=0", "lora.alpha=0"),
    ("lora.target_modules=[to_qq]", "to_qq"),
    ("optim.lr=nan", "optim.lr=nan"),
    ("sampler.height=100", "sampler.height=100"),
    ("trainer.batch_size=0", "trainer.batch_size=0"),
    ("trainer.max_steps=0", "trainer.max_steps=0"),
    ("dataset.resolution=60", "dataset.resolution=60"),
    ("cache.devices=0", "cache.devices=0"),
    ("model.device=mps cache.devices=2", "model.device=cuda or cpu"),
])
def test_bad_training_values_are_refused_before_any_work(tmp_path, monkeypatch, tiny_model_dir, override, message):
    from kolors_story.cli import train_from_config
    from kolors_story.errors import SettingsError

    _forbid_work(monkeypatch)
    cfg = compose("train", ["model=tiny", "dataset=demo", f"data_dir={tmp_path / 'data'}",
                            f"output_dir={tmp_path / 'run'}", *override.split()])
    with pytest.raises(SettingsError, match=message.replace("[", r"\[")):
        train_from_config(cfg)
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()  # nothing written


def test_a_bad_lora_file_or_size_is_refused_before_the_model_loads(tmp_path, monkeypatch, tiny_model_dir):
    from kolors_story.cli import generate_from_config
    from kolors_story.errors import SettingsError, UserError

    _forbid_work(monkeypatch)
    junk = tmp_path / "style.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="style.safetensors"):
        generate_from_config(compose("generate", ["model=tiny", f"lora_path={junk}", f"output_dir={tmp_path / 'o'}"]))
    with pytest.raises(SettingsError, match="sampler.height=100"):
        generate_from_config(compose("generate", ["model=tiny", "sampler.height=100", f"output_dir={tmp_path / 'o'}"]))
    assert not (tmp_path / "o").exists()


def test_guidance_off_is_said_loudly(capsys):
    from kolors_story.generate.sampler import sampler_settings, warn_if_guidance_off

    with pytest.warns(UserWarning, match="negative prompts are ignored"):
        assert warn_if_guidance_off(sampler_settings(cfg=1.0, height=64, width=64, seeds=None))
    assert "sampler.cfg=1.0" in capsys.readouterr().out
    assert not warn_if_guidance_off(sampler_settings(cfg=4.0, height=64, width=64, seeds=None))


# ------------------------------------------------------------- 6. a failed resume touches nothing


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    from kolors_story.cli import train_from_config

    root = tmp_path_factory.mktemp("finished")
    images = root / "images"
    images.mkdir()
    for i in range(4):
        _image(images / f"{i}.png", i, size=(64, 64))
        (images / f"{i}.txt").write_text(f"a test image number {i}", encoding="utf-8")
    run = root / "run"
    cfg = compose("train", ["model=tiny", "dataset=folder", f"dataset.path={images}", "filter=none", "validate=false",
                            "logger=none", f"data_dir={root / 'data'}", f"output_dir={run}", "trainer.max_steps=2",
                            "trainer.max_epochs=null", "trainer.progress_bar=false"])
    train_from_config(cfg)
    return run


def test_a_failed_resume_leaves_the_run_byte_identical(finished_run, monkeypatch):
    from kolors_story.cli import train_from_config
    from kolors_story.errors import SettingsError, TrainingError

    before = (finished_run / "metrics.jsonl").read_bytes()
    assert json.loads(before.splitlines()[-1])["status"] == "finished"
    with pytest.raises(SettingsError, match="optim.lr=nan"):
        train_from_config(compose("train", [f"resume={finished_run}", "optim.lr=nan"]))
    assert (finished_run / "metrics.jsonl").read_bytes() == before

    # a damaged trainer state: named, not trusted, and never "load it with weights_only=False"
    state = finished_run / "checkpoints" / "step-000002" / "trainer_state.ckpt"
    original = state.read_bytes()
    try:
        state.write_bytes(b"\x80\x04garbage that is not a checkpoint")
        with pytest.raises(TrainingError) as err:
            train_from_config(compose("train", [f"resume={finished_run}", "trainer.max_steps=4"]))
        assert str(state) in str(err.value) and "not trusted" in str(err.value)
        assert "weights_only=False" not in str(err.value)
        assert (finished_run / "metrics.jsonl").read_bytes() == before
    finally:
        state.write_bytes(original)


# ----------------------------------------------------------------- 8. one line, exit code 2


@pytest.mark.slow
@pytest.mark.parametrize("script, args, needle", [
    ("train.py", ["model=tiny", "lora.rank=0"], "lora.rank=0"),
    ("generate.py", ["model=tiny", "lora_path=/nope/style.safetensors"], "/nope/style.safetensors"),
    ("generate.py", ["reproduce=/nope/bundle"], "/nope/bundle"),
    ("evaluate.py", ["images=/nope"], "/nope"),
    ("generate.py", ["model=tiny", "memory.keep_prompt_projections=maybe"], "memory.keep_prompt_projections=maybe"),
    ("train.py", ["model=tiny", "memory.fooo=1"], "'memory.fooo'"),  # Hydra's composition errors too
])
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, tiny_model_dir, script, args, needle):
    out = subprocess.run([sys.executable, script, *args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


# ----------------------------------------------------------------- 3. no orphaned dj-process


DATA_STAGE = """
import sys
from tests.helpers import compose, prepare
prepare(compose("train", ["model=tiny", "dataset=folder", f"dataset.path={sys.argv[1]}", "filter=relaxed",
                          f"data_dir={sys.argv[2]}"]), progress=False)
"""


def _running(marker: str) -> list[int]:
    """Processes (not zombies) whose command line contains ``marker``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal_name for signal_name in ("SIGTERM", "SIGKILL")])
def test_dj_process_dies_with_its_parent(tmp_path, sig):
    import signal

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        _image(images / f"{i}.png", i, size=(600, 600))
        (images / f"{i}.txt").write_text(f"image {i}", encoding="utf-8")
    data = tmp_path / "data"
    parent = subprocess.Popen([sys.executable, "-c", DATA_STAGE, str(images), str(data)], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    recipe = str((data / "work" / "data_juicer" / "recipe.yaml").resolve())
    deadline = time.monotonic() + 120
    while not _running(recipe) and time.monotonic() < deadline and parent.poll() is None:
        time.sleep(0.1)
    time.sleep(1.0)  # let dj-process get going (imports, workers)
    assert _running(recipe), "dj-process never started"
    parent.send_signal(getattr(signal, sig))
    parent.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _running(recipe) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(recipe), f"dj-process outlived its parent's {sig}"


def test_a_rerun_stops_a_stale_dj_process_of_its_folder(tmp_path):
    from kolors_story.data.filtering import PID_FILE, stop_stale_run

    work = tmp_path / "work" / "data_juicer"
    work.mkdir(parents=True)
    recipe = work / "recipe.yaml"
    # stands in for a dj-process whose parent and watchdog are both gone
    stale = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", str(recipe)],
                             start_new_session=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        (work / PID_FILE).write_text(f"{other.pid}\n")
        assert stop_stale_run(work) is None and other.poll() is None  # not this folder's: left alone
        (work / PID_FILE).write_text(f"{stale.pid}\n")
        note = stop_stale_run(work)
        assert note and str(stale.pid) in note
        assert stale.wait(timeout=10) == -9
    finally:
        for p in (stale, other):
            if p.poll() is None:
                p.kill()
