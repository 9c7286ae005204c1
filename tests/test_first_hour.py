"""The first real hour (issue 27): one trigger word for captions and prompts, your own story in one
file (YAML, JSON or CSV), checked before any model loads and reproduced exactly."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest

from kolors_story.records import Manifest
from tests.helpers import compose, settings

TRIGGER = "水墨画"


# ------------------------------------------------------------------------------------------ trigger


def test_one_trigger_sets_the_captions_prefix_and_the_prompts():
    job = settings("train", ["model=tiny", f"trigger='{TRIGGER}'"])
    assert job.dataset.caption_prefix == "水墨画，" and job.story.trigger == "水墨画，"
    assert settings("generate", ["model=tiny", "trigger='ink wash'"]).story.trigger == "ink wash, "
    with pytest.warns(UserWarning, match="dataset.caption_prefix is deprecated"):
        old = settings("train", ["model=tiny", "dataset.caption_prefix='二次元，'"])
    assert old.story.trigger == "二次元，" and old.dataset.caption_prefix == "二次元，"  # the alias sets both


def test_the_trigger_reaches_the_training_captions_and_every_rendered_prompt(tmp_path):
    from kolors_story.cli import generate_from_config
    from tests.helpers import run_data_stage

    cfg = compose("train", ["model=tiny", "dataset=demo", "filter=none", f"data_dir={tmp_path / 'data'}",
                            f"trigger='{TRIGGER}'"])
    prepared = run_data_stage(cfg)
    with open(prepared.metadata_csv, encoding="utf-8") as f:
        captions = [row["text"] for row in csv.DictReader(f)]
    assert captions and all(c.startswith("水墨画，") for c in captions)
    result = generate_from_config(compose("generate", ["model=tiny", "sampler.steps=1", f"trigger='{TRIGGER}'",
                                                       f"output_dir={tmp_path / 'story'}"]))
    assert all(s.prompt.startswith("水墨画，") for s in result.manifest.scenes)
    assert result.manifest.story.trigger == "水墨画，"


def test_a_training_runs_trigger_reaches_generate_run(tmp_path, tiny_model_dir):
    from omegaconf import OmegaConf, open_dict

    from kolors_story.config.compose import to_settings
    from kolors_story.config.saved import effective_config
    from tests.test_generate import make_lora

    run = tmp_path / "run"
    train_cfg = compose("train", ["model=tiny", f"trigger='{TRIGGER}'"])
    with open_dict(train_cfg):
        del train_cfg["hydra"]
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(train_cfg, run / ".hydra" / "config.yaml")
    make_lora(run / "checkpoints" / "step-000002", tiny_model_dir, seed=3)
    (run / "checkpoints" / "last").write_text("step-000002\n")
    effective, _ = effective_config(compose("generate", ["model=tiny", f"run={run}"]))
    assert to_settings(effective, "generate").story.trigger == "水墨画，"


# -------------------------------------------------------------------------------------- story files


def _scenes(n: int = 8) -> list[dict]:
    return [{"description": f"scene {i}", "prompt": {"zh": f"一只红色的狐狸，第{i}幕", "en": f"a red fox, scene {i}"},
             "negative": "模糊", "seed": 100 + i} for i in range(n)]


def _write(path: Path, scenes: list[dict]) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps({"title": "Fox", "scenes": scenes}, ensure_ascii=False), encoding="utf-8")
    elif path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["description", "prompt_zh", "prompt_en", "negative", "seed"])
            w.writerows([[s["description"], s["prompt"]["zh"], s["prompt"]["en"], s["negative"], s["seed"]]
                         for s in scenes])
    else:
        import yaml

        path.write_text(yaml.safe_dump({"title": "Fox", "scenes": scenes}, allow_unicode=True), encoding="utf-8")
    return path


@pytest.mark.parametrize("suffix", [".yaml", ".json", ".csv"])
def test_a_story_file_renders_with_its_prompts_and_seeds(tmp_path, suffix):
    from kolors_story.cli import generate_from_config

    story = _write(tmp_path / f"fox{suffix}", _scenes())
    result = generate_from_config(compose("generate", ["model=tiny", "sampler.steps=1", f"story.file={story}",
                                                       f"output_dir={tmp_path / 'out'}"]))
    m = result.manifest
    assert [s.prompt for s in m.scenes] == [f"一只红色的狐狸，第{i}幕" for i in range(8)]
    assert [s.seed for s in m.scenes] == [100 + i for i in range(8)] and m.story.title in ("Fox", "fox")
    assert m.config["story"]["file"] == str(story) and len(m.config["story"]["scenes"]) == 8  # recorded inline


def test_a_story_from_a_file_reproduces_exactly(tmp_path):
    from kolors_story.cli import generate_from_config
    from kolors_story.generate.reproduce import reproduce

    story = _write(tmp_path / "fox.yaml", _scenes())
    generate_from_config(compose("generate", ["model=tiny", "sampler.steps=2", f"story.file={story}",
                                              f"output_dir={tmp_path / 'out'}"]))
    story.unlink()  # the manifest holds the scenes: reproduce needs no file
    report = reproduce(tmp_path / "out", tmp_path / "again", progress=False)
    assert report["all_identical"], report


@pytest.mark.parametrize("bad, message", [
    ("empty_prompt", "scene 3: the prompt is empty"),
    ("wrong_column", "unknown column"),
    ("not_utf8", "is not UTF-8"),
    ("too_long", "scene 2: the prompt is"),
])
def test_a_bad_story_file_is_refused_before_any_model_loads(tmp_path, monkeypatch, capsys, bad, message):
    from kolors_story.cli import generate_main
    from kolors_story.generate import job as generate_job

    scenes = _scenes()
    path = tmp_path / ("story.csv" if bad in ("wrong_column", "not_utf8") else "story.yaml")
    if bad == "empty_prompt":
        scenes[2]["prompt"] = ""
    if bad == "too_long":
        scenes[1]["prompt"] = {"zh": "一只红色的狐狸在雪地里奔跑，" * 60, "en": "x"}
    _write(path, scenes)
    if bad == "wrong_column":
        path.write_text(path.read_text(encoding="utf-8").replace("negative", "negativ"), encoding="utf-8")
    if bad == "not_utf8":
        path.write_bytes(path.read_text(encoding="utf-8").encode("gb18030"))
    monkeypatch.setattr(generate_job, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_:
        generate_main(compose("generate", ["model=tiny", f"story.file={path}", f"output_dir={tmp_path / 'out'}"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert message in err[0] and (str(path) in err[0] or bad == "too_long"), err[0]
    if bad == "too_long":
        assert "over the 256" in err[0] and "shorten it" in err[0]


def test_a_story_of_another_length_renders_and_says_so(tmp_path):
    from kolors_story.story.files import read_story_file

    with pytest.warns(UserWarning, match="has 5 scenes: the competition asks for exactly 8"):
        assert len(read_story_file(_write(tmp_path / "five.yaml", _scenes(5)))["scenes"]) == 5


def test_the_template_command_writes_an_8_scene_story_in_each_format(tmp_path, capsys):
    from kolors_story.story.__main__ import main
    from kolors_story.story.files import read_story_file

    for suffix in (".yaml", ".json", ".csv"):
        assert main(["new", str(tmp_path / f"mine{suffix}")]) == 0
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # 8 scenes: no length warning
            story = read_story_file(tmp_path / f"mine{suffix}")
        assert len(story["scenes"]) == 8 and all(s["prompt"]["zh"] for s in story["scenes"])
    assert main(["new", str(tmp_path / "mine.yaml")]) == 2  # never over an existing file without --force
    assert "already exists" in capsys.readouterr().err
    assert "#" in (tmp_path / "mine.yaml").read_text(encoding="utf-8")  # commented


def test_manifest_records_the_story_file_and_the_bundle_keeps_a_copy(tmp_path):
    from kolors_story.cli import generate_from_config
    from kolors_story.files import file_sha256

    story = _write(tmp_path / "fox.json", _scenes())
    result = generate_from_config(compose("generate", ["model=tiny", "sampler.steps=1", f"story.file={story}",
                                                       f"output_dir={tmp_path / 'out'}", "submit.team=Fox",
                                                       f"submit.dir={tmp_path / 'bundles'}"]))
    again = Manifest.read(tmp_path / "out" / "manifest.json")
    assert again.config["story"]["file"] == str(story) and result.manifest.scenes[0].seed == 100
    assert (again.story.file, again.story.file_sha256) == (str(story), file_sha256(story))
    (bundle,) = (tmp_path / "bundles").iterdir()
    assert (bundle / "story.json").read_bytes() == story.read_bytes()
