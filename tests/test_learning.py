"""Training works, shown on the pre-trained tiny Kolors (``model.tiny.weights=pretrained``):

(a) the base model draws what its captions say (its renders' sky and ground colours are closer to
    their own caption's than to another caption's);
(b) a LoRA trained on the ink-wash demo set moves the story toward the style set, by far more than
    the seed-to-seed noise of the measure;
(c) a LoRA trained on scenes with a new layout (the horizon at 30 % of the height instead of 55 %)
    moves the renders' horizon there, and the same training with a broken objective does not: the
    check has teeth. (b)'s colour measure has none: LoRAs trained with a broken objective move the
    palette toward ink wash too (distance moved on the demo: correct 0.21-0.23; noise added at
    timestep 1099 - t 0.25-0.30; v-prediction target 0.13), so the teeth are in (c), which
    measures content: where the renders put their horizon.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tests.helpers import compose, settings

PRETRAINED = ["model=tiny", "model.tiny.weights=pretrained"]


def test_the_shipped_weights_match_their_record_and_a_changed_file_is_refused(tmp_path):
    from kolors_story.tiny.architectures import (
        pretrained_unet_config,
        pretrained_vae_config,
    )
    from kolors_story.tiny.kolors import build_tiny_components
    from kolors_story.tiny.shipped import (
        PRETRAINED_DIR,
        PretrainedTinyError,
        load_pretrained_into,
    )

    parts = build_tiny_components(0, unet_config=pretrained_unet_config(), vae_config=pretrained_vae_config())
    record = load_pretrained_into(parts)  # the sha256 of both shipped files is checked here
    assert record["vae_scaling_factor"] == parts["vae"].config.scaling_factor
    copy = shutil.copytree(PRETRAINED_DIR, tmp_path / "weights")
    blob = bytearray((copy / "unet.safetensors").read_bytes())
    blob[-1] ^= 1  # one bit of one weight
    (copy / "unet.safetensors").write_bytes(bytes(blob))
    with pytest.raises(PretrainedTinyError, match="unet.safetensors.*does not match"):
        load_pretrained_into(parts, copy)
    with pytest.raises(Exception, match="model.tiny.seed=1"):
        settings_model = settings("train", [*PRETRAINED, "model.tiny.seed=1", f"model.path={tmp_path / 'm'}"]).model
        from kolors_story.models.loading import ensure_model

        ensure_model(settings_model)


def test_pretraining_is_deterministic(tmp_path):
    """The build script gives the same bytes twice (a short run of it: same code path)."""
    from kolors_story.tiny.pretrain import pretrain

    records = [pretrain(tmp_path / f"run{i}", scenes=32, vae_steps=2, unet_steps=2, seed=0,
                        threads=torch.get_num_threads()) for i in range(2)]
    assert records[0]["sha256"] == records[1]["sha256"]
    assert (tmp_path / "run0" / "unet.safetensors").read_bytes() == (tmp_path / "run1" / "unet.safetensors").read_bytes()


@pytest.fixture(scope="module")
def base_pipe():
    from kolors_story.models.loading import ensure_model, load_pipeline

    return load_pipeline(ensure_model(settings("train", PRETRAINED).model))


def _render(pipe, prompts: list[str], seed: int, steps: int = 20):
    return [pipe(prompt=p, negative_prompt="", num_inference_steps=steps, guidance_scale=5.0, height=64, width=64,
                 generator=torch.Generator().manual_seed(seed + i)).images[0] for i, p in enumerate(prompts)]


def test_the_base_model_draws_what_its_captions_say(base_pipe):
    from kolors_story.tiny.scenes import caption_distance, random_scene

    rng = np.random.default_rng(2024)  # scenes drawn for this test, not the training set's
    scenes = [random_scene(rng) for _ in range(8)]
    renders = _render(base_pipe, [s.caption for s in scenes], seed=500)
    own = np.mean([caption_distance(im, s) for im, s in zip(renders, scenes)])
    shuffled = np.mean([caption_distance(im, scenes[(i + 1) % 8]) for i, im in enumerate(renders)])
    assert own < 0.6 * shuffled, (own, shuffled)


def _train_demo(run_dir, data_dir) -> dict:
    """train.py model=tiny(pre-trained) dataset=demo, short; returns its before_after.json."""
    from kolors_story.cli import train_from_config

    cfg = compose("train", [*PRETRAINED, "dataset=demo", "filter=none", f"data_dir={data_dir}",
                            f"output_dir={run_dir}", "logger=none", "trainer.max_epochs=1",
                            "trainer.steps_per_epoch=200", "trainer.checkpoint_every_n_steps=200",
                            "scorer.alignment=false"])
    train_from_config(cfg)
    return json.loads((run_dir / "before_after.json").read_text())


def _story_at_other_seeds(out_dir) -> list:
    """The story rendered by generate.py's code with the base model at seeds 1000.. (not the story's)."""
    from kolors_story.generate.job import generate

    job = settings("generate", [*PRETRAINED, "sampler=validation", "sampler.seeds=null", "sampler.base_seed=1000",
                                f"output_dir={out_dir}", "scorer.alignment=false"])
    return generate(job, progress=False).render.images


@pytest.mark.slow
def test_a_lora_moves_the_story_toward_the_style_set(tmp_path):
    from kolors_story.evaluate.style import mean_statistics, style_distance

    good = _train_demo(tmp_path / "good", tmp_path / "data")
    # Seed-to-seed noise of the measure: the base model's story at other seeds, against the same style set.
    other = style_distance(mean_statistics(_story_at_other_seeds(tmp_path / "other")), good["style"])
    noise = abs(other - good["distance_before"])
    margin = max(5 * noise, 0.05)
    assert good["moved"] > margin, (good, noise)
    assert good["after"]["saturation"] < good["before"]["saturation"]  # from the colourful look toward ink wash
    assert (tmp_path / "good" / "before_after.png").is_file()


NEW_HORIZON = 0.3  # the layout the LoRA of (c) learns; the base model puts its horizon at 0.55


def _layout_lora(tmp_path, monkeypatch, broken: bool) -> tuple[float | None, float]:
    """Train a LoCon on 256 captioned base scenes drawn with the horizon at ``NEW_HORIZON``; return
    the mean distance of the renders' horizon from it, for 8 held-out captions at LoRA scale 0 (not
    for ``broken``) and 1.
    ``broken``: the training adds noise for timestep 1099 - t while telling the UNet t (a reversed
    timestep convention: the objective no longer matches the sampler)."""
    from diffusers import DDPMScheduler

    from kolors_story.cli import train_from_config
    from kolors_story.lora.adapter import load_lora_into_pipeline
    from kolors_story.models.loading import ensure_model, load_pipeline
    from kolors_story.tiny.scenes import draw_scene, horizon_height, random_scene

    raw = tmp_path / "data" / "raw"
    if not raw.is_dir():
        raw.mkdir(parents=True)
        rng = np.random.default_rng(77)
        for i in range(256):
            scene = random_scene(rng)
            draw_scene(scene, rng, 64, horizon=NEW_HORIZON).save(raw / f"{i:03d}.png")
            (raw / f"{i:03d}.txt").write_text(scene.caption, encoding="utf-8")
    run_dir = tmp_path / ("broken" if broken else "correct")
    cfg = compose("train", [*PRETRAINED, "dataset=folder", f"dataset.path={raw}", "filter=none",
                            f"data_dir={tmp_path / 'data'}", f"output_dir={run_dir}", "logger=none", "lora=locon",
                            "optim.lr=2e-3", "trainer.batch_size=8", "trainer.max_epochs=1",
                            "trainer.steps_per_epoch=400", "trainer.checkpoint_every_n_steps=400", "validate=false"])
    with monkeypatch.context() as patch:
        if broken:
            add_noise = DDPMScheduler.add_noise
            patch.setattr(DDPMScheduler, "add_noise",
                          lambda self, x, noise, t: add_noise(self, x, noise, self.config.num_train_timesteps - 1 - t))
        train_from_config(cfg)
    pipe = load_pipeline(ensure_model(settings("train", PRETRAINED).model))
    rng = np.random.default_rng(2024)
    prompts = [random_scene(rng).caption for _ in range(8)]
    error = lambda images: float(np.mean([abs(horizon_height(im) - NEW_HORIZON) for im in images]))  # noqa: E731
    before = None if broken else error(_render(pipe, prompts, seed=500))  # the base model: the same either way
    load_lora_into_pipeline(pipe, next(run_dir.rglob("lora.safetensors")), 1.0)
    return before, error(_render(pipe, prompts, seed=500))


@pytest.mark.slow
def test_a_lora_learns_a_new_layout_and_a_broken_objective_does_not(tmp_path, monkeypatch):
    before, correct = _layout_lora(tmp_path, monkeypatch, broken=False)
    assert before > 0.2, before  # the base model draws its own horizon (0.55)
    assert correct < 0.08, (before, correct)  # measured: 0.05
    # The teeth: the same check on a LoRA trained with the timestep convention reversed fails.
    _, broken = _layout_lora(tmp_path, monkeypatch, broken=True)
    assert broken > 0.08, (correct, broken)  # measured: 0.14
