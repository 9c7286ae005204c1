"""Sweeps end to end on the tiny model: multirun folders, one W&B run per job, leaderboard, pick."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from kolors_story.evaluate.leaderboard import build_leaderboard, write_leaderboard
from kolors_story.records import read_metrics
from tests.helpers import REPO, compose
from tests.wandb_reader import read_wandb_run

pytestmark = pytest.mark.slow

# A few steps and one checkpoint per job: enough to exercise every file a sweep writes.
FAST = ["model=tiny", "dataset=demo", "filter=none", "trainer.max_epochs=1", "trainer.steps_per_epoch=2",
        "trainer.checkpoint_every_n_steps=2", "sampler.steps=2", "trainer.progress_bar=false"]


def _train(args, tmp_path, **kw):
    flags = [a for a in args if a.startswith("-")]  # -m must come before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    cmd = [sys.executable, "train.py", *flags, *FAST, f"data_dir={tmp_path / 'data'}", *overrides]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ), timeout=1200, **kw)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    return out


@pytest.fixture(scope="module")
def sweep_2x2(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("sweep")
    _train(["-m", "lora.rank=2,4", "lora.alpha=2,4", f"hydra.sweep.dir={tmp / 'sweep'}"], tmp)
    return tmp / "sweep"


def test_multirun_writes_one_folder_and_one_wandb_run_per_job(sweep_2x2):
    jobs = sorted(p for p in sweep_2x2.iterdir() if (p / ".hydra").is_dir())
    assert len(jobs) == 4
    runs = {}
    for job in jobs:
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        rank = int(next(o for o in overrides if o.startswith("lora.rank=")).split("=")[1])
        records = read_metrics(job)
        assert records[-1]["type"] == "status" and records[-1]["status"] == "finished", records[-1]
        losses = [r["loss"] for r in records if r["type"] == "train"]
        wb_files = list(job.glob("wandb/offline-run-*/run-*.wandb"))
        assert len(wb_files) == 1, f"{job.name}: exactly one W&B run per job"
        wb = read_wandb_run(wb_files[0])
        runs[wb["run"]["id"]] = wb
        assert wb["run"]["group"] == str(sweep_2x2), "one W&B group per sweep (its folder)"
        assert wb["config"]["lora"]["rank"] == rank, "each run carries its own swept config"
        wb_losses = [row["train"]["loss"] if "train" in row else row.get("train/loss") for row in wb["history"]]
        wb_losses = [x for x in wb_losses if x is not None]
        assert wb_losses == pytest.approx(losses), f"{job.name}: W&B loss history = metrics.jsonl"
    assert len(runs) == 4, "4 distinct W&B runs (no job logged into another's run)"


def test_leaderboard_best_row_is_the_highest_objective(sweep_2x2):
    out = write_leaderboard(sweep_2x2)
    means = {}
    for job in sweep_2x2.iterdir():
        for r in read_metrics(job):
            if r.get("type") == "checkpoint":
                means[(job.name, r["dir"])] = (bool(r["passed"]), r["mean"])
    best_key = max(means, key=lambda k: means[k])
    top = out["rows"][0]
    assert (top.run.name, top.checkpoint) == best_key and top.mean == means[best_key][1]
    best = yaml.safe_load((sweep_2x2 / "best.yaml").read_text())
    assert best["run"].endswith(best_key[0])
    # best.yaml carries the winning job's own settings: the rank that job was launched with
    winner = sweep_2x2 / best_key[0]
    overrides = yaml.safe_load((winner / ".hydra" / "overrides.yaml").read_text())
    winner_rank = int(next(o for o in overrides if o.startswith("lora.rank=")).split("=")[1])
    assert best["config"]["lora"]["rank"] == winner_rank
    assert best["overrides"] == overrides


def test_best_yaml_renders_the_checkpoints_validation_story(sweep_2x2, tmp_path):
    write_leaderboard(sweep_2x2)
    best = yaml.safe_load((sweep_2x2 / "best.yaml").read_text())
    out = subprocess.run([sys.executable, "generate.py", f"run={sweep_2x2 / 'best.yaml'}", f"hydra.run.dir={tmp_path}"],
                         cwd=REPO, capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for i in range(1, 9):
        ours = np.asarray(Image.open(tmp_path / f"{i}.png"), dtype=np.int16)
        val = np.asarray(Image.open(os.path.join(best["checkpoint_dir"], f"{i}.png")), dtype=np.int16)
        assert ours.shape == val.shape
        assert np.abs(ours - val).max() <= 2, f"scene {i}: generate.py differs from the validation render"


def test_failed_job_is_recorded_and_the_sweep_continues(tmp_path, tiny_model_dir):
    _train(["-m", "lora.rank=-1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    rows = build_leaderboard(tmp_path / "sweep")
    by_status = {r.status for r in rows}
    assert by_status == {"finished", "failed"}
    failed = next(r for r in rows if r.status == "failed")
    assert "lora.rank" in failed.error and failed.mean is None
    assert rows[0].status == "finished" and rows[0].mean is not None


def test_sweep_presets_compose():
    for name in ("rank_alpha", "epochs", "optuna"):
        cfg = compose("train", ["model=tiny", f"+sweeps={name}"])
        assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.params
    assert compose("generate", ["+sweeps=cfg"]).hydra.sweeper.params["sampler.cfg"]
    assert "Optuna" in compose("train", ["+sweeps=optuna"]).hydra.sweeper._target_
    assert "Joblib" in compose("train", ["+launcher=joblib"]).hydra.launcher._target_
    assert "Slurm" in compose("train", ["+launcher=slurm"]).hydra.launcher._target_


def test_optuna_preset_runs_two_trials(tmp_path, tiny_model_dir):
    _train(["+sweeps=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.params={lora.rank: 'choice(2, 4)'}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna" and isinstance(results["best_value"], float)
    jobs = [p for p in (tmp_path / "sweep").iterdir() if (p / "metrics.jsonl").exists()]
    assert len(jobs) == 2
    finals = [[r for r in read_metrics(j) if r.get("type") == "checkpoint"][-1]["mean"] for j in jobs]
    assert results["best_value"] == pytest.approx(max(finals)), "Optuna maximised the final mean score"
