"""`generate.py ... submit.team=<name>`: the competition bundle and its model card."""

from __future__ import annotations

import csv
import hashlib
import json

import pytest
import yaml

from kolors_story.generate.submission import bundle_name, write_bundle
from tests.test_generate import shared_bundle


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_model_dir):
    return shared_bundle(tmp_path_factory, tiny_model_dir)


def test_bundle_name_follows_the_competition_rule():
    assert bundle_name("freshman2233", "WarriorSlaysDragonAndSavesPrincess") == \
        "freshman2233-KolorsTraining-WarriorSlaysDragonAndSavesPrincess"
    assert bundle_name("My Team/2", "水墨 梦") == "My_Team_2-KolorsTraining-水墨_梦"
    with pytest.raises(ValueError, match="submit.team"):
        bundle_name(" / ", "x")


def test_bundle_holds_lora_images_prompts_config_and_card(made):
    bundle, out, lora = made["bundle"], made["out"], made["lora_files"]
    assert bundle.name == "Test_Team-KolorsTraining-IdolGirlDiary" and bundle.parent == out
    # the LoRA in all three formats, byte for byte
    for fmt, name in (("diffusers", "lora.safetensors"), ("kohya", "lora_kohya.safetensors"),
                      ("diffsynth", "lora_diffsynth.ckpt")):
        assert sha(bundle / name) == sha(lora[fmt])
    # the 8 images (same bytes as generated), panel, prompts, config, manifest, scores
    for i in range(1, 9):
        assert (bundle / f"{i}.png").read_bytes() == (out / f"{i}.png").read_bytes()
    assert (bundle / "panel.png").is_file()
    rows = list(csv.DictReader((bundle / "prompts.csv").open(encoding="utf-8")))
    assert len(rows) == 8 and all(r["prompt"].startswith("test_style，") for r in rows)
    config = yaml.safe_load((bundle / "config.yaml").read_text(encoding="utf-8"))
    assert config["sampler"]["steps"] == 2 and config["lora_path"] == str(lora["diffusers"])
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["loras"][0]["bundle_file"] == "lora.safetensors"
    assert manifest["loras"][0]["sha256"] == sha(lora["diffusers"])
    assert manifest["images"] == {f"{i}.png": sha(bundle / f"{i}.png") for i in range(1, 9)}
    scores = json.loads((bundle / "scores.json").read_text())
    assert len(scores["scores"]) == 8 and scores["passed"] is False  # a random tiny predictor scores ~0
    assert "coherence" in scores and 1 <= scores["outlier"] <= 8
    assert manifest["scores"]["mean"] == pytest.approx(scores["mean"])


def test_model_card_describes_style_trigger_base_model_training_and_scores(made):
    card = (made["bundle"] / "README.md").read_text(encoding="utf-8")
    scores = json.loads((made["bundle"] / "scores.json").read_text())
    assert card.startswith("# Test_Team-KolorsTraining-IdolGirlDiary")
    assert "tiny model: not a real result" in card  # the tiny model says so up front
    assert "Style: test watercolour" in card  # from the LoRA's metadata
    assert "Trigger words: `test_style，`" in card
    assert "Kwai-Kolors/Kolors" in card and made["result"]["manifest"]["model"]["hash"] in card
    assert "| `lora.safetensors` | diffusers | 4 | 4.0 | 1.0 |" in card  # rank/alpha read from the file
    assert "lr: 0.0001" in card and "name: demo" in card  # training config from the LoRA metadata
    assert f"{scores['mean']:.4f}" in card and "FAIL" in card
    assert f"(CLIP-T, mean cosine of each image with its English prompt) {scores['clip_t']:.4f}" in card
    assert f"story objective {scores['story_objective']:.4f}" in card
    assert "![story panel](panel.png)" in card
    assert "lora_rank=4, lora_alpha=4.0" in card  # how to load the DiffSynth file
    assert "python generate.py reproduce=." in card
    for row in csv.DictReader((made["bundle"] / "prompts.csv").open(encoding="utf-8")):
        assert row["description"] in card


def test_existing_bundle_is_kept_unless_overwrite(made, tmp_path):
    from kolors_story.config.compose import to_settings

    job = to_settings(made["cfg"], "generate")
    job.submit.team = "Keep"
    result = _result_of(made)
    first = write_bundle(result, job, root=tmp_path)
    (first / "README.md").write_text("hand-edited card")
    with pytest.raises(FileExistsError, match="submit.overwrite=true"):
        write_bundle(result, job, root=tmp_path)
    assert (first / "README.md").read_text() == "hand-edited card"  # nothing written was lost
    job.submit.overwrite = True
    again = write_bundle(result, job, root=tmp_path)
    assert again == first and (again / "README.md").read_text().startswith("# Keep-KolorsTraining-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Keep-KolorsTraining-IdolGirlDiary"]  # no temp left


def _result_of(made):
    """A GenerationResult rebuilt from the shared run's files (no new render)."""
    from pathlib import Path

    from PIL import Image

    from kolors_story.config.compose import to_settings
    from kolors_story.generate.job import GenerationResult
    from kolors_story.generate.loras import LoraSpec
    from kolors_story.generate.render import StoryRender
    from kolors_story.records import Manifest, StoryScores
    from kolors_story.story import story_scenes

    out, manifest = made["out"], made["result"]["manifest"]
    job = to_settings(made["cfg"], "generate")
    images = [out / f"{i}.png" for i in range(1, 9)]
    render = StoryRender(images=[Image.open(p) for p in images], seeds=[s["seed"] for s in manifest["scenes"]])
    loras = [LoraSpec(Path(lo["path"]), lo["scale"], lo["sha256"]) for lo in manifest["loras"]]
    return GenerationResult(out_dir=out, manifest=Manifest.from_json(manifest), images=images, panel=out / "panel.png",
                            render=render, scenes=story_scenes(job.story, job.sampler), loras=loras,
                            summary=StoryScores.from_json(manifest["scores"]))
