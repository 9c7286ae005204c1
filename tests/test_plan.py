"""The memory plan: real Kolors sizes counted on the meta device (no weights, no GPU), memory=auto's
choices for 24 / 16 / 12 GB cards, refusal before loading when nothing fits, the count against
measurement on real tensors, and the out-of-memory retry of a generation batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from kolors_story.plan import count
from kolors_story.plan.auto import make_plan
from kolors_story.plan.stages import GB, planning_sizes
from tests.helpers import REPO, compose, settings


def _plan(kind: str, overrides: list[str], fixed=frozenset()):
    job = settings(kind, overrides)
    return make_plan(kind, job, planning_sizes(job.model, job.scorer), set(fixed))


# ----------------------------------------------------------------- real sizes, meta device


def test_default_generate_fits_24_gb_by_changing_what_runs_out():
    """Everything resident at batch 8 without slicing needs more than a 24 GB card: auto changes it."""
    as_is, plan_off = _plan("generate", ["model=kolors", "memory.budget_gb=24", "memory.auto=false"])
    assert plan_off.budget == 24 * GB and not plan_off.fits
    assert plan_off.worst.name == "decode" and plan_off.worst.peak > 22 * GB
    job, plan = _plan("generate", ["model=kolors", "memory.budget_gb=24"])
    assert job.memory.auto and plan.fits and all(st.peak <= plan.usable for st in plan.stages)
    assert plan.chosen, "the default settings do not fit: auto must change something"
    changed = (job.memory.release_text_encoder, job.memory.vae_slicing, job.sampler.batch_size < 8,
               job.memory.offload != "none")
    assert any(changed)
    # every stage of the plan counts the real models: ChatGLM3 12.5 GB, the UNet 5.2 GB in fp16
    encode = next(st for st in plan.stages if st.name == "encode prompts")
    assert encode.weights > 12.4 * GB


def test_default_training_fits_24_gb():
    job, plan = _plan("train", ["model=kolors", "memory.budget_gb=24"])
    assert plan.fits and {st.name for st in plan.stages} >= {"train step", "validation: denoise", "cache: VAE latents"}
    step = next(st for st in plan.stages if st.name == "train step")
    assert step.weights > 5 * GB  # the fp16 UNet, the LoRA's AdamW state, VAE and scorer beside it


def test_curation_and_adapter_types_are_counted_at_real_size():
    """filter.min_aesthetic adds the predictor's stage (ViT-L/14 fp32 ~1.2 GB, alone), the strong captioner its
    own (8.3 B in bf16, alone: fits 24 GB). (DoRA against LoRA at real size: tests/test_bench.py.)"""
    _, plain = _plan("train", ["model=kolors", "memory.budget_gb=24"])
    _, curated = _plan("train", ["model=kolors", "memory.budget_gb=24", "filter.min_aesthetic=5.0"])
    stage = next(st for st in curated.stages if st.name == "data: aesthetic curation")
    assert 1.0 * GB < stage.weights < 1.4 * GB and stage.peak < curated.worst.peak
    assert "data: aesthetic curation" not in {st.name for st in plain.stages}
    _, captioned = _plan("train", ["model=kolors", "memory.budget_gb=24", "dataset.captioner=qwen2_5_vl"])
    stage = next(st for st in captioned.stages if st.name == "data: captions")  # Qwen2.5-VL-7B, bf16
    assert 16 * GB < stage.weights < 17 * GB and stage.peak < 24 * GB and captioned.fits


def test_prompt_alignment_counts_clip_with_its_text_tower():
    """CLIP ViT-L/14 with both towers (428 M parameters, fp32) is counted where CLIP-T runs."""
    _, with_clip = _plan("evaluate", ["model=kolors", "memory.budget_gb=24"])
    _, without = _plan("evaluate", ["model=kolors", "memory.budget_gb=24", "scorer.alignment=false"])
    clip = with_clip.stages[0].weights - without.stages[0].weights
    assert 1.65 * GB < clip < 1.75 * GB
    _, scene = _plan("generate", ["model=kolors", "memory.budget_gb=80", "sampler.best_of.n=2"])
    _, story = _plan("generate", ["model=kolors", "memory.budget_gb=80", "sampler.best_of.n=2",
                                  "sampler.best_of.select=story"])
    assert story.worst.weights - scene.worst.weights == pytest.approx(clip, rel=1e-6)  # only select=story needs it


def test_12_gb_takes_offload_and_the_text_encoder_never_fits_whole():
    job, plan = _plan("generate", ["model=kolors", "memory.budget_gb=12"])
    assert plan.fits and job.memory.offload != "none"
    assert count.param_bytes("text_encoder", count.key(__import__("kolors_story.models.architectures", fromlist=["x"])
                                                         .KOLORS_TEXT_ENCODER_CONFIG), "float16") > 12 * GB * 0.9


def test_explicit_settings_are_kept():
    fixed = {"memory.release_text_encoder", "sampler.batch_size"}
    job, plan = _plan("generate", ["model=kolors", "memory.budget_gb=24", "memory.release_text_encoder=false",
                                   "sampler.batch_size=8"], fixed)
    assert plan.fits and job.memory.release_text_encoder is False and job.sampler.batch_size == 8
    assert "memory.release_text_encoder" not in plan.chosen and job.memory.vae_slicing  # it found another way


def test_nothing_fits_is_refused_before_loading_with_the_stage_named(tmp_path, monkeypatch, capsys):
    from kolors_story.cli import generate_main
    from kolors_story.generate import (
        job as generate_run,  # imported before patching: it binds the loader
    )

    monkeypatch.setattr(generate_run, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_:
        generate_main(compose("generate", ["model=kolors", "memory.budget_gb=2", f"output_dir={tmp_path}"]))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "does not fit the GPU" in err and "stage '" in err and "GB" in err and "Nothing was loaded" in err
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["fits"] is False and plan["budget_gb"] == 2.0 and plan["stages"]
    # the user's own settings that cannot fit are refused the same way
    with pytest.raises(SystemExit):
        generate_main(compose("generate", ["model=kolors", "memory.budget_gb=24", "memory.auto=false",
                                           f"output_dir={tmp_path / 'b'}"]))
    assert "let memory.auto=true choose" in capsys.readouterr().err


@pytest.mark.slow
def test_plan_only_cli_needs_no_weights_and_no_gpu(tmp_path):
    """`python generate.py plan_only=true model=kolors memory.budget_gb=24` on this machine."""
    out = subprocess.run([sys.executable, "generate.py", "plan_only=true", "model=kolors", "memory.budget_gb=24",
                          f"hydra.run.dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["budget_gb"] == 24.0 and plan["fits"] is True and not (tmp_path / "1.png").exists()
    assert "Memory plan" in out.stdout and "nothing was loaded" in out.stdout
    keys = {k for st in plan["stages"] for k in st}
    assert {"name", "peak_gb", "batch_size", "vae_slicing", "vae_tiling", "release_text_encoder", "offload"} <= keys


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_plan_only_on_training_and_evaluation(tmp_path, kind, capsys):
    from kolors_story import cli

    main = {"train": cli.train_main, "evaluate": cli.evaluate_main}[kind]
    with pytest.raises(SystemExit) as exit_:
        main(compose(kind, ["plan_only=true", "model=kolors", "memory.budget_gb=24", f"output_dir={tmp_path}"]))
    assert exit_.value.code == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["fits"] and plan["budget_gb"] == 24.0 and all(st["peak_gb"] <= 24 for st in plan["stages"])
    if kind == "train":
        assert any("gradient_checkpointing" in st for st in plan["stages"])
    with pytest.raises(SystemExit) as exit_:
        main(compose(kind, ["plan_only=true", "model=kolors", "memory.budget_gb=1", f"output_dir={tmp_path / 's'}"]))
    assert exit_.value.code == 2 and "does not fit the GPU" in capsys.readouterr().err


# ----------------------------------------------------------------- count vs measurement


def _within(predicted: int, measured: int, tol: float = 0.10) -> bool:
    return abs(predicted - measured) <= tol * measured


def _measure(fn) -> int:
    from kolors_story.accounting import PeakTensorMemory

    with PeakTensorMemory() as mem:
        fn()
    return mem.peak


def _check_counts(pipe, size: int):
    """Denoise, VAE decode and a LoRA training step: the meta-device count against the same code on
    real CPU tensors (where SDPA runs its fused kernel, as on a GPU)."""
    from kolors_story.lora import add_lora
    from kolors_story.models.checkpointing import set_gradient_checkpointing
    from kolors_story.models.prompt_projections import keep_across_steps, kept_across_steps

    unet, vae = pipe.unet, pipe.vae
    ukey, vkey = count.key(dict(unet.config)), count.key(dict(vae.config))
    x, t, enc, added = count.unet_inputs(unet, 4, size, size, 256, torch.float32, device="cpu")
    with torch.no_grad():
        measured = _measure(lambda: unet(x, t, encoder_hidden_states=enc, added_cond_kwargs=added))
    assert _within(count.unet_call(ukey, 4, size, size, "float32"), measured), "denoise"
    keep_across_steps(unet)  # a later step, with the first step's prompt projections held
    with torch.no_grad(), kept_across_steps(unet):
        later = _measure(lambda: [unet(x, t, encoder_hidden_states=enc, added_cond_kwargs=added) for _ in range(2)])
    keep_across_steps(unet, False)
    assert later > measured and _within(count.unet_call(ukey, 4, size, size, "float32", keep=True), later), "kept"
    z = torch.randn(2, 4, size // 8, size // 8)
    with torch.no_grad():
        measured = _measure(lambda: vae.decode(z))
    assert _within(count.vae_decode(vkey, 2, size, size, "float32"), measured), "decode"
    unet.requires_grad_(False)
    add_lora(unet, rank=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    unet.train()

    def step():
        out = unet(x[:1], t[:1], encoder_hidden_states=enc[:1],
                   added_cond_kwargs={k: v[:1] for k, v in added.items()}, return_dict=False)[0]
        out.float().square().mean().backward()

    for checkpointing in (False, True):  # with it, the kept prompt projections count too
        set_gradient_checkpointing(unet, checkpointing)
        measured = _measure(step)
        predicted = count.train_step(ukey, 1, size, size, "float32", checkpointing, 4,
                                     ("to_q", "to_k", "to_v", "to_out.0"))
        assert _within(predicted, measured), f"train step, checkpointing={checkpointing}: {predicted} vs {measured}"
    set_gradient_checkpointing(unet, False)


def test_count_matches_measurement_on_the_tiny_model(tiny_pipe):
    _check_counts(tiny_pipe, 64)


def test_counts_sharing_one_meta_lora_unet_equal_counts_on_fresh_builds():
    """The meta LoRA UNet is built once per adapter and shared by the counts: each count equals the
    same count on a new build, whichever count ran on it before (the gradients of a backward, the
    checkpointing of a step must not carry over: the next count would come out lower)."""
    from kolors_story.tiny.architectures import tiny_predictor_config, tiny_unet_config, tiny_vae_config

    unet, vae, scorer = count.key(tiny_unet_config()), count.key(tiny_vae_config()), count.key(tiny_predictor_config())
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    counts = {
        "step, checkpointing": lambda: count.train_step(unet, 2, 64, 64, "float16", True, 4, targets),
        "step": lambda: count.train_step(unet, 2, 64, 64, "float16", False, 4, targets),
        "forward held": lambda: count.train_forward_held(unet, 2, 64, 64, "float16", False, 4, targets),
        "reward step": lambda: count.reward_step(unet, vae, scorer, 1, 64, "float16", True, 4, targets),
        "lora params": lambda: count.lora_params(unet, 4, targets),
    }
    results = (count.train_step, count.train_forward_held, count.reward_step, count.lora_params)

    def run(name: str, new_build: bool) -> int:
        for cached in results:
            cached.cache_clear()
        if new_build:
            count._built_lora_unet.cache_clear()
        return counts[name]()

    alone = {name: run(name, new_build=True) for name in counts}
    count._built_lora_unet.cache_clear()
    for order in (list(counts), list(reversed(counts))):
        assert {name: run(name, new_build=False) for name in order} == alone, order
    assert count._built_lora_unet.cache_info().misses == 1  # one build served every count


@pytest.mark.slow
def test_count_matches_measurement_on_the_bench_model(tmp_path_factory, offline_env):
    from pathlib import Path

    from kolors_story.models.loading import load_pipeline
    from kolors_story.tiny.architectures import BENCH_RESOLUTION
    from kolors_story.tiny.kolors import BENCH_VERSION, ensure_bench_model

    folder = ensure_bench_model(Path(offline_env["KOLORS_STORY_CACHE"]) / f"bench-kolors-v{BENCH_VERSION}")
    _check_counts(load_pipeline(folder), BENCH_RESOLUTION)


# ----------------------------------------------------------------- out of memory: retry smaller


def _pixels(folder):
    return [np.asarray(Image.open(folder / f"{i}.png").convert("RGB")) for i in range(1, 9)]


def test_an_out_of_memory_batch_is_rendered_in_halves(tmp_path, tiny_model_dir, monkeypatch):
    from diffusers import UNet2DConditionModel

    from kolors_story.cli import generate_from_config

    real_forward = UNet2DConditionModel.forward
    raised = []

    def forward(self, sample, *a, **k):
        if sample.shape[0] == 16 and not raised:  # 8 scenes x CFG: the first full batch
            raised.append(True)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        return real_forward(self, sample, *a, **k)

    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    forced = generate_from_config(compose("generate", ["model=tiny", "sampler.steps=2", "sampler.batch_size=8",
                                                       f"output_dir={tmp_path / 'a'}"]))
    monkeypatch.setattr(UNet2DConditionModel, "forward", real_forward)
    assert raised and len(forced.images) == 8
    retries = forced.manifest.memory["oom_retries"]
    assert retries == [{"jobs": list(range(8)), "batch_size": 8, "then": [4, 4]}]
    plain = generate_from_config(compose("generate", ["model=tiny", "sampler.steps=2", "sampler.batch_size=4",
                                                      f"output_dir={tmp_path / 'b'}"]))
    assert plain.manifest.memory["oom_retries"] == []
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(tmp_path / "a"), _pixels(tmp_path / "b")))


def test_the_plan_counts_chatglm_after_diffsynth_turned_on_the_cpu_fuser():
    """Importing DiffSynth's Kolors text encoder turns on TorchScript's CPU fuser for the whole
    process; ChatGLM's scripted rotary embedding then asked that fuser for the meta device and the
    plan failed ("Unknown device for graph fuser") in any process that had loaded DiffSynth."""
    import json

    import diffsynth.models.kolors_text_encoder  # noqa: F401 - the import is the point

    from kolors_story.models.architectures import KOLORS_TEXT_ENCODER_CONFIG
    from kolors_story.plan import count

    config = count.key({**KOLORS_TEXT_ENCODER_CONFIG, "num_layers": 2})
    assert json.loads(config)["num_layers"] == 2
    assert count.text_encode(config, 3, "float16") > 2 * 256 * 4096 * 2
    from kolors_story.bench.flops import count_text_encoder

    assert count_text_encoder(json.loads(config), 16) > 0  # the bench's and the GPU check's FLOP count
