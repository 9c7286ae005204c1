"""Memory modes (conf/memory): each gives the same story images as the default mode on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kolors_story.config import MemorySettings
from kolors_story.generate.memory import (
    MemoryConfigError,
    after_prompt_encoding,
    apply_memory_modes,
    load_device,
    memory_modes,
    release_text_encoder,
)
from kolors_story.generate.render import render_scenes
from kolors_story.models.loading import run_device
from kolors_story.models.prompts import encode_scenes
from kolors_story.story import Scene
from tests.helpers import settings

SCENES = [
    Scene(1, "cat", "a cat on a sofa, ink painting", "ugly, blurry", 11),
    Scene(2, "dragon", "a dragon above the sea at dawn", "low contrast", 12),
]
# The images are uint8: fp reordering (other attention kernels, memory layouts) may flip a pixel
# by one level, never more.
PIXEL_TOL = 1


def _render(pipe, memory: dict | None = None, size: int = 64) -> np.ndarray:
    apply_memory_modes(pipe, memory or {}, device="cpu")
    embeds = encode_scenes(pipe, SCENES, device=run_device(pipe))
    after_prompt_encoding(pipe, memory or {})
    images = render_scenes(pipe, SCENES, embeds, steps=2, cfg=5.0, height=size, width=size, batch_size=2)
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


@pytest.fixture(scope="module")
def default_images(tiny_model_dir):
    from kolors_story.models.loading import load_pipeline

    return _render(load_pipeline(tiny_model_dir))


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a - b).max())


@pytest.mark.parametrize(
    "memory",
    [
        {"attention": "eager"},
        {"attention": "sliced", "attention_slice_size": "max"},
        {"attention": "sliced"},
        {"channels_last": True},
        {"vae_slicing": True},
        {"vae_tiling": True},
        {"release_text_encoder": True},
        {"offload": "model", "offload_device": "cpu"},
    ],
    ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()),
)
def test_mode_gives_default_images(tiny_pipe, default_images, memory):
    images = _render(tiny_pipe, memory)
    assert _max_diff(images, default_images) <= PIXEL_TOL


def test_default_mode_is_sdpa_and_changes_nothing(tiny_pipe, default_images):
    from diffusers.models.attention_processor import AttnProcessor2_0

    applied = apply_memory_modes(tiny_pipe, None, device="cpu")
    assert applied["attention"] == "sdpa" and applied["offload"] == "none"
    assert all(isinstance(p, AttnProcessor2_0) for p in tiny_pipe.unet.attn_processors.values())
    assert _max_diff(_render(tiny_pipe), default_images) == 0


def test_every_preset_in_the_group_applies(tiny_model_dir, default_images):
    """conf/memory presets validate; on this CPU-only machine offloading is skipped, images unchanged."""
    from kolors_story.models.loading import load_pipeline

    assert memory_modes(_memory_cfg("default")) == MemorySettings()
    for preset in ("low_vram",):
        cfg = _memory_cfg(preset)
        pipe = load_pipeline(tiny_model_dir, device=load_device("cpu", cfg))
        if not torch.cuda.is_available():
            assert apply_memory_modes(pipe, cfg, device="cpu")["offload"] == "none"
        assert _max_diff(_render(pipe, cfg), default_images) <= PIXEL_TOL
    assert memory_modes(_memory_cfg("min_vram")).offload == "sequential"


def _memory_cfg(preset: str) -> MemorySettings:
    """The memory settings as generate.py composes them."""
    return settings("generate", [f"memory={preset}", "model=tiny"]).memory


def test_vae_tiling_exact_at_native_size_and_bounded_above(tiny_pipe):
    """memory.vae_tiling as the project applies it (apply_memory_modes), on diffusers' tiled decode.
    Up to the VAE's native size (Kolors: 1024x1024) the image is one tile: tiling changes nothing.
    Above it, tiles are decoded one by one and blended at the seams (approximate by design: the
    VAE's mid-block attention is global), with peak memory bounded by a tile instead of the image."""
    from kolors_story.accounting import PeakTensorMemory

    vae = tiny_pipe.vae
    native = vae.config.sample_size // tiny_pipe.vae_scale_factor
    gen = torch.Generator().manual_seed(0)
    small = torch.randn(1, 4, native, native, generator=gen)
    large = torch.randn(1, 4, 2 * native, 2 * native, generator=gen)
    peaks = {}
    with torch.no_grad():
        for tiled in (False, True):
            if tiled:  # the default mode leaves tiling off; the mode turns it on
                assert apply_memory_modes(tiny_pipe, {"vae_tiling": True}, device="cpu")["vae_tiling"] is True
            peaks[tiled] = [vae.decode(small).sample]
            with PeakTensorMemory() as mem:
                out = vae.decode(large).sample
            peaks[tiled] += [out.shape, mem.peak]
    assert torch.equal(peaks[True][0], peaks[False][0])
    assert peaks[True][1] == peaks[False][1] == (1, 3, 2 * vae.config.sample_size, 2 * vae.config.sample_size)
    assert peaks[True][2] < 0.6 * peaks[False][2]


def test_release_text_encoder_frees_it_and_generation_still_works(tiny_pipe, default_images):
    n_params = sum(p.numel() for p in tiny_pipe.text_encoder.parameters())
    embeds = encode_scenes(tiny_pipe, SCENES)
    assert release_text_encoder(tiny_pipe) == 4 * n_params  # fp32
    assert tiny_pipe.text_encoder is None and release_text_encoder(tiny_pipe) == 0
    images = render_scenes(tiny_pipe, SCENES, embeds, steps=2, cfg=5.0, height=64, width=64, batch_size=2)
    assert _max_diff(np.stack([np.asarray(im, dtype=np.int16) for im in images]), default_images) == 0


def test_model_offload_moves_models_through_hooks(tiny_pipe):
    apply_memory_modes(tiny_pipe, {"offload": "model", "offload_device": "cpu"})
    assert len(tiny_pipe._all_hooks) >= 3  # text encoder -> unet -> vae chain
    release_text_encoder(tiny_pipe)
    assert all(getattr(h, "model", None) is not None for h in tiny_pipe._all_hooks)
    assert not any(type(h.model).__name__ == "ChatGLMModel" for h in tiny_pipe._all_hooks)


def test_offload_without_gpu_is_skipped_or_explained(tiny_pipe):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert apply_memory_modes(tiny_pipe, {"offload": "model"}, device="cpu")["offload"] == "none"
    with pytest.raises(MemoryConfigError, match="sequential"):
        apply_memory_modes(tiny_pipe, {"offload": "sequential", "offload_device": "cpu"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="sequential offload streams weights to a GPU")
def test_sequential_offload_on_gpu_gives_default_images(tiny_model_dir):
    from kolors_story.models.loading import load_pipeline

    ref = _render(load_pipeline(tiny_model_dir, device="cuda"))
    out = _render(load_pipeline(tiny_model_dir, device="cpu"), {"offload": "sequential", "offload_device": "cuda"})
    assert _max_diff(out, ref) <= PIXEL_TOL


@pytest.mark.slow
def test_compile_gives_default_images(tiny_pipe, default_images):
    # aot_eager runs dynamo's graph capture + AOTAutograd, the parts that can change results,
    # without inductor's C++ codegen (10+ minutes on this 2-core CPU).
    from kolors_story.models.prompt_projections import KEPT_LAYERS

    images = _render(tiny_pipe, {"compile": True, "compile_backend": "aot_eager"})
    assert _max_diff(images, default_images) <= PIXEL_TOL
    assert getattr(tiny_pipe.unet, KEPT_LAYERS) == []  # the compiled graph computes the prompt projections


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"offload": "gpu"}, r"memory.offload='gpu' is not one of"),
        ({"attention": "flash"}, r"memory.attention='flash'"),
        ({"vae_tiling": "yes"}, r"memory.vae_tiling='yes' must be true or false"),
        ({"attention_slice_size": 0}, r"memory.attention_slice_size=0"),
        ({"offlaod": "model"}, r"unknown key\(s\) \['offlaod'\]"),
    ],
)
def test_bad_values_are_named(bad, match):
    with pytest.raises(MemoryConfigError, match=match):
        memory_modes(bad)


def test_load_device_is_cpu_when_offloading():
    assert load_device("cuda", {"offload": "model"}) == "cpu"
    assert load_device("cuda", {}) == "cuda"


def test_story_prompts_encode_as_one_cfg_call_would_without_holding_both(tiny_model_dir):
    """encode_scenes encodes the negatives in a call of their own: the same tensors as the pipeline's
    classifier-free pair, with a lower peak (the plan counts one call)."""
    from kolors_story.accounting import PeakTensorMemory
    from kolors_story.models.loading import load_pipeline
    from kolors_story.models.prompts import STORY_KEYS

    pipe = load_pipeline(tiny_model_dir)
    with torch.no_grad(), PeakTensorMemory() as paired:
        want = pipe.encode_prompt(prompt=[s.prompt for s in SCENES], negative_prompt=[s.negative for s in SCENES],
                                  device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    with PeakTensorMemory() as separate:
        got = encode_scenes(pipe, SCENES, device="cpu")
    for key, tensor in zip(STORY_KEYS, want):
        assert torch.equal(got[key], tensor), key
    assert separate.peak < paired.peak


def _projection_flops(pipe, images: int, steps: int, cfg: bool) -> int:
    """What computing the prompt's projections once saves: every step after the first, the text
    projection and each cross-attention's keys and values of the prompt (2·rows·in·out each)."""
    from kolors_story.models.prompt_projections import prompt_layers
    from kolors_story.models.prompts import MAX_SEQUENCE_LENGTH

    rows = images * (2 if cfg else 1) * MAX_SEQUENCE_LENGTH
    return (steps - 1) * sum(2 * rows * m.in_features * m.out_features for m in prompt_layers(pipe.unet))


def test_kept_prompt_projections_same_images_less_work(tiny_pipe, default_images):
    """memory.keep_prompt_projections (the default): the same bits as computing them every step, with
    exactly their FLOPs saved on the steps after the first, and nothing kept after the render."""
    from kolors_story.accounting import FlopCount
    from kolors_story.models.prompt_projections import KEPT_LAYERS

    flops, held_while_decoding = {}, []
    decode = tiny_pipe.vae.decode

    def watched_decode(*args, **kwargs):  # the last step let go of them: the VAE has the memory
        held_while_decoding.extend(layer._kept_output for layer in getattr(tiny_pipe.unet, KEPT_LAYERS))
        return decode(*args, **kwargs)

    tiny_pipe.vae.decode = watched_decode
    for keep in (False, True):
        with FlopCount() as counted:
            images = _render(tiny_pipe, {"keep_prompt_projections": keep})
        assert _max_diff(images, default_images) == 0, f"keep_prompt_projections={keep}"
        flops[keep] = counted.total
    kept = getattr(tiny_pipe.unet, KEPT_LAYERS)
    assert len(kept) == 1 + 2 * sum(1 for m in tiny_pipe.unet.modules() if getattr(m, "is_cross_attention", False))
    assert flops[False] - flops[True] == _projection_flops(tiny_pipe, len(SCENES), steps=2, cfg=True)
    assert all(layer._kept_output is None for layer in kept)  # outside a render nothing is held
    assert held_while_decoding and all(held == () for held in held_while_decoding)


def test_kept_prompt_projections_never_outlive_the_render(tiny_pipe):
    """Training validation renders the same prompts after the LoRA (or any weight) changed: what one
    render kept is never served in the next, nor for a prompt changed in place."""
    from kolors_story.models.prompt_projections import keep_across_steps, kept_across_steps, prompt_layers
    from kolors_story.plan import count

    unet = tiny_pipe.unet
    torch.manual_seed(0)
    x, t, enc, added = count.unet_inputs(unet, 2, 64, 64, 256, torch.float32, device="cpu")
    for v in (x, enc, *added.values()):
        v.normal_()

    def step():
        return unet(x, t, encoder_hidden_states=enc, added_cond_kwargs=added).sample

    with torch.no_grad():
        keep_across_steps(unet, False)
        plain = step()
        enc.mul_(0.5)
        plain_halved = step()
        enc.mul_(2.0)  # exact: back to the same values
        keep_across_steps(unet)
        with kept_across_steps(unet):
            assert torch.equal(step(), plain) and torch.equal(step(), plain)  # the second one served
            enc.mul_(0.5)  # the same tensor, changed in place: computed again
            assert torch.equal(step(), plain_halved)
        for layer in prompt_layers(unet)[1:]:
            layer.weight.mul_(1.5)
        with kept_across_steps(unet):
            later = step()
        keep_across_steps(unet, False)
        assert torch.equal(later, step()) and not torch.equal(later, plain_halved)
