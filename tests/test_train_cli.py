"""`python train.py` end to end on the tiny model: stage=data, the demo run + resume, DDP on 2 CPU processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kolors_story.records import read_metrics
from tests.helpers import REPO
from tests.wandb_reader import read_wandb_run

TINY = ["model=tiny", "dataset=demo", "filter=none", "sampler.steps=2", "trainer.progress_bar=false"]


def _train(*args, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                         env=env, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """stage=data (in-process, as train.py calls it): the demo dataset prepared and cached once."""
    from kolors_story.cli import train_from_config
    from tests.helpers import compose

    root = tmp_path_factory.mktemp("demo")
    cfg = compose("train", [*TINY, "stage=data", f"data_dir={root / 'data'}", f"output_dir={root / 'data-run'}"])
    assert train_from_config(cfg) is None
    return root / "data", root / "data-run"


def test_stage_data_prepares_and_caches_without_training(demo_data):
    data, run = demo_data
    assert (data / "train" / "metadata.csv").exists() and (data / "report.json").exists()
    assert len(list((data / "cache" / "items").glob("*.safetensors"))) == 24
    assert list((data / "cache" / "story").glob("*.safetensors"))
    assert not run.exists()  # no run folder, no checkpoints, no metrics


DDP = ["trainer=ddp", "trainer.precision=16-mixed", "trainer.steps_per_epoch=2", "trainer.checkpoint_every_n_steps=2"]


@pytest.fixture(scope="module")
def ddp_run(demo_data, tmp_path_factory):
    """`python train.py ... trainer=ddp trainer.devices=2`: Lightning's own launcher, 2 processes."""
    run = tmp_path_factory.mktemp("ddp") / "run"
    out = _train(*TINY, f"data_dir={demo_data[0]}", *DDP, "trainer.devices=2", f"hydra.run.dir={run}")
    return run, out


@pytest.mark.slow
def test_two_nodes_under_torchrun_train_the_same_lora_as_one_node(demo_data, ddp_run, tmp_path):
    """trainer.num_nodes=2: two torchrun "nodes" of one process each on localhost (gloo) give the
    LoRA that two processes on one node give (the README's multi-node command, as SLURM would run it)."""
    from kolors_story.lora import read_lora

    run = tmp_path / "two-nodes"
    args = [*TINY, f"data_dir={demo_data[0]}", *DDP, "trainer.devices=1", "trainer.num_nodes=2", "validate=false",
            "logger=none", f"hydra.run.dir={run}"]
    port = str(29500 + os.getpid() % 1000)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                               "train.py", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in (1, 0)]
    logs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], logs[1][-3000:] + logs[0][-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs[0] + logs[1]
    two_nodes = read_lora(run / "checkpoints" / "step-000004" / "lora.safetensors").state_dict
    one_node = read_lora(ddp_run[0] / "checkpoints" / "step-000004" / "lora.safetensors").state_dict
    assert two_nodes.keys() == one_node.keys()
    assert max(float((two_nodes[k] - one_node[k]).abs().max()) for k in two_nodes) <= 1e-6


@pytest.mark.slow
def test_train_py_ddp_on_two_cpu_processes_then_resume_in_one(ddp_run, capsys):
    """`python train.py model=tiny dataset=demo trainer=ddp`: 2 processes (gloo), one set of
    checkpoints with panels and scores, one W&B run, a summary saying where everything is; then
    `resume=<run>` continues the run in a single process."""
    run, out = ddp_run
    log = out.stdout + out.stderr
    assert "Starting with 2 processes" in log and "distributed_backend=gloo" in log
    assert "precision 32" in log  # 16-mixed on a CPU-only machine falls back, saying so
    for text in ("Training finished at step 4", str(run), "metrics.jsonl", "checkpoints/step-000004/panel.png",
                 "offline", "not a real result", f"resume={run}"):
        assert text in out.stdout, text
    records = read_metrics(run)
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4]  # rank 0 only: no duplicates
    ckpts = [r for r in records if r["type"] == "checkpoint"]
    assert [c["step"] for c in ckpts] == [2, 4]
    assert all(len(c["scores"]) == 8 and (run / c["panel"]).exists() for c in ckpts)
    assert [r["status"] for r in records if r["type"] == "status"] == ["finished"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last", "step-000002", "step-000004"]
    for step in ("step-000002", "step-000004"):
        names = sorted(p.name for p in (run / "checkpoints" / step).iterdir())
        assert names == sorted([*(f"{i}.png" for i in range(1, 9)), "panel.png", "scores.json", "lora.safetensors",
                                "lora_kohya.safetensors", "lora_diffsynth.ckpt", "trainer_state.ckpt"])
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1
    wandb_run = read_wandb_run(json.loads((run / "wandb_run.json").read_text())["dir"])
    assert [r["_step"] for r in wandb_run["history"]] == [1, 2, 3, 4]
    assert sum("panel" in f for f in wandb_run["files"]) == 2

    # `python train.py resume=<run> trainer.max_epochs=3 trainer.devices=1 trainer.strategy=auto`
    # (the same call, in-process): the run's own config plus the new budget, continued in <run>
    from kolors_story.cli import train_from_config
    from tests.helpers import compose

    mean = train_from_config(compose("train", [f"resume={run}", "trainer.max_epochs=3", "trainer.devices=1",
                                               "trainer.strategy=auto"]))
    assert "Resuming" in capsys.readouterr().out
    records = read_metrics(run)
    assert mean == pytest.approx([r for r in records if r["type"] == "checkpoint"][-1]["mean"])
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r["type"] == "checkpoint"] == [2, 4, 6]
    assert [r["status"] for r in records if r["type"] == "status"] == ["finished", "finished"]
    assert (run / "checkpoints" / "last").read_text().strip() == "step-000006"


def test_stage_train_reuses_the_prepared_data_and_cache(demo_data):
    from kolors_story.story import story_scenes
    from kolors_story.train.job import data_stage
    from tests.helpers import settings

    data = demo_data[0]
    job = settings("train", ["model=tiny", "dataset=demo", "filter=none", "stage=train", f"data_dir={data}"])
    prepared, cache = data_stage(job, story_scenes(job.story, job.sampler))
    assert prepared.reused and len(cache.items) == len(prepared.items) == 24
    assert cache.stats["files_reused"] == 24 and cache.stats["story"] == "reused"
