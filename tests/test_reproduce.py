"""`generate.py reproduce=<bundle | folder | manifest.json>`: regenerate and compare pixel by pixel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from kolors_story.generate.reproduce import ReproduceError, reproduce
from kolors_story.records import load_manifest
from tests.helpers import REPO, compose
from tests.test_generate import shared_bundle, shared_hires_best


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_model_dir):
    return shared_bundle(tmp_path_factory, tiny_model_dir)


def tamper(path):
    """Change one pixel by one grey level: invisible, but not the recorded image."""
    im = Image.open(path).convert("RGB")
    a = np.asarray(im).copy()
    a[10, 10, 0] = (int(a[10, 10, 0]) + 1) % 256
    Image.fromarray(a).save(path, pnginfo=None)


def test_same_settings_twice_give_byte_identical_pngs_and_the_bundle_reproduces_8_of_8(made, tmp_path):
    report = reproduce(made["bundle"], tmp_path / "again", progress=False)
    assert (report["identical"], report["total"], report["all_identical"]) == (8, 8, True)
    assert all(r["status"] == "identical" and r["bytes_identical"] and r["recorded_matches_manifest"]
               for r in report["images"])
    assert json.loads((tmp_path / "again" / "reproduce.json").read_text())["all_identical"] is True
    # it used the bundle's own LoRA copy (checked by sha256), not the original checkpoint path
    manifest = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert manifest["loras"][0]["path"] == str(made["bundle"] / "lora.safetensors")


def test_tampered_image_is_caught_even_with_moved_weights(made, tmp_path, tiny_model_dir):
    copy = tmp_path / "bundle"
    shutil.copytree(made["bundle"], copy)
    tamper(copy / "3.png")
    moved = tmp_path / "moved-model"
    shutil.copytree(tiny_model_dir, moved)  # the weights moved: model.path may be overridden
    report = reproduce(copy, tmp_path / "check", locations={"model.path": str(moved)}, progress=False)
    assert report["all_identical"] is False and report["identical"] == 7
    row = next(r for r in report["images"] if r["image"] == "3.png")
    assert row["status"] == "differs" and row["max_abs_diff"] == 1 and row["recorded_matches_manifest"] is False
    assert 0 < row["pixels_differing"] < 0.01
    assert report["model_hash_now"] == report["model_hash_recorded"]


def test_only_locations_may_change_and_bad_sources_are_named(made, tmp_path):
    from kolors_story.cli import reproduce_from_config

    cfg = compose("generate", [f"reproduce={made['bundle']}", "sampler.steps=3", f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="only model.path.*sampler.steps=3"):
        reproduce_from_config(cfg)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_manifest(tmp_path / "manifest.json")
    # a LoRA that changed since the images were made cannot reproduce them
    copy = tmp_path / "bundle"
    shutil.copytree(made["bundle"], copy)
    (copy / "lora.safetensors").write_bytes((copy / "lora.safetensors").read_bytes()[:-1] + b"\0")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["loras"][0]["path"] = str(tmp_path / "gone.safetensors")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ReproduceError, match="lora.safetensors.*other contents"):
        reproduce(copy, tmp_path / "x", progress=False)


@pytest.mark.slow
def test_hires_best_of_result_reproduces_from_its_manifest(tmp_path_factory, tiny_model_dir, tmp_path):
    made = shared_hires_best(tmp_path_factory)
    manifest = json.loads((made["out"] / "manifest.json").read_text())
    assert manifest["best_of"]["chosen"] == [s["chosen_candidate"] for s in manifest["scenes"]]
    report = reproduce(made["out"] / "manifest.json", tmp_path / "again", progress=False)
    assert report["all_identical"], report["images"]
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert again["best_of"]["selected_by"].startswith("recorded choice")  # no scorer needed to reproduce
    assert again["hires"] == manifest["hires"]


@pytest.mark.slow
def test_cli_exit_code_is_nonzero_when_an_image_differs(made, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(made["bundle"], copy)
    tamper(copy / "5.png")
    out = subprocess.run([sys.executable, "generate.py", f"reproduce={copy}", f"hydra.run.dir={tmp_path / 'run'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert out.returncode == 1, out.stderr[-3000:]
    assert "7/8 identical" in out.stdout and "NOT reproduced" in out.stdout, out.stdout[-2500:]
    assert "5.png  DIFFERS" in out.stdout and "1.png  identical" in out.stdout
