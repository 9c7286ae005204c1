"""The Hydra interface and the first main job (python generate.py model=tiny)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from kolors_story.story import story_scenes
from tests.helpers import REPO, compose, settings


def _run(args, **kw):
    return subprocess.run([sys.executable, *args], cwd=kw.pop("cwd", REPO), capture_output=True, text=True,
                          env={**os.environ, **kw.pop("env", {})}, timeout=600, **kw)


@pytest.mark.parametrize("story", ["idol_diary", "ink_dream", "warrior_dragon"])
@pytest.mark.parametrize("language", ["zh", "en"])
def test_every_story_has_eight_scenes_in_both_languages(story, language):
    job = settings("generate", [f"story={story}", f"story.language={language}"])
    scenes = story_scenes(job.story, job.sampler)
    assert len(scenes) == 8
    assert all(s.prompt.strip() and s.negative.strip() and s.description.strip() for s in scenes)
    assert len({s.prompt for s in scenes}) == 8


def test_sampler_defaults_follow_the_baseline():
    job = settings("generate", ["model=kolors", "story=idol_diary"])
    assert (job.sampler.cfg, job.sampler.steps, job.sampler.height, job.sampler.width) == (4.0, 50, 1024, 1024)
    assert [s.seed for s in story_scenes(job.story, job.sampler)] == [0, 1, 2, 5, 0, 1, 7, 0]
    job = settings("generate", ["story=ink_dream", "sampler.base_seed=10"])
    assert [s.seed for s in story_scenes(job.story, job.sampler)] == list(range(10, 18))


def test_presets_and_trainer_defaults():
    cfg = compose("train", [])
    assert (cfg.lora.rank, cfg.lora.alpha) == (16, 4.0)
    assert compose("train", ["lora=entity"]).lora.rank == 4
    assert cfg.trainer.precision in ("16-mixed", "bf16-mixed") and cfg.trainer.gradient_checkpointing is True
    ops = {next(iter(op)): next(iter(op.values())) for op in cfg.filter.process}
    assert ops["image_shape_filter"]["min_width"] == 1024 and ops["image_shape_filter"]["min_height"] == 1024
    assert (ops["image_aspect_ratio_filter"]["min_ratio"], ops["image_aspect_ratio_filter"]["max_ratio"]) == (0.5, 2.0)


def test_defaults_live_in_the_schemas_and_reach_the_library():
    """conf/ default options add nothing to their schema; the library sees the schema's values
    (the old code fallbacks disagreed: seed 0 vs 42, checkpoint every 500 vs 250 steps)."""
    from kolors_story.config import (
        LoraSettings,
        MemorySettings,
        OptimSettings,
        TrainerSettings,
    )

    job = settings("train", [])
    assert job.trainer == TrainerSettings() and job.lora == LoraSettings() and job.optim == OptimSettings()
    assert (job.trainer.seed, job.trainer.checkpoint_every_n_steps, job.trainer.steps_per_epoch) == (42, 250, 500)
    assert settings("generate", ["memory.auto=false"]).memory == MemorySettings()
    assert settings("generate", []).memory.auto is True  # model=kolors plans for the GPU
    assert settings("generate", ["model=tiny"]).memory == MemorySettings()
    tiny = settings("train", ["model=tiny"])
    assert (tiny.trainer.accelerator, tiny.trainer.precision, tiny.trainer.max_epochs) == ("cpu", "32", 2)
    assert tiny.trainer == settings("train", ["trainer=cpu"]).trainer  # one source of the CPU values
    assert tiny.scorer.tiny is not None and tiny.scorer.path.endswith("tiny-aesthetics-none-seed0")
    assert settings("train", []).scorer.tiny is None  # model=kolors: the competition's predictor


def test_a_mistyped_value_fails_at_compose_time_naming_the_key():
    from hydra.errors import ConfigCompositionException

    for override, key in (("trainer.seed=abc", "trainer.seed"), ("sampler.steps=many", "sampler.steps"),
                          ("validate=maybe", "validate"), ("dataset.rebuild=sometimes", "dataset.rebuild")):
        with pytest.raises(ConfigCompositionException) as err:
            compose("train", [override])
        assert key in str(err.value.__cause__ or err.value), override


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


def test_every_settings_field_has_a_comment():
    """The schemas in config/*_settings.py are where every key's default lives: each knob carries its
    one-line comment there (group fields of the job schemas are not knobs)."""
    import ast

    from kolors_story import config as config_package

    missing = []
    schema_files = sorted(Path(config_package.__file__).parent.glob("*_settings.py"))
    assert len(schema_files) >= 5
    for schema_file in schema_files:
        source = schema_file.read_text(encoding="utf-8")
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.ClassDef):
                continue
            for item in node.body:
                if not isinstance(item, ast.AnnAssign):
                    continue
                name = item.target.id
                is_group = (isinstance(item.value, ast.Name) and item.value.id == "MISSING"
                            and isinstance(item.annotation, ast.Name) and item.annotation.id.endswith("Settings"))
                if not is_group and "#" not in lines[item.lineno - 1]:
                    missing.append(f"{node.name}.{name}")
    assert not missing, "settings fields without a comment: " + ", ".join(missing)


def test_cli_help_cfg_and_unknown_key():
    out = _run(["train.py", "--help"])
    assert out.returncode == 0 and "model: kolors, tiny" in out.stdout
    out = _run(["train.py", "--cfg", "job", "--resolve", "model=tiny", "lora.rank=8"])
    assert out.returncode == 0, out.stderr
    assert "tiny-kolors-random-seed0" in out.stdout and "rank: 8" in out.stdout
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
