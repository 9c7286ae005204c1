"""Story coherence on the pre-trained tiny Kolors: the pre-trained tiny IP-Adapter-Plus (shipped,
checked, in the release layout) and what attention sharing and a reference image do to the
story's panel-to-panel similarity, for each of the three stories."""

from __future__ import annotations

import shutil

import pytest
import torch

from kolors_story.models.ip_adapter import WEIGHT_NAME, adapter_shapes, file_shapes
from kolors_story.tiny.ip_adapter import ensure_tiny_ip_adapter
from kolors_story.tiny.shipped import PRETRAINED_IP_DIR, PretrainedIPAdapterError, check_pretrained_ip
from tests.helpers import settings

PRETRAINED = ["model=tiny", "model.tiny.weights=pretrained"]


def test_the_shipped_ip_adapter_matches_its_record_and_a_changed_file_is_refused(tmp_path, monkeypatch):
    import kolors_story.tiny.shipped as shipped
    from kolors_story.tiny.architectures import (
        TINY_IP_RESAMPLER,
        tiny_ip_encoder_config,
        tiny_unet_config,
    )

    record = check_pretrained_ip()
    assert record["sha256"]["adapter"] != record["sha256"]["image_encoder"]
    folder = ensure_tiny_ip_adapter(tmp_path / "ipa", seed=0, weights="pretrained")
    assert (folder / WEIGHT_NAME).read_bytes() == (PRETRAINED_IP_DIR / WEIGHT_NAME).read_bytes()
    assert file_shapes(folder / WEIGHT_NAME) == adapter_shapes(tiny_unet_config(), tiny_ip_encoder_config()["hidden_size"],
                                                               TINY_IP_RESAMPLER)  # the release file's keys
    copy = shutil.copytree(PRETRAINED_IP_DIR, tmp_path / "shipped")
    blob = bytearray((copy / WEIGHT_NAME).read_bytes())
    blob[-1] ^= 1
    (copy / WEIGHT_NAME).write_bytes(bytes(blob))
    with pytest.raises(PretrainedIPAdapterError, match="adapter weights' sha256.*does not match"):
        check_pretrained_ip(copy)
    monkeypatch.setattr(shipped, "PRETRAINED_IP_DIR", copy)
    with pytest.raises(PretrainedIPAdapterError):
        ensure_tiny_ip_adapter(tmp_path / "ipa2", seed=0, weights="pretrained")
    assert not (tmp_path / "ipa2").exists()
    with pytest.raises(Exception, match="coherence.reference.tiny.seed=1"):
        ensure_tiny_ip_adapter(tmp_path / "ipa3", seed=1, weights="pretrained")


def test_the_trained_adapter_is_written_under_the_release_keys_and_loads_back_exactly(tmp_path):
    """pretrain_tiny_ip maps diffusers' parameters back to IP-Adapter-Plus' key names; a file written
    that way and loaded through diffusers' own load_ip_adapter gives back the same values."""
    from kolors_story.config import ReferenceSettings
    from kolors_story.files import save_safetensors
    from kolors_story.generate.reference import load_adapter
    from kolors_story.models.loading import ensure_model, load_pipeline
    from kolors_story.tiny.pretrain_ip import (
        adapter_parameters,
        file_key_map,
        to_file_state,
    )

    model = ensure_model(settings("generate", PRETRAINED).model)
    start = ensure_tiny_ip_adapter(tmp_path / "start", seed=0)
    pipe = load_pipeline(model)
    probe = shutil.copytree(start, tmp_path / "probe")
    mapping = file_key_map(pipe, probe, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # "trained" values: every parameter different
        for p in adapter_parameters(pipe.unet).values():
            p.copy_(torch.randn(p.shape, generator=g))
    out = shutil.copytree(start, tmp_path / "out")
    save_safetensors(to_file_state(pipe.unet, mapping), out / WEIGHT_NAME)
    assert file_shapes(out / WEIGHT_NAME) == file_shapes(start / WEIGHT_NAME)
    fresh = load_pipeline(model)
    load_adapter(fresh, ReferenceSettings(path=str(out)), torch.float32, "cpu")
    want, got = adapter_parameters(pipe.unet), adapter_parameters(fresh.unet)
    assert sorted(want) == sorted(got)
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_pretraining_the_ip_adapter_is_deterministic(tmp_path):
    from kolors_story.tiny.pretrain_ip import pretrain_ip

    records = [pretrain_ip(tmp_path / f"run{i}", scenes=16, steps=2, batch=4, seed=0, threads=torch.get_num_threads())
               for i in range(2)]
    assert records[0]["sha256"] == records[1]["sha256"]
    assert (tmp_path / "run0" / WEIGHT_NAME).read_bytes() == (tmp_path / "run1" / WEIGHT_NAME).read_bytes()


def _story_similarity(tmp_path, story: str, coherence: str) -> dict:
    from kolors_story.evaluate.scorer import AestheticScorer
    from kolors_story.evaluate.summary import coherence as clip_i
    from kolors_story.generate.compare import pixel_similarity
    from kolors_story.generate.job import generate

    job = settings("generate", [*PRETRAINED, f"story={story}", f"coherence={coherence}", "scorer.alignment=false",
                                f"output_dir={tmp_path / story / coherence}"])
    images = generate(job, progress=False).render.images
    return {"pixels": pixel_similarity(images), "clip_i": clip_i(AestheticScorer.from_settings(job.scorer).embed(images))["coherence"]}


@pytest.mark.parametrize("story", ["ink_dream", "warrior_dragon", "idol_diary"])
def test_a_reference_scene_makes_each_story_more_alike(tmp_path, story):
    """coherence=reference (scene 1 first, the others conditioned on it at scale 0.5) raises the
    story's panel-to-panel similarity, by the pixel measure and by CLIP-I, at the same seeds.
    Measured: pixel 0.827 -> 0.863, 0.792 -> 0.802, 0.832 -> 0.900; CLIP-I 0.902 -> 0.930,
    0.806 -> 0.863, 0.703 -> 0.989 (ink_dream, warrior_dragon, idol_diary)."""
    off = _story_similarity(tmp_path, story, "none")
    ref = _story_similarity(tmp_path, story, "reference")
    assert ref["pixels"] > off["pixels"] + 0.005, (off, ref)
    assert ref["clip_i"] > off["clip_i"] + 0.02, (off, ref)


def test_the_tiny_adapter_follows_model_tiny_weights_and_a_model_folder_of_ones_own_composes():
    assert settings("generate", PRETRAINED).coherence.reference.tiny.weights == "pretrained"
    assert settings("generate", ["model=tiny", "model.tiny.weights=random"]).coherence.reference.tiny.weights == "random"
    # model=tiny pointed at a folder of one's own (model.tiny=null): the tiny adapter's keys still resolve
    own = settings("generate", ["model=tiny", "model.tiny=null", "model.path=/some/folder"]).coherence.reference
    assert own.tiny.weights == "random" and own.path.endswith("tiny-ip-adapter-random-seed0")
