"""LoRA files on the tiny Kolors: each format reloads into a fresh pipeline and gives the same image.

Images are compared as float arrays in [0, 1]. Bit-equality is not asserted: MKL's CPU matmuls
may round differently depending on memory alignment (a pipeline that also holds LoRA tensors
allocates differently), which moves pixels by ~1e-5. TOL is 1e-4, while the LoRA used here moves
the image by > 1e-2, so every comparison below can fail for a wrong key, rank, alpha or scale.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kolors_story.files import file_sha256
from kolors_story.lora import (
    LoraFormatError,
    add_lora,
    add_lora_from_settings,
    load_lora_into_pipeline,
    lora_scales,
    read_lora,
    save_lora,
    set_lora_scales,
)
from kolors_story.lora.files import CKPT_META_PREFIX

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4
EFFECT = 1e-2  # a LoRA must move the image at least this much
METADATA = {"base_model_hash": "abc123", "dataset_hash": "def456", "config": {"lora": {"rank": 4}}}


def fresh_pipe(model_dir):
    """A new pipeline from disk without the text encoder (embeddings are precomputed)."""
    from kolors_story.models.loading import load_pipeline

    return load_pipeline(model_dir, text_encoder=False)


def render(pipe, embeds) -> np.ndarray:
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    out = pipe(**embeds, latents=latents, num_inference_steps=2, guidance_scale=5.0, height=64, width=64,
               output_type="np")
    return out.images[0]


def randomise_lora(unet, adapter_name: str, seed: int, std: float = 0.3) -> None:
    """peft starts lora_B at zero (no effect): give A and B values so the LoRA changes the image."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if (".lora_A." in name or ".lora_B." in name) and f".{adapter_name}." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.fixture(scope="module")
def made(tiny_model_dir, tmp_path_factory):
    """Base image, an in-memory LoRA (rank 4, alpha 2) and its image, its three files, a second LoRA."""
    from kolors_story.models.loading import load_pipeline
    from kolors_story.models.prompts import encode_scenes
    from kolors_story.story import Scene

    full = load_pipeline(tiny_model_dir)
    embeds = encode_scenes(full, [Scene(1, "d", "a girl reading by a window, ink painting", "ugly, blurry", 0)])
    del full
    pipe = fresh_pipe(tiny_model_dir)
    base = render(pipe, embeds)
    add_lora(pipe.unet, rank=4, alpha=2.0)
    randomise_lora(pipe.unet, "default", seed=1)
    lora_img = render(pipe, embeds)
    from peft.utils import get_peft_model_state_dict

    peft_sd = {k: v.clone() for k, v in get_peft_model_state_dict(pipe.unet).items()}
    out = tmp_path_factory.mktemp("lora")
    files = save_lora(pipe.unet, out / "a", METADATA)

    other = fresh_pipe(tiny_model_dir)
    add_lora(other.unet, rank=2, alpha=1.0, adapter_name="second")
    randomise_lora(other.unet, "second", seed=2)
    files_b = save_lora(other.unet, out / "b", {"name": "second"}, adapter_name="second")
    return SimpleNamespace(embeds=embeds, base=base, lora_img=lora_img, files=files, files_b=files_b,
                           peft_sd=peft_sd, out=out, unet_config=pipe.unet.config, model_dir=tiny_model_dir)


def test_lora_changes_the_image(made):
    assert maxdiff(made.lora_img, made.base) > EFFECT


def test_save_writes_three_files_with_rank_alpha_targets_metadata(made):
    assert {k: p.name for k, p in made.files.items()} == {
        "diffusers": "lora.safetensors", "kohya": "lora_kohya.safetensors", "diffsynth": "lora_diffsynth.ckpt"}
    for fmt, path in made.files.items():
        lf = read_lora(path)
        assert lf.format == fmt
        assert (lf.rank, lf.alpha, lf.alpha_source) == (4, 2.0, "file")
        assert lf.target_modules == ["to_k", "to_out.0", "to_q", "to_v"]
        assert lf.metadata == METADATA
        assert lf.info["unet_config"]["block_out_channels"] == [32, 64, 64]
        assert set(lf.state_dict) == set(made.peft_sd)
        for k, v in made.peft_sd.items():
            assert torch.equal(lf.state_dict[k], v), (fmt, k)
    # No temp files left behind by the atomic writes.
    assert sorted(p.name for p in made.files["diffusers"].parent.iterdir()) == sorted(
        p.name for p in made.files.values())


def test_diffsynth_ckpt_is_plain_tensors_with_inline_rank_alpha(made):
    sd = torch.load(made.files["diffsynth"], map_location="cpu", weights_only=True)
    meta = {k for k in sd if k.startswith(CKPT_META_PREFIX)}
    assert meta == {CKPT_META_PREFIX + "rank", CKPT_META_PREFIX + "alpha", CKPT_META_PREFIX + "info"}
    assert sd[CKPT_META_PREFIX + "rank"].item() == 4 and sd[CKPT_META_PREFIX + "alpha"].item() == 2.0
    lora_keys = [k for k in sd if k not in meta]
    assert all(k.startswith("blocks.") and k.endswith((".lora_A.default.weight", ".lora_B.default.weight"))
               for k in lora_keys)
    assert not any("to_out.0" in k for k in lora_keys) and any(".to_out.lora_A." in k for k in lora_keys)
    assert len(lora_keys) == len(made.peft_sd)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "diffsynth"])
def test_each_format_reloads_to_the_same_image(made, fmt):
    pipe = fresh_pipe(made.model_dir)
    name = load_lora_into_pipeline(pipe, made.files[fmt])
    assert lora_scales(pipe) == {name: 1.0}
    img = render(pipe, made.embeds)
    assert maxdiff(img, made.lora_img) < TOL
    assert maxdiff(img, made.base) > EFFECT


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_diffusers_own_loader_reads_our_files(made, fmt):
    """KolorsPipeline.load_lora_weights (no kolors_story code) gives the same image: rank/alpha from the file."""
    pipe = fresh_pipe(made.model_dir)
    path = made.files[fmt]
    # Offline (HF_HUB_OFFLINE=1) diffusers wants the folder + weight_name rather than a file path.
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="ours")
    assert maxdiff(render(pipe, made.embeds), made.lora_img) < TOL


def test_scale_zero_gives_the_base_image_and_scales_can_change(made):
    pipe = fresh_pipe(made.model_dir)
    name = load_lora_into_pipeline(pipe, made.files["diffsynth"], scale=0.0)
    assert maxdiff(render(pipe, made.embeds), made.base) < TOL
    set_lora_scales(pipe, {name: 1.0})
    assert maxdiff(render(pipe, made.embeds), made.lora_img) < TOL


def test_stacked_loras_add_up(made):
    """Two copies at 0.5 each equal one at 1.0; a second, different LoRA on top changes the image."""
    pipe = fresh_pipe(made.model_dir)
    a1 = load_lora_into_pipeline(pipe, made.files["kohya"], scale=0.5)
    a2 = load_lora_into_pipeline(pipe, made.files["diffusers"], scale=0.5)
    assert a1 != a2
    assert lora_scales(pipe) == {a1: 0.5, a2: 0.5}
    assert maxdiff(render(pipe, made.embeds), made.lora_img) < TOL
    b = load_lora_into_pipeline(pipe, made.files_b["diffsynth"], scale=1.0, adapter_name="second")
    assert lora_scales(pipe) == {a1: 0.5, a2: 0.5, b: 1.0}
    assert read_lora(made.files_b["diffsynth"]).rank == 2
    assert maxdiff(render(pipe, made.embeds), made.lora_img) > EFFECT


def _competition_files(made) -> dict[str, Path]:
    """What DiffSynth's trainer saves: the diffsynth UNet's LoRA params, nothing else (no alpha)."""
    sd = torch.load(made.files["diffsynth"], map_location="cpu", weights_only=True)
    flat = {k: v for k, v in sd.items() if not k.startswith(CKPT_META_PREFIX)}
    folder = made.out / "lightning_logs" / "version_0" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"flat": folder / "epoch=0-step=500.ckpt", "wrapped": folder / "epoch=1-step=1000.ckpt"}
    torch.save(flat, paths["flat"])
    # A full Lightning checkpoint of a module holding the UNet as pipe.unet.
    torch.save({"epoch": 1, "global_step": 1000, "state_dict": {f"pipe.unet.{k}": v for k, v in flat.items()}},
               paths["wrapped"])
    return paths


def test_competition_ckpt_reads_and_gives_the_same_image(made, caplog):
    paths = _competition_files(made)
    for kind, path in paths.items():
        with caplog.at_level(logging.WARNING, logger="kolors_story.lora"):
            lf = read_lora(path, unet_config=made.unet_config)
        assert lf.format == "diffsynth_trainer" and lf.rank == 4 and lf.metadata == {}
        # The trainer never writes alpha: DiffSynth's default is assumed and the user is told.
        assert (lf.alpha, lf.alpha_source) == (4.0, "fallback default")
        assert "records no LoRA alpha" in caplog.text
        assert set(lf.state_dict) == set(made.peft_sd)
        assert all(torch.equal(lf.state_dict[k], v) for k, v in made.peft_sd.items()), kind
    pipe = fresh_pipe(made.model_dir)
    load_lora_into_pipeline(pipe, paths["flat"], default_alpha=2.0)
    assert maxdiff(render(pipe, made.embeds), made.lora_img) < TOL


def test_plain_peft_state_dicts_are_read(made, tmp_path, caplog):
    """get_peft_model_state_dict saved as-is, bare or under PeftModel's prefix, with no alpha recorded."""
    from safetensors.torch import save_file

    for prefix in ("", "base_model.model."):
        path = tmp_path / f"peft{len(prefix)}.safetensors"
        save_file({prefix + k: v.contiguous() for k, v in made.peft_sd.items()}, str(path))
        with caplog.at_level(logging.WARNING, logger="kolors_story.lora"):
            lf = read_lora(path)
        assert lf.format == "peft" and lf.rank == 4
        assert (lf.alpha, lf.alpha_source) == (4.0, "fallback default")  # diffusers' rule: alpha = rank
        assert all(torch.equal(lf.state_dict[k], v) for k, v in made.peft_sd.items())
        assert read_lora(path, default_alpha=2.0).alpha == 2.0


def test_file_sha256(made):
    path = made.files["kohya"]
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_add_lora_trains_only_the_lora(tiny_model_dir):
    from tests.helpers import settings

    unet = fresh_pipe(tiny_model_dir).unet
    cfg = settings("train", ["lora=style"]).lora
    add_lora_from_settings(unet, cfg)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert not any(p.requires_grad for n, p in unet.named_parameters() if ".lora_" not in n)
    cfg_peft = unet.peft_config["default"]
    assert (cfg_peft.r, cfg_peft.lora_alpha, cfg_peft.init_lora_weights) == (cfg.rank, cfg.alpha, "gaussian")
    assert set(cfg_peft.target_modules) == set(cfg.target_modules)
    # gaussian init: A random, B zero -> a fresh LoRA is a no-op until trained.
    a = [p for n, p in unet.named_parameters() if ".lora_A." in n]
    b = [p for n, p in unet.named_parameters() if ".lora_B." in n]
    assert all(p.abs().sum() > 0 for p in a) and all(p.abs().sum() == 0 for p in b)


def test_bad_lora_settings_are_named(tiny_model_dir):
    unet = fresh_pipe(tiny_model_dir).unet
    with pytest.raises(ValueError, match="lora.init"):
        add_lora(unet, 4, 4, init="pissa-ish")
    with pytest.raises(ValueError, match="lora.rank"):
        add_lora(unet, 0, 4)
    with pytest.raises(ValueError, match="lora.target_modules"):
        add_lora(unet, 4, 4, target_modules=["no_such_module"])
    with pytest.raises(ValueError, match="no LoRA adapter 'default'"):
        save_lora(unet, tiny_model_dir.parent / "never", {})


def test_save_failure_keeps_existing_files(made, tiny_model_dir):
    before = {k: file_sha256(p) for k, p in made.files.items()}
    unet = fresh_pipe(tiny_model_dir).unet
    with pytest.raises(ValueError):
        save_lora(unet, made.files["diffusers"].parent, {})
    assert {k: file_sha256(p) for k, p in made.files.items()} == before


def test_unreadable_and_foreign_files_give_clear_errors(made, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        read_lora(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(LoraFormatError, match="junk.safetensors"):
        read_lora(junk)
    # An arbitrary pickle is refused, never executed.
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps(SimpleNamespace(a=1)))
    with pytest.raises(LoraFormatError, match="weights_only"):
        read_lora(evil)
    empty = tmp_path / "empty.ckpt"
    torch.save({"x": torch.zeros(2)}, empty)
    with pytest.raises(LoraFormatError, match="no UNet LoRA weights"):
        read_lora(empty)


def test_lora_for_another_unet_is_refused_by_name(made, tmp_path):
    from safetensors.torch import save_file

    lf = read_lora(made.files["diffusers"])
    key = sorted(lf.state_dict)[0]
    bad = {f"unet.{k}": (torch.zeros(v.shape[0], v.shape[1] + 3) if k == key else v) for k, v in lf.state_dict.items()}
    path = tmp_path / "other_model.safetensors"
    save_file(bad, str(path))
    pipe = fresh_pipe(made.model_dir)
    with pytest.raises(LoraFormatError, match="other_model.safetensors.*different base model"):
        load_lora_into_pipeline(pipe, path)
    name = load_lora_into_pipeline(pipe, made.files["diffusers"], adapter_name="mine")
    with pytest.raises(ValueError, match="already loaded"):
        load_lora_into_pipeline(pipe, made.files["kohya"], adapter_name=name)
