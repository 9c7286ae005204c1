"""The Hydra interface and the first main job (python generate.py model=tiny)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from PIL import Image

from kolors_story.story import scenes_from_config
from tests.conftest import REPO, compose


def _run(args, **kw):
    return subprocess.run([sys.executable, *args], cwd=kw.pop("cwd", REPO), capture_output=True, text=True,
                          env={**os.environ, **kw.pop("env", {})}, timeout=600, **kw)


@pytest.mark.parametrize("story", ["idol_diary", "ink_dream", "warrior_dragon"])
@pytest.mark.parametrize("language", ["zh", "en"])
def test_every_story_has_eight_scenes_in_both_languages(story, language):
    cfg = compose("generate", [f"story={story}", f"story.language={language}"])
    scenes = scenes_from_config(cfg.story, cfg.sampler)
    assert len(scenes) == 8
    assert all(s.prompt.strip() and s.negative.strip() and s.description.strip() for s in scenes)
    assert len({s.prompt for s in scenes}) == 8


def test_sampler_defaults_follow_the_baseline():
    cfg = compose("generate", ["model=kolors", "story=idol_diary"])
    assert (cfg.sampler.cfg, cfg.sampler.steps, cfg.sampler.height, cfg.sampler.width) == (4.0, 50, 1024, 1024)
    assert [s.seed for s in scenes_from_config(cfg.story, cfg.sampler)] == [0, 1, 2, 5, 0, 1, 7, 0]
    cfg = compose("generate", ["story=ink_dream", "sampler.base_seed=10"])
    assert [s.seed for s in scenes_from_config(cfg.story, cfg.sampler)] == list(range(10, 18))


def test_presets_and_trainer_defaults():
    cfg = compose("train", [])
    assert (cfg.lora.rank, cfg.lora.alpha) == (16, 4.0)
    assert compose("train", ["lora=entity"]).lora.rank == 4
    assert cfg.trainer.precision in ("16-mixed", "bf16-mixed") and cfg.trainer.gradient_checkpointing is True
    ops = {next(iter(op)): next(iter(op.values())) for op in cfg.filter.process}
    assert ops["image_shape_filter"]["min_width"] == 1024 and ops["image_shape_filter"]["min_height"] == 1024
    assert (ops["image_aspect_ratio_filter"]["min_ratio"], ops["image_aspect_ratio_filter"]["max_ratio"]) == (0.5, 2.0)


def test_every_config_key_has_a_comment():
    """Configs are the interface: each key line in conf/ carries a one-line comment."""
    missing = []
    for path in (REPO / "conf").rglob("*.yaml"):
        if path.parent.name == "story":
            continue  # story files are data (prompts); their header keys are checked below
        block = False
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            s = line.strip()
            if not s or s.startswith("#") or s.startswith("-") or line.startswith(" ") or s == "defaults:":
                continue
            if s in ("hydra:",) or block:
                block = True
                continue
            if "#" not in line:
                missing.append(f"{path.relative_to(REPO)}:{n}: {s}")
    assert not missing, "keys without a comment:\n" + "\n".join(missing)


def test_cli_help_cfg_and_unknown_key():
    out = _run(["train.py", "--help"])
    assert out.returncode == 0 and "model: kolors, tiny" in out.stdout
    out = _run(["train.py", "--cfg", "job", "--resolve", "model=tiny", "lora.rank=8"])
    assert out.returncode == 0, out.stderr
    assert "tiny-kolors-seed0" in out.stdout and "rank: 8" in out.stdout
    out = _run(["train.py", "lora.rnak=8"])
    assert out.returncode != 0 and "rnak" in out.stderr


def test_generate_tiny_writes_story_and_panel(tmp_path, tiny_model_dir):
    out = _run(["generate.py", "model=tiny", "sampler.steps=4", f"hydra.run.dir={tmp_path}"])
    assert out.returncode == 0, out.stderr[-3000:]
    for i in range(1, 9):
        img = Image.open(tmp_path / f"{i}.png")
        assert img.size == (64, 64)
    panel = Image.open(tmp_path / "panel.png")
    assert panel.width >= 2 * 64 and panel.height >= 4 * 64
