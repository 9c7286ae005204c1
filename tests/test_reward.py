"""Reward refinement (reward=aesthetic): the differentiable scorer agrees with the competition's
package, and on the tiny model with the tiny scorer the reward raises the held-out scenes' score,
weight 0 is the plain run, resume is exact and the refined LoRA exports like any other."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kolors_story.records import last_checkpoint, read_metrics
from kolors_story.train.job import run_training
from tests.test_train import RUN, _cfg, _InterruptAt, _lora_state, _max_diff

# A small reward setup for the 64 px tiny model: 6 Euler steps, the gradient step among the last three.
REWARD = ["reward=aesthetic", "reward.resolution=64", "reward.steps=6", "reward.refl_steps=[3,5]",
          "reward.held_out=2", "reward.target=null", "lora.dropout=0"]


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize((288 + 48 * i, 256),
                                                                                         Image.BICUBIC)
            for i in range(n)]


@pytest.mark.slow  # ~1 min: ViT-L/14 on a 2-core CPU
def test_differentiable_scorer_matches_the_package_at_real_size():
    """Real ViT-L/14 size, random weights; the head rescaled so the scores spread around the 6.0 gate
    (std 1) as real ones do: then score points mean what they mean for the real predictor."""
    from kolors_story.evaluate.differentiable import DifferentiableAestheticScore
    from kolors_story.evaluate.scorer import AestheticScorer
    from kolors_story.models.architectures import REAL_PREDICTOR_CONFIG
    from kolors_story.models.random_init import build_clip_processor, build_predictor

    scorer = AestheticScorer(build_predictor(REAL_PREDICTOR_CONFIG, seed=0).eval(), build_clip_processor())
    images = _images(4)
    raw = np.array(scorer.score(images), dtype=np.float64)
    k = 1.0 / float(raw.std())
    with torch.no_grad():  # the head's last layer is linear: score' = k * score + c, mean 6, std 1
        head = scorer.predictor.layers[-1]
        head.weight.mul_(k)
        head.bias.mul_(k).add_(6.0 - k * float(raw.mean()))
    package = k * raw + (6.0 - k * raw.mean())  # what the package now returns (one ViT-L pass saved)
    score = DifferentiableAestheticScore.from_scorer(scorer)
    pixels = [torch.from_numpy(np.array(im)).permute(2, 0, 1).float()[None] / 255 for im in images]
    ours = np.array([float(score(x)) for x in pixels])
    assert np.abs(ours - package).max() < 0.02, (ours, package)
    away = np.abs(package - 6.0) > 0.05
    assert away.sum() >= 2 and ((ours >= 6.0) == (package >= 6.0))[away].all()  # the same pass/fail at the gate
    assert list(np.argsort(ours)) == list(np.argsort(package))  # the same ranking
    x = pixels[0].clone().requires_grad_(True)
    score(x).sum().backward()
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().max()) > 0


def _held_out_before(tiny_model_dir, story, job):
    """The held-out score of the untrained LoRA (= the base model), computed as the run computes it."""
    from kolors_story.evaluate.differentiable import DifferentiableAestheticScore
    from kolors_story.evaluate.scorer import AestheticScorer
    from kolors_story.models.loading import load_pipeline
    from kolors_story.train.reward import RewardObjective

    pipe = load_pipeline(tiny_model_dir, text_encoder=False)
    score = DifferentiableAestheticScore.from_scorer(AestheticScorer.from_settings(job.scorer))
    objective = RewardObjective(job.reward, pipe.vae, score, dict(pipe.scheduler.config), story[1])
    return objective.held_out_score(pipe.unet)


def _held_out_after(run_dir) -> float:
    return [r for r in read_metrics(run_dir) if r["type"] == "checkpoint"][-1]["reward_held_out"]


@pytest.mark.slow
def test_reward_raises_the_held_out_score_and_exports_like_any_lora(tmp_path, tiny_batches, story, tiny_model_dir):
    scenes, embeds = story
    n = 40
    # A random predictor has no taste a LoRA could learn (its scores are noise around 0): this tiny one
    # has its head fitted to brightness (1 + 8 x mean brightness), a taste that carries over to scenes
    # never rewarded. 4 prompts per step and the convolutions adapted too (LoCon); the diffusion loss
    # stays on (lambda = 1).
    common = [*RUN, *REWARD, f"trainer.max_steps={n}", "trainer.checkpoint_every_n_steps=20", "optim.lr=1e-2",
              "reward.batch_size=4", "lora.conv_rank=4", f"scorer.path={tmp_path / 'bright-scorer'}",
              "scorer.tiny.taste=brightness", "reward.weight=10"]
    job = _cfg(tmp_path / "r", *common)
    before = _held_out_before(tiny_model_dir, story, job)
    runs = {name: run_training(_cfg(tmp_path / name, *common, *extra), tmp_path / name, tiny_batches, scenes=scenes,
                               story_embeds=embeds)
            for name, extra in (("r", []), ("r2", ["trainer.seed=1"]), ("p", ["reward.weight=0"]))}
    assert {r.status for r in runs.values()} == {"finished"}
    gains = [_held_out_after(tmp_path / name) - before for name in ("r", "r2")]
    noise = abs(gains[0] - gains[1])  # two seeds of the same reward run
    drift = _held_out_after(tmp_path / "p") - before  # the same run without the reward
    assert min(gains) > 3 * noise and min(gains) > 0.05, (before, gains, drift)
    assert gains[0] - drift > 0.15, (gains, drift)  # and the diffusion loss alone moves it the other way
    rewards = [r["reward"] for r in read_metrics(tmp_path / "r") if r["type"] == "train"]
    assert len(rewards) == n and np.mean(rewards[-5:]) > np.mean(rewards[:5])  # the reward curve rises
    record = [r for r in read_metrics(tmp_path / "r") if r["type"] == "checkpoint"][-1]
    assert set(record["files"]) == {"diffusers", "kohya"}  # LoCon: DiffSynth's loader cannot hold it (skipped)
    _files_agree(tmp_path / "r", record, tiny_batches, tiny_model_dir)


def _files_agree(run_dir, record, tiny_batches, tiny_model_dir) -> None:
    """Every file of the checkpoint loads (project reader) into the same UNet output."""
    from types import SimpleNamespace

    from kolors_story.lora import load_lora_into_pipeline
    from kolors_story.models.loading import load_pipeline

    batch = {k: torch.stack([b[k] for b in tiny_batches[:1]]) for k in tiny_batches[0]}
    outputs = []
    for rel in record["files"].values():
        unet = load_pipeline(tiny_model_dir, text_encoder=False).unet
        load_lora_into_pipeline(SimpleNamespace(unet=unet), run_dir / rel)
        with torch.no_grad():
            outputs.append(unet(batch["latents"], torch.tensor([500]), encoder_hidden_states=batch["prompt_embeds"],
                                added_cond_kwargs={"text_embeds": batch["pooled_prompt_embeds"],
                                                   "time_ids": batch["add_time_ids"]}).sample)
    assert all(float((o - outputs[0]).abs().max()) < 1e-5 for o in outputs)


def test_weight_zero_is_the_plain_run_and_resume_is_exact(tmp_path, tiny_batches, story, tiny_model_dir):
    scenes, embeds = story
    steps = ["trainer.max_steps=6", "trainer.checkpoint_every_n_steps=100"]
    plain = run_training(_cfg(tmp_path / "plain", *RUN, "lora.dropout=0", *steps), tmp_path / "plain", tiny_batches,
                         scenes=scenes, story_embeds=embeds)
    zero = run_training(_cfg(tmp_path / "zero", *RUN, *REWARD, "reward.weight=0", *steps), tmp_path / "zero",
                        tiny_batches, scenes=scenes, story_embeds=embeds)
    assert plain.status == zero.status == "finished"
    assert _max_diff(_lora_state(tmp_path / "zero"), _lora_state(tmp_path / "plain")) == 0.0

    straight = run_training(_cfg(tmp_path / "a", *RUN, *REWARD, *steps), tmp_path / "a", tiny_batches,
                            scenes=scenes, story_embeds=embeds)
    cfg = _cfg(tmp_path / "b", *RUN, *REWARD, *steps)
    assert run_training(cfg, tmp_path / "b", tiny_batches, scenes=scenes, story_embeds=embeds,
                        extra_callbacks=[_InterruptAt(3)]).status == "interrupted"
    resumed = run_training(cfg, tmp_path / "b", tiny_batches, scenes=scenes, story_embeds=embeds,
                           resume_from=last_checkpoint(tmp_path / "b") / "trainer_state.ckpt")
    assert straight.status == resumed.status == "finished"
    assert _max_diff(_lora_state(tmp_path / "b"), _lora_state(tmp_path / "a")) <= 1e-6
    assert _max_diff(_lora_state(tmp_path / "a"), _lora_state(tmp_path / "plain")) > 1e-5  # the reward did act
    record = [r for r in read_metrics(tmp_path / "a") if r["type"] == "checkpoint"][-1]
    assert set(record["files"]) == {"diffusers", "kohya", "diffsynth"}  # an attention LoRA: all three formats
    _files_agree(tmp_path / "a", record, tiny_batches, tiny_model_dir)
    draft = run_training(_cfg(tmp_path / "d", *RUN, *REWARD, "reward.method=draft", "reward.draft_k=3", *steps),
                         tmp_path / "d", tiny_batches, scenes=scenes, story_embeds=embeds)
    assert draft.status == "finished"  # gradient through the last 3 steps (checkpointed UNet and decoder)
    assert _max_diff(_lora_state(tmp_path / "d"), _lora_state(tmp_path / "a")) > 1e-5


def test_init_from_refines_an_existing_lora_and_bad_settings_are_named(tmp_path, tiny_batches, story):
    from kolors_story.errors import SettingsError

    scenes, embeds = story
    steps = ["trainer.max_steps=2", "trainer.checkpoint_every_n_steps=100"]
    base = run_training(_cfg(tmp_path / "base", *RUN, "lora.dropout=0", *steps), tmp_path / "base", tiny_batches)
    assert base.status == "finished"
    job = _cfg(tmp_path / "ref", *RUN, *REWARD, "trainer.max_steps=1", f"reward.init_from={tmp_path / 'base'}",
               "optim.lr=0")
    assert run_training(job, tmp_path / "ref", tiny_batches, scenes=scenes, story_embeds=embeds).status == "finished"
    assert _max_diff(_lora_state(tmp_path / "ref"), _lora_state(tmp_path / "base")) < 1e-7  # lr 0: the same LoRA
    with pytest.raises(SettingsError, match=r"reward.refl_steps=\[3, 9\]"):
        run_training(_cfg(tmp_path / "bad", *RUN, *REWARD, "reward.refl_steps=[3,9]"), tmp_path / "bad",
                     tiny_batches, scenes=scenes, story_embeds=embeds)
