"""Model loading: both release layouts, the real Kolors architecture, clear errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from kolors_story.models.loading import ModelLoadError, load_pipeline, resolve_layout


def _render(pipe, seed: int) -> np.ndarray:
    image = pipe(
        prompt="二次元，一个紫色短发小女孩，在家中沙发上坐着",
        negative_prompt="丑陋、变形、嘈杂、模糊、低对比度",
        guidance_scale=4.0,
        num_inference_steps=3,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]
    assert image.size == (64, 64)
    return np.asarray(image)


@pytest.mark.parametrize("layout_fixture", ["tiny_model_dir", "tiny_diffusers_dir"])
def test_both_layouts_load_and_generate_deterministically(request, layout_fixture):
    folder = request.getfixturevalue(layout_fixture)
    layout = resolve_layout(folder)
    assert layout.kind == ("kolors" if layout_fixture == "tiny_model_dir" else "diffusers")
    pipe = load_pipeline(folder, dtype="float32", device="cpu")
    a, b, c = _render(pipe, 0), _render(pipe, 0), _render(pipe, 1)
    assert np.array_equal(a, b), "same seed must give identical pixels"
    assert not np.array_equal(a, c), "a different seed must give different pixels"
    assert a.std() > 1.0, "the tiny model must not produce a flat (NaN/black) image"


def test_kolors_layout_keeps_tokenizer_in_text_encoder(tiny_model_dir, tiny_diffusers_dir):
    assert resolve_layout(tiny_model_dir).tokenizer.name == "text_encoder"
    assert list((tiny_model_dir / "text_encoder").glob("pytorch_model-*.bin")), "Kolors ships .bin shards"
    assert resolve_layout(tiny_diffusers_dir).tokenizer.name == "tokenizer"
    assert (tiny_diffusers_dir / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()


def test_tiny_model_is_deterministic_for_its_seed(tmp_path):
    from kolors_story.tiny.kolors import build_tiny_components

    a, b, c = build_tiny_components(0), build_tiny_components(0), build_tiny_components(1)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb, sc = a[name].state_dict(), b[name].state_dict(), c[name].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), name


def test_real_kolors_unet_architecture_on_meta_device():
    from diffusers import UNet2DConditionModel

    from kolors_story.models.architectures import KOLORS_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(KOLORS_UNET_CONFIG)
    n = sum(p.numel() for p in unet.parameters())
    assert 2.55e9 < n < 2.61e9, f"Kolors UNet has ~2.58 B parameters, this config gives {n / 1e9:.3f} B"
    cfg = unet.config
    assert list(cfg.block_out_channels) == [320, 640, 1280]
    assert list(cfg.attention_head_dim) == [5, 10, 20]
    assert list(cfg.transformer_layers_per_block) == [1, 2, 10]
    assert cfg.cross_attention_dim == 2048 and cfg.encoder_hid_dim == 4096
    assert cfg.encoder_hid_dim_type == "text_proj" and cfg.addition_embed_type == "text_time"
    assert cfg.addition_time_embed_dim == 256 and cfg.projection_class_embeddings_input_dim == 5632
    assert cfg.use_linear_projection is True
    # ChatGLM3's 4096-d states are projected to the 2048-d cross-attention width
    assert tuple(unet.encoder_hid_proj.weight.shape) == (2048, 4096)


def test_real_chatglm3_config_on_meta_device():
    from diffusers.pipelines.kolors import ChatGLMModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

    from kolors_story.models.architectures import KOLORS_TEXT_ENCODER_CONFIG

    with torch.device("meta"):
        model = ChatGLMModel(ChatGLMConfig(**KOLORS_TEXT_ENCODER_CONFIG), empty_init=False)
    n = sum(p.numel() for p in model.parameters())
    assert 6.1e9 < n < 6.3e9, f"ChatGLM3-6B has ~6.2 B parameters, got {n / 1e9:.2f} B"


def test_scheduler_is_kolors(tiny_model_dir):
    from kolors_story.models.loading import load_scheduler

    sched = load_scheduler(resolve_layout(tiny_model_dir))
    assert sched.config.num_train_timesteps == 1100
    assert sched.config.beta_schedule == "scaled_linear"
    assert (sched.config.beta_start, sched.config.beta_end) == (0.00085, 0.014)
    assert sched.config.prediction_type == "epsilon"


@pytest.mark.parametrize("component", ["unet", "text_encoder", "vae"])
def test_missing_component_is_a_clear_error(tiny_model_dir, tmp_path, component):
    broken = tmp_path / "Kolors"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / component)
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(broken)
    msg = str(err.value)
    assert f"- {component}:" in msg and str(broken / component) in msg
    assert "python -m kolors_story.download" in msg


def test_partial_weights_listed_together(tiny_model_dir, tmp_path):
    broken = tmp_path / "Kolors"
    shutil.copytree(tiny_model_dir, broken)
    for f in (broken / "unet").glob("*.safetensors"):
        f.unlink()
    (broken / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ModelLoadError) as err:
        resolve_layout(broken)
    assert "- unet:" in str(err.value) and "- scheduler:" in str(err.value)


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline(tmp_path / "nowhere")


def test_separate_vae_file_replaces_release_vae(tiny_model_dir, tmp_path):
    """The fp16-fix VAE can be given as a folder or as one .safetensors file."""
    from kolors_story.models.loading import load_vae

    vae_dir = tmp_path / "sdxl-vae-fp16-fix"
    shutil.copytree(tiny_model_dir / "vae", vae_dir)
    layout = resolve_layout(tiny_model_dir, vae_dir)
    assert layout.vae == vae_dir
    file_layout = resolve_layout(tiny_model_dir, vae_dir / "diffusion_pytorch_model.safetensors")
    vae = load_vae(file_layout, torch.float32)
    ref = load_vae(resolve_layout(tiny_model_dir), torch.float32)
    sd, rd = vae.state_dict(), ref.state_dict()
    assert all(torch.equal(sd[k], rd[k]) for k in rd)


def test_model_hash_tells_same_shape_models_apart(tiny_model_dir, tmp_path):
    from kolors_story.models.loading import model_hash
    from kolors_story.tiny.kolors import ensure_tiny_model

    other = ensure_tiny_model(tmp_path / "seed1", seed=1, layout="kolors")
    assert model_hash(tiny_model_dir) == model_hash(tiny_model_dir)
    assert model_hash(tiny_model_dir) != model_hash(other), "same names and sizes, different weights"
    vae_file = tiny_model_dir / "vae" / "diffusion_pytorch_model.safetensors"
    assert model_hash(tiny_model_dir, other / "vae") != model_hash(tiny_model_dir, vae_file)
