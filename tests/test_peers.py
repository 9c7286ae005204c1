"""The bench's ``peers`` section and the CPU generation defaults it holds the project to.

The comparison itself (a 7 GB full-size folder, DiffSynth's trainer, ~15 minutes) is
``python -m kolors_story.bench --only peers`` and is not run here; its parts are: the memory meter of
a whole process, the step clock both trainers run with, the seeds' loop drawing the same story as
generate.py, and the goals turning into the exit code.
"""

from __future__ import annotations

import json
import sys

import pytest

from kolors_story.plan.auto import CPU_SCENE_BATCH
from tests.helpers import settings
from tests.test_generate import max_diff, pixels, run_generate


def test_cpu_defaults_keep_the_images_of_the_old_settings(tmp_path, tiny_model_dir):
    """On a CPU generate.py releases the text encoder (encoding before the UNet loads), decodes one
    image at a time and denoises 4 scenes at a time; the story is the one the old settings drew."""
    new, _ = run_generate(tmp_path, name="defaults")
    old, _ = run_generate(tmp_path, "sampler.batch_size=8", "memory.release_text_encoder=false",
                          "memory.vae_slicing=false", name="old")
    assert max_diff(pixels(tmp_path / "defaults"), pixels(tmp_path / "old")) <= 1
    chosen, kept = new["manifest"], old["manifest"]
    assert chosen["config"]["sampler"]["batch_size"] == CPU_SCENE_BATCH < 8
    assert chosen["memory"]["release_text_encoder"] and chosen["memory"]["vae_slicing"]
    assert chosen["memory"]["text_encoder_released_bytes"] > 0
    assert kept["config"]["sampler"]["batch_size"] == 8  # what the command line says is kept
    assert not kept["memory"]["release_text_encoder"] and not kept["memory"]["vae_slicing"]


def test_cpu_defaults_leave_what_the_user_set():
    from kolors_story.plan.auto import cpu_generation_defaults

    job = settings("generate", ["model=tiny", "sampler.batch_size=8"])
    mine = cpu_generation_defaults(job, {"sampler.batch_size", "memory"})
    assert mine.sampler.batch_size == 8 and not mine.memory.release_text_encoder and not mine.memory.vae_slicing
    free = cpu_generation_defaults(job)
    assert free.sampler.batch_size == CPU_SCENE_BATCH and free.memory.release_text_encoder and free.memory.vae_slicing


def test_the_seeds_loop_draws_the_story_generate_draws(tmp_path, tiny_diffusers_dir):
    """The peer of the story row does the same work: KolorsPipeline once per scene, with the story's
    prompts, negatives and seeds, gives generate.py's images."""
    from kolors_story.bench import peers_run
    from kolors_story.bench.peers import PIXEL_LEVELS, max_pixel_diff
    from kolors_story.story import story_scenes

    story = ["story=ink_dream", "sampler.steps=2", "sampler.cfg=4", f"model.path={tiny_diffusers_dir}",
             "model.tiny.layout=diffusers"]
    job = settings("generate", ["model=tiny", *story])
    scenes = story_scenes(job.story, job.sampler)
    scenes_file = tmp_path / "scenes.json"
    scenes_file.write_text(json.dumps([{"prompt": s.prompt, "negative": s.negative, "seed": s.seed} for s in scenes]))
    assert peers_run.main(["loop", "--model", str(tiny_diffusers_dir), "--scenes", str(scenes_file), "--out-dir",
                           str(tmp_path / "loop"), "--steps", "2", "--cfg", "4", "--size", str(job.sampler.height),
                           "--out", str(tmp_path / "loop.json")]) == 0
    run_generate(tmp_path, *story, name="ours")
    assert max_pixel_diff(tmp_path / "ours", tmp_path / "loop", len(scenes)) <= PIXEL_LEVELS


def test_the_memory_meter_sees_what_a_process_allocates(tmp_path):
    from kolors_story.bench.peers import run_process
    from kolors_story.bench.timing import BenchError

    grab = "b = bytearray(400 * 2**20); import time; time.sleep(0.5)"
    small = run_process([sys.executable, "-c", "import time; time.sleep(0.5)"], tmp_path / "small.log")
    big = run_process([sys.executable, "-c", grab], tmp_path / "big.log")
    assert small.returncode == big.returncode == 0
    assert big.peak_anon_gib - small.peak_anon_gib > 0.35
    assert big.peak_rss_gib >= big.peak_anon_gib
    failed = run_process([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], tmp_path / "failed.log")
    with pytest.raises(BenchError, match="exited with 3"):
        failed.check("the peer")
    assert "boom" in (tmp_path / "failed.log").read_text()


def test_the_step_clock_splits_each_lightning_step(monkeypatch):
    """Both trainers carry the same clock; it finds the UNet's forward inside the step."""
    import time

    import lightning as pl
    import torch

    from kolors_story.bench.peers_run import PARTS, StepParts

    monkeypatch.setattr(pl.Trainer, "__init__", pl.Trainer.__init__)  # restored after the test
    parts = StepParts()

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)
            self.unet = parts.timed("UNet forward", self._unet)

        def _unet(self, x):
            time.sleep(0.05)
            return self.layer(x)

        def training_step(self, batch, _i):
            return self.unet(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    parts.install()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(3, 4)), batch_size=1)
    pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).fit(Tiny(), data)
    result = parts.result()
    assert len(result["step_ends"]) == 3 and result["step_ends"] == sorted(result["step_ends"])
    for step in result["step_parts"]:
        assert set(step) == set(PARTS)
        assert step["UNet forward"] >= 0.05 and step["prompt encode"] == 0


def test_steps_after_warm_up_and_before_the_save():
    from kolors_story.bench import peers

    # step ends: the first (after loading), 1 warm-up step, 4 measured, the last (the LoRA is saved)
    ends = [0.0, 10.0, 12.5, 13.5, 15.0, 16.0, 30.0]
    assert len(ends) == peers.TRAIN_STEPS
    assert peers.measured_steps(ends) == [2.5, 1.0, 1.5, 1.0]
    with pytest.raises(Exception, match="6 training steps ended"):
        peers.measured_steps(ends[:-1])


def test_a_missed_goal_is_named_and_fails_the_bench():
    from kolors_story.bench.peers import _row
    from kolors_story.bench.run import missed_goals
    from kolors_story.bench.table import render_table

    peer = [{"seconds": 100.0, "peak_anon_gib": 10.0, "peak_rss_gib": 12.0}]
    ours = [{"seconds": 95.0, "peak_anon_gib": 8.0, "peak_rss_gib": 9.0}]
    row = _row("story", "the loop", peer, ours, "seconds")
    assert row["ratios"] == pytest.approx({"time": 0.95, "memory": 0.8})
    assert row["met"] == {"time": False, "memory": True}
    goals = [{"row": "story", "measure": k, "ratio": row["ratios"][k], "goal": row["goals"][k], "met": row["met"][k]}
             for k in ("time", "memory")]
    result = {"sections": {"peers": {"rows": [row], "goals": goals}}}
    assert missed_goals(result) == ["peers: story time ratio 0.95x > goal 0.90x"]
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(render_table(result))
    text = console.export_text()
    assert "0.95x (goal 0.90x) MISSED" in text and "0.80x (goal 0.90x)" in text
