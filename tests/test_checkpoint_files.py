"""Checkpoints you can keep (issue 27): keep the last N (and the best), fp16 LoRA files, the formats
to write, and the ModelScope export named as the competition asks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kolors_story.records import last_checkpoint, read_metrics
from tests.helpers import settings


def _cfg(tmp_path, *extra):
    return settings("train", ["model=tiny", "logger=none", "validate=false", f"output_dir={tmp_path}",
                              "trainer.progress_bar=false", "trainer.batch_size=2", "trainer.steps_per_epoch=3",
                              "trainer.max_epochs=null", "lora.rank=4", *extra])


def _fake_run(root: Path, means: list[float]) -> Path:
    """A run folder with one checkpoint per mean (steps 1..n) and their checkpoint lines."""
    lines = []
    for step, mean in enumerate(means, start=1):
        name = f"step-{step:06d}"
        (root / "checkpoints" / name).mkdir(parents=True)
        lines.append({"type": "checkpoint", "step": step, "dir": f"checkpoints/{name}", "mean": mean, "min": mean,
                      "passed": mean >= 6.0, "scores": [mean] * 8})
    (root / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (root / "checkpoints" / "last").write_text(f"step-{len(means):06d}\n")
    return root


def test_keep_last_n_leaves_the_last_n_and_the_best(tmp_path):
    from kolors_story.train.checkpoints import prune_checkpoints

    run = _fake_run(tmp_path / "run", [5.0, 6.4, 5.5, 5.2, 5.1])  # the best (6.4, passing the gate) is step 2
    removed = prune_checkpoints(run, 2)
    left = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert left == ["step-000002", "step-000004", "step-000005"] and removed == ["step-000001", "step-000003"]
    assert len([r for r in read_metrics(run) if r["type"] == "checkpoint"]) == 5  # the record keeps every line


def test_a_run_with_keep_last_n_keeps_its_last_checkpoints(tmp_path, tiny_batches):
    from kolors_story.train.job import run_training

    cfg = _cfg(tmp_path, "trainer.max_steps=10", "trainer.checkpoint_every_n_steps=2", "trainer.keep_last_n=2")
    assert run_training(cfg, tmp_path, tiny_batches).status == "finished"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-000008", "step-000010"]
    assert last_checkpoint(tmp_path).name == "step-000010"


def test_fp16_lora_files_are_half_the_size_and_load_in_every_client(tmp_path, tiny_model_dir):
    from kolors_story.lora import add_lora, read_lora, save_lora
    from kolors_story.models.loading import load_pipeline

    unet = load_pipeline(tiny_model_dir, text_encoder=False).unet
    add_lora(unet, rank=32, alpha=4.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])  # the weights outweigh the headers
    full = save_lora(unet, tmp_path / "fp32", dtype="float32")
    half = save_lora(unet, tmp_path / "fp16", dtype="float16")
    for fmt in ("diffusers", "kohya", "diffsynth"):
        ratio = Path(half[fmt]).stat().st_size / Path(full[fmt]).stat().st_size
        assert ratio < 0.6, (fmt, ratio)
        a, b = read_lora(full[fmt]), read_lora(half[fmt])
        assert a.state_dict.keys() == b.state_dict.keys() and (a.rank, a.alpha) == (b.rank, b.alpha)
        assert all(b.state_dict[k].dtype == torch.float16 for k in b.state_dict)
        assert max(float((a.state_dict[k] - b.state_dict[k].float()).abs().max()) for k in a.state_dict) < 1e-3


def test_save_formats_pick_the_files_and_the_last_checkpoint_has_all_three(tmp_path, tiny_batches):
    from kolors_story.train.job import run_training

    cfg = _cfg(tmp_path, "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2", "trainer.save_formats=[kohya]")
    assert run_training(cfg, tmp_path, tiny_batches).status == "finished"
    first, last = tmp_path / "checkpoints" / "step-000002", tmp_path / "checkpoints" / "step-000004"
    assert sorted(p.name for p in first.glob("lora*")) == ["lora_kohya.safetensors"]
    assert sorted(p.name for p in last.glob("lora*")) == ["lora.safetensors", "lora_diffsynth.ckpt",
                                                         "lora_kohya.safetensors"]


def test_bad_save_settings_are_refused_before_any_work():
    from kolors_story.errors import SettingsError
    from kolors_story.train.checks import check_train

    for override, key in (("trainer.save_dtype=int8", "trainer.save_dtype"),
                          ("trainer.save_formats=[safetensors]", "trainer.save_formats"),
                          ("trainer.keep_last_n=0", "trainer.keep_last_n")):
        with pytest.raises(SettingsError, match=key):
            check_train(settings("train", ["model=tiny", "validate=false", override]))


def test_export_names_the_files_for_modelscope(tmp_path, tiny_batches, capsys):
    from kolors_story.export import main
    from kolors_story.lora import read_lora
    from kolors_story.train.job import run_training

    run = tmp_path / "run"
    assert run_training(_cfg(run, "trainer.max_steps=2", "trigger='水墨画'"), run, tiny_batches).status == "finished"
    assert main([str(run), "--name", "MyTeam-KolorsTraining-InkDream", "--out", str(tmp_path / "up")]) == 0
    folder = tmp_path / "up" / "MyTeam-KolorsTraining-InkDream"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["MyTeam-KolorsTraining-InkDream.ckpt", "MyTeam-KolorsTraining-InkDream.safetensors",
                     "MyTeam-KolorsTraining-InkDream_kohya.safetensors", "README.md", "configuration.json"]
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\nframeworks:") and "base_model:\n  - Kwai-Kolors/Kolors" in card and "`水墨画`" in card
    assert read_lora(folder / "MyTeam-KolorsTraining-InkDream.ckpt").rank == 4  # DiffSynth's file, as the organisers load it
    assert main([str(run), "--name", "no team name", "--out", str(tmp_path / "up")]) == 2
    assert "KolorsTraining" in capsys.readouterr().err


def test_tensorboard_event_files_hold_the_same_scalars_as_metrics_jsonl(tmp_path, tiny_batches):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kolors_story.train.job import run_training

    cfg = settings("train", ["model=tiny", "logger=tensorboard", "validate=false", f"output_dir={tmp_path}",
                             "trainer.progress_bar=false", "trainer.batch_size=2", "trainer.max_steps=5",
                             "trainer.max_epochs=null", "trainer.steps_per_epoch=3"])
    assert run_training(cfg, tmp_path, tiny_batches).status == "finished"
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr")):
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        want = [(r["step"], r[key]) for r in read_metrics(tmp_path) if r["type"] == "train"]
        assert [s for s, _ in logged] == [s for s, _ in want] and len(want) == 5
        assert [v for _, v in logged] == pytest.approx([v for _, v in want], rel=1e-6)
    assert not (tmp_path / "wandb").exists()  # logger=tensorboard: W&B is off
