"""generate.py's library path on the tiny model: determinism, batching, LoRAs, samplers, hires,
best-of, run/checkpoint selection and the outputs a user reads (PNG text, prompts.csv, manifest)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kolors_story.story import Scene
from tests.helpers import REPO, compose, settings

STEPS = "sampler.steps=2"


# ------------------------------------------------------------------------------------ helpers


def make_lora(folder: Path, model_dir: Path, seed: int = 1, rank: int = 4, alpha: float = 4.0, std: float = 0.3,
              metadata: dict | None = None) -> dict[str, Path]:
    """A LoRA for the tiny UNet with random (non-zero) lora_B, saved in the three formats."""
    from kolors_story.lora import add_lora, save_lora
    from kolors_story.models.loading import load_pipeline

    pipe = load_pipeline(model_dir, text_encoder=False)
    add_lora(pipe.unet, rank=rank, alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return save_lora(pipe.unet, folder, metadata or {})


def run_generate(tmp: Path, *overrides: str, name: str = "out"):
    """The generate.py job on a composed config, output in tmp/name; returns (result dict, cfg)."""
    from kolors_story.cli import generate_from_config

    out = tmp / name
    cfg = compose("generate", ["model=tiny", STEPS, f"output_dir={out}", *overrides])
    r = generate_from_config(cfg)
    result = {"images": [str(p) for p in r.images], "panel": str(r.panel), "manifest": r.manifest.to_json(),
              "bundle": str(r.bundle) if r.bundle else None, "out_dir": str(r.out_dir)}
    return result, cfg


def pixels(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(folder / f"{i}.png").convert("RGB"), dtype=np.int16) for i in range(1, 9)]


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    return max(int(np.abs(x - y).max()) for x, y in zip(a, b))


TRAIN_META = {"style": "test watercolour", "config": {"lora": {"rank": 4, "alpha": 4.0}, "optim": {"lr": 0.0001},
                                                      "dataset": {"name": "demo"}}}
_SHARED: dict = {}


def shared_bundle(tmp_path_factory, model_dir: Path) -> dict:
    """One submission bundle per test session (made on first use, shared by test_submission and
    test_reproduce): a checkpoint folder with the three LoRA formats, rendered with submit.team."""
    if "bundle" not in _SHARED:
        tmp = tmp_path_factory.mktemp("bundle")
        ckpt = tmp / "run" / "checkpoints" / "step-000010"
        files = make_lora(ckpt, model_dir, seed=5, metadata=TRAIN_META)
        result, cfg = run_generate(tmp, f"lora_path={files['diffusers']}", "submit.team=Test Team",
                                   "story.trigger='test_style，'", name="out")
        _SHARED["bundle"] = {"tmp": tmp, "out": Path(result["out_dir"]), "bundle": Path(result["bundle"]),
                             "lora_files": files, "result": result, "cfg": cfg}
    return _SHARED["bundle"]


HIRES_BEST = ("sampler.hires.enabled=true", "sampler.hires.scale=1.5", "sampler.hires.steps=2",
              "sampler.hires.strength=0.5", "sampler.best_of.n=2")


def shared_hires_best(tmp_path_factory) -> dict:
    """One two-stage hires + best-of-2 render per session (checked here, reproduced in test_reproduce)."""
    if "hires_best" not in _SHARED:
        tmp = tmp_path_factory.mktemp("hires_best")
        result, cfg = run_generate(tmp, *HIRES_BEST, name="out")
        _SHARED["hires_best"] = {"out": Path(result["out_dir"]), "cfg": cfg}
    return _SHARED["hires_best"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_dir):
    """One base render (batch 8) and a LoRA, shared by the tests of this module."""
    tmp = tmp_path_factory.mktemp("gen")
    run_generate(tmp, "memory.release_text_encoder=true", name="base")
    lora = make_lora(tmp / "lora_a", tiny_model_dir, seed=1, metadata={"style": "test style"})
    return {"tmp": tmp, "base": tmp / "base", "lora": lora["diffusers"], "model": tiny_model_dir}


# ------------------------------------------------------------------------------------ outputs


def test_outputs_metadata_prompts_and_manifest(work):
    out = work["base"]
    manifest = json.loads((out / "manifest.json").read_text())
    from kolors_story.story import story_scenes

    job = settings("generate", ["model=tiny"])
    scenes = story_scenes(job.story, job.sampler)
    # PNG text chunks: prompt, negative, seed, sampler, steps, cfg, size, model hash, tiny note
    with Image.open(out / "4.png") as im:
        text = dict(im.text)
    params = json.loads(text["parameters"])
    assert params["prompt"] == scenes[3].prompt and text["prompt"] == scenes[3].prompt  # Chinese survives (iTXt)
    assert params["negative_prompt"] == scenes[3].negative
    assert params["seed"] == scenes[3].seed == 5  # idol_diary's baseline seeds
    assert (params["sampler"], params["steps"], params["cfg"], params["size"]) == ("euler", 2, 4.0, "64x64")
    assert params["model_hash"] == manifest["model"]["hash"] and params["loras"] == []
    assert "tiny" in params["tiny_model"]
    # prompts.csv
    rows = list(csv.DictReader((out / "prompts.csv").open(encoding="utf-8")))
    assert [r["scene"] for r in rows] == [str(i) for i in range(1, 9)]
    assert [r["prompt"] for r in rows] == [s.prompt for s in scenes]
    assert [r["negative"] for r in rows] == [s.negative for s in scenes]
    assert [r["description"] for r in rows] == [s.description for s in scenes]
    # manifest: resolved config, sha256 per image, the tiny model says so
    import hashlib

    for i in range(1, 9):
        assert manifest["images"][f"{i}.png"] == hashlib.sha256((out / f"{i}.png").read_bytes()).hexdigest()
    assert manifest["tiny_model"] is True and "tiny" in manifest["note"]
    assert manifest["config"]["sampler"]["steps"] == 2 and manifest["config"]["model"]["name"] == "tiny"
    assert "${" not in json.dumps(manifest["config"])  # fully resolved
    assert manifest["scheduler"]["class"] == "EulerDiscreteScheduler"
    assert manifest["scheduler"]["config"]["num_train_timesteps"] == 1100
    panel = Image.open(out / "panel.png")
    assert panel.width == 2 * 256 and panel.height > 4 * 256  # 4 rows x 2 columns plus title/captions


def test_batched_equals_per_scene(work):
    run_generate(work["tmp"], "sampler.batch_size=1", name="batch1")
    a, b = pixels(work["base"]), pixels(work["tmp"] / "batch1")
    assert max_diff(a, b) <= 2  # float rounding of batched matmuls only
    assert np.mean([np.abs(x - y).mean() for x, y in zip(a, b)]) < 0.05


def test_text_encoder_released_before_denoising(work):
    """memory.release_text_encoder: the prompts are encoded once, up front, and ChatGLM is dropped
    before any denoising (the render would fail if it re-encoded)."""
    manifest = json.loads((work["base"] / "manifest.json").read_text())
    assert manifest["memory"]["release_text_encoder"] is True
    assert manifest["memory"]["text_encoder_released_bytes"] > 0
    assert manifest["config"]["memory"]["release_text_encoder"] is True


# ------------------------------------------------------------------------------------ LoRAs


def test_lora_changes_the_image_and_scale_zero_gives_the_base(work, tiny_model_dir):
    from kolors_story.files import file_sha256

    second = make_lora(work["tmp"] / "lora_b", tiny_model_dir, seed=2)["kohya"]
    run_generate(work["tmp"], f"lora_path={work['lora']}", name="lora1")
    # both forms at once: `lora_path` plus a stacked `loras` entry, each at strength 0
    run_generate(work["tmp"], f"lora_path={work['lora']}", "lora_scale=0", f"loras=[{{path: '{second}', scale: 0}}]",
                 name="lora0")
    base, on, off = pixels(work["base"]), pixels(work["tmp"] / "lora1"), pixels(work["tmp"] / "lora0")
    assert min(int(np.abs(x - y).max()) for x, y in zip(base, on)) > 20  # every scene visibly changed
    # scale 0: the adapters are in the UNet but contribute nothing; peft-wrapped layers can change
    # float rounding (1e-6), so allow one grey level.
    assert max_diff(base, off) <= 1
    manifest = json.loads((work["tmp"] / "lora1" / "manifest.json").read_text())
    assert manifest["loras"] == [{"path": str(work["lora"]), "file": "lora.safetensors", "scale": 1.0,
                                  "sha256": file_sha256(work["lora"])}]
    stacked = json.loads((work["tmp"] / "lora0" / "manifest.json").read_text())["loras"]
    assert [(lo["file"], lo["scale"], lo["sha256"]) for lo in stacked] == [
        ("lora.safetensors", 0.0, file_sha256(work["lora"])), ("lora_kohya.safetensors", 0.0, file_sha256(second))]
    params = json.loads(Image.open(work["tmp"] / "lora0" / "1.png").text["parameters"])
    assert params["loras"] == [{"file": lo["file"], "sha256": lo["sha256"], "scale": 0.0} for lo in stacked]


def test_missing_lora_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        run_generate(tmp_path, f"lora_path={tmp_path / 'nope.safetensors'}")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ samplers


def test_samplers_build_from_the_model_config_and_stay_seeded(tiny_pipe):
    from kolors_story.generate.render import generate_story
    from kolors_story.generate.sampler import sampler_settings
    from kolors_story.generate.schedulers import build_scheduler
    from kolors_story.models.prompts import encode_scenes

    base_config = tiny_pipe.scheduler.config
    scenes = [Scene(1, "a", "一个女孩", "模糊", 3), Scene(2, "b", "一个男孩", "模糊", 4)]
    embeds = encode_scenes(tiny_pipe, scenes)
    together = sampler_settings(steps=2, height=64, width=64, batch_size=2, seeds=None)

    def render(settings):
        return [np.asarray(i, dtype=np.int16) for i in generate_story(tiny_pipe, scenes, embeds, settings,
                                                                       progress=False).images]

    euler = render(together)
    for name in ("dpmpp_2m_karras", "ddim", "unipc", "euler_a"):
        tiny_pipe.scheduler = build_scheduler(name, base_config)
        assert tiny_pipe.scheduler.config.num_train_timesteps == 1100  # the model's noise schedule is kept
        assert tiny_pipe.scheduler.config.beta_end == pytest.approx(0.014)
        images = render(together)
        assert max_diff(images, euler) > 0, name  # a different sampler is really used
    # euler_a draws fresh noise every step: it still comes from each scene's own seed
    again, alone = render(together), render(sampler_settings(steps=2, height=64, width=64, batch_size=1, seeds=None))
    assert all((a == b).all() for a, b in zip(images, again))
    assert max_diff(images, alone) <= 2


def test_unknown_sampler_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="sampler.scheduler='dpm_fast'.*dpmpp_2m_karras"):
        run_generate(tmp_path, "sampler.scheduler=dpm_fast")


# ------------------------------------------------------------------------------------ hires, best-of


def test_hires_and_best_of_run_and_are_recorded(tmp_path_factory, tiny_model_dir):
    from kolors_story.config.compose import to_settings
    from kolors_story.evaluate.scorer import AestheticScorer

    made = shared_hires_best(tmp_path_factory)
    out = made["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(Image.open(out / f"{i}.png").size == (96, 96) for i in range(1, 9))  # 64 x 1.5
    hires = manifest["hires"]
    assert hires["stage1_size"] == [64, 64] and hires["final_size"] == [96, 96]
    assert (hires["strength"], hires["steps"], hires["refine_steps_run"], hires["upscaler"]) == (0.5, 2, 1, "lanczos")
    assert manifest["best_of"]["n"] == 2 and manifest["best_of"]["selected_by"] == "aesthetic score"
    scorer = AestheticScorer.from_settings(to_settings(made["cfg"], "generate").scorer)
    rescored = scorer.score([Image.open(out / f"{i}.png") for i in range(1, 9)])
    for n, scene in enumerate(manifest["scenes"]):
        cands = scene["candidates"]
        assert [c["seed"] for c in cands] == [scene["scene_seed"], scene["scene_seed"] + 1000]
        assert all(isinstance(c["score"], float) for c in cands)
        best = max(range(2), key=lambda k: (cands[k]["score"], -k))
        assert scene["chosen_candidate"] == best and scene["seed"] == cands[best]["seed"]
        assert scene["score"] == pytest.approx(cands[best]["score"], abs=1e-5)
        assert rescored[n] == pytest.approx(cands[best]["score"], abs=1e-4)  # the kept file is the scored image
    params = json.loads(Image.open(out / "1.png").text["parameters"])
    assert params["hires"]["strength"] == 0.5 and params["best_of"]["n"] == 2 and params["size"] == "96x96"


def test_hires_without_refine_steps_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="sampler.hires.steps=2 x sampler.hires.strength=0.3"):
        run_generate(tmp_path, "sampler.hires.enabled=true", "sampler.hires.steps=2", "sampler.hires.strength=0.3")


# ------------------------------------------------------------------------------------ run= / checkpoint=


@pytest.fixture()
def fake_run(tmp_path, work):
    """A train.py run folder in the documented layout: .hydra/config.yaml + two checkpoints + last."""
    from omegaconf import OmegaConf, open_dict

    run = tmp_path / "sweep" / "0_lora.rank=4"
    train_cfg = compose("train", ["model=tiny", "story=ink_dream", "sampler.steps=2"])
    with open_dict(train_cfg):
        del train_cfg["hydra"]
        train_cfg.output_dir = str(run)
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(train_cfg, run / ".hydra" / "config.yaml")
    make_lora(run / "checkpoints" / "step-000002", work["model"], seed=3)
    make_lora(run / "checkpoints" / "step-000004", work["model"], seed=4)
    (run / "checkpoints" / "last").write_text("checkpoints/step-000004\n")
    return run


def test_checkpoint_resolution(fake_run):
    import yaml

    from kolors_story.config.saved import resolve_checkpoint

    ckpts = fake_run / "checkpoints"
    assert resolve_checkpoint(fake_run, "last").checkpoint == (ckpts / "step-000004").resolve()
    assert resolve_checkpoint(fake_run, "step-000002").lora == (ckpts / "step-000002" / "lora.safetensors").resolve()
    assert resolve_checkpoint(fake_run, 2).checkpoint.name == "step-000002"
    with pytest.raises(FileNotFoundError, match="step-000009.*have: step-000002, step-000004"):
        resolve_checkpoint(fake_run, "step-000009")
    with pytest.raises(FileNotFoundError, match="best.yaml"):
        resolve_checkpoint(fake_run, "best")
    # the leaderboard's best.yaml (in the sweep folder): run + checkpoint
    best = fake_run.parent / "best.yaml"
    best.write_text(yaml.safe_dump({"run": str(fake_run), "checkpoint": "checkpoints/step-000002", "mean": 6.1}))
    assert resolve_checkpoint(fake_run, "best").checkpoint.name == "step-000002"
    assert resolve_checkpoint(best, None).checkpoint.name == "step-000002"  # run=<best.yaml>
    assert resolve_checkpoint(None, str(best)).run == fake_run.resolve()  # checkpoint=<best.yaml>


def test_run_and_checkpoint_take_the_runs_story_and_the_checkpoint_lora(fake_run, tmp_path):
    from kolors_story.config.saved import effective_config

    # the user's own command-line choices still win over the run's
    # a sweep job folder has '=' in its name: Hydra needs the value quoted
    cfg = compose("generate", ["model=tiny", f"run='{fake_run}'", "checkpoint=last", "sampler.cfg=3.5",
                               f"output_dir={tmp_path / 'x'}"])
    eff, ref = effective_config(cfg)
    assert eff.story.title == "InkPaintingClassroomDream" and eff.sampler.steps == 2 and eff.sampler.cfg == 3.5
    assert Path(eff.lora_path) == ref.lora and ref.checkpoint.name == "step-000004"
    with pytest.raises(ValueError, match="run= supplies the LoRA"):
        effective_config(compose("generate", ["model=tiny", f"run='{fake_run}'", f"lora_path='{ref.lora}'"]))

    result, _ = run_generate(tmp_path, f"run='{fake_run}'", "checkpoint=step-000002", name="from_run")
    manifest = result["manifest"]
    assert manifest["story"]["title"] == "InkPaintingClassroomDream"
    assert manifest["source"]["checkpoint"] == "step-000002" and manifest["source"]["run"] == str(fake_run.resolve())
    assert manifest["loras"][0]["path"] == str(fake_run.resolve() / "checkpoints" / "step-000002" / "lora.safetensors")


# ------------------------------------------------------------------------------------ CLI, -m


@pytest.mark.slow
def test_multirun_over_loras_gives_each_job_its_folder(work, tiny_model_dir, tmp_path):
    second = make_lora(tmp_path / "lora_b", tiny_model_dir, seed=2)["diffusers"]
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [sys.executable, "generate.py", "-m", "model=tiny", "sampler.steps=1", f"lora_path={work['lora']},{second}",
         f"hydra.sweep.dir={sweep}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / "manifest.json").exists())
    assert len(jobs) == 2
    used = [json.loads((j / "manifest.json").read_text())["loras"][0]["path"] for j in jobs]
    assert used == [str(work["lora"]), str(second)]
    assert max_diff(pixels(jobs[0]), pixels(jobs[1])) > 0
    assert "scenes" in out.stderr and "8/8" in out.stderr  # the progress bar counts scenes
