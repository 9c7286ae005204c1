"""The aesthetic scorer: parity with the competition's scoring code, batching, coherence, errors."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kolors_story.evaluate.scorer import (
    DOWNLOAD_COMMAND,
    REAL_FOLDER_NAME,
    AestheticScorer,
    ScorerError,
)
from kolors_story.evaluate.summary import coherence, summarize_scores
from kolors_story.models.architectures import REAL_PREDICTOR_CONFIG
from kolors_story.tiny.scorer import build_tiny_predictor
from tests.helpers import settings

# ---------------------------------------------------------------------------- helpers


def varied_images() -> list[tuple[str, Image.Image]]:
    """8 unrelated images in the modes/sizes/formats a user folder may hold (file name, image)."""
    yy, xx = np.mgrid[0:96, 0:128]
    rng = np.random.default_rng(7)
    gradient = np.stack([xx * 2, yy * 2, 255 - xx * 2], -1).astype(np.uint8)
    rgba = np.dstack([np.full((48, 80, 3), (200, 40, 90), np.uint8), (np.mgrid[0:48, 0:80][1] * 3).astype(np.uint8)])
    checker = (((np.mgrid[0:200, 0:50].sum(0) // 10) % 2) * 255).astype(np.uint8)
    return [
        ("1.png", Image.fromarray(gradient, "RGB")),
        ("2.png", Image.fromarray(rgba, "RGBA")),  # alpha: CLIPProcessor's RGB conversion decides
        ("3.jpg", Image.fromarray((xx[:60, :100] * 2).astype(np.uint8), "L")),  # grayscale JPEG
        ("4.png", Image.fromarray(gradient, "RGB").quantize(16)),  # palette
        ("5.jpg", Image.fromarray(rng.integers(0, 255, (150, 300, 3), dtype=np.uint8), "RGB")),  # wide
        ("6.png", Image.fromarray(checker, "L").convert("RGB")),  # tall
        ("7.webp", Image.fromarray(np.full((224, 224, 3), (20, 160, 60), np.uint8), "RGB")),
        ("8.jpg", Image.new("CMYK", (30, 30), (0, 120, 200, 10))),  # tiny, CMYK
    ]


def write_images(folder: Path, named=None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in named if named is not None else varied_images():
        image.save(folder / name)
        paths.append(folder / name)
    return paths


def competition_scores(model_id: str, folder: str) -> tuple[dict[str, float], float]:
    """The seeds' scoring code (seeds/competition-readme-en.md, "3. Aesthetics Scoring"), verbatim.

    Only two changes: `model_id` is the local folder instead of `snapshot_download(...)` (no network)
    and `device = "cpu"` (no GPU). Returns each file's score (the seeds' `get_aesthetics_score` on
    `Image.open(path)`) and the seeds' `evaluate(folder)` mean.
    """
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from transformers import CLIPProcessor

    predictor = AestheticsPredictorV2Linear.from_pretrained(model_id)
    processor = CLIPProcessor.from_pretrained(model_id)
    device = "cpu"
    predictor = predictor.to(device)

    def get_aesthetics_score(image):
        inputs = processor(images=image, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with torch.no_grad():
            outputs = predictor(**inputs)
        prediction = outputs.logits
        return prediction.tolist()[0][0]

    def evaluate(folder):
        scores = []
        for file_name in os.listdir(folder):
            if os.path.isfile(os.path.join(folder, file_name)):
                image = Image.open(os.path.join(folder, file_name))
                scores.append(get_aesthetics_score(image))
        if len(scores) == 0:
            return 0
        else:
            return sum(scores) / len(scores)

    per_file = {name: get_aesthetics_score(Image.open(os.path.join(folder, name))) for name in os.listdir(folder)}
    return per_file, evaluate(folder)


@pytest.fixture(scope="module")
def scorer(tiny_scorer_dir) -> AestheticScorer:
    return AestheticScorer.from_pretrained(tiny_scorer_dir, batch_size=3)


# ---------------------------------------------------------------------------- the tiny predictor


def test_tiny_scorer_is_saved_in_the_real_folder_layout(tiny_scorer_dir):
    names = {p.name for p in tiny_scorer_dir.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "vocab.json", "merges.txt",
            "tokenizer_config.json", "special_tokens_map.json"} <= names
    config = json.loads((tiny_scorer_dir / "config.json").read_text())
    assert config["architectures"] == ["AestheticsPredictorV2Linear"]
    assert config["model_type"] == "clip_vision_model"
    assert (config["image_size"], config["patch_size"]) == (224, 14)  # the real input geometry
    pre = json.loads((tiny_scorer_dir / "preprocessor_config.json").read_text())
    assert pre["size"] == {"shortest_edge": 224} and pre["crop_size"] == {"height": 224, "width": 224}
    assert pre["resample"] == 3 and pre["do_center_crop"] and pre["do_convert_rgb"]
    assert pre["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert pre["image_std"] == [0.26862954, 0.26130258, 0.27577711]
    # the real CLIP ViT-L/14 tokenizer (49408 tokens), not an invented one
    assert len(json.loads((tiny_scorer_dir / "vocab.json").read_text(encoding="utf-8"))) == 49408


def test_tiny_predictor_is_deterministic_per_seed():
    torch.manual_seed(123)
    before = torch.rand(1)
    a, b, c = (build_tiny_predictor(s).state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)  # building does not consume the caller's RNG


def test_scorer_from_config_builds_the_tiny_predictor(offline_env):
    cfg = settings("evaluate", ["model=tiny", "scorer.batch_size=2"])
    assert Path(cfg.scorer.path) == Path(offline_env["KOLORS_STORY_CACHE"]) / "tiny-aesthetics-none-seed0"
    s = AestheticScorer.from_settings(cfg.scorer)
    assert s.note is not None and s.batch_size == 2 and s.path == Path(cfg.scorer.path)
    assert cfg.scorer.threshold == 6.0
    # model=kolors points at the competition weights' folder
    assert Path(settings("evaluate", []).scorer.path).name == REAL_FOLDER_NAME


# ---------------------------------------------------------------------------- parity and batching


def test_scores_equal_the_competition_scoring_code(tmp_path, tiny_scorer_dir, scorer):
    folder = tmp_path / "images"
    paths = write_images(folder)
    theirs, their_mean = competition_scores(str(tiny_scorer_dir), str(folder))
    ours = scorer.score([Image.open(p) for p in paths])  # batch_size=3: batches of 3, 3, 2
    assert len(ours) == 8
    for path, score in zip(paths, ours):
        assert score == pytest.approx(theirs[path.name], abs=1e-6), path.name
    assert sum(ours) / len(ours) == pytest.approx(their_mean, abs=1e-6)
    assert len({round(s, 9) for s in ours}) > 1  # the images really get different scores


def test_batched_scores_equal_unbatched(tmp_path, tiny_scorer_dir):
    images = [im for _, im in varied_images()]
    results = {}
    for bs in (1, 3, 8):
        s = AestheticScorer.from_pretrained(tiny_scorer_dir, batch_size=bs)
        results[bs] = s.score_and_embed(images)
    scores1, emb1 = results[1]
    for bs in (3, 8):
        scores, emb = results[bs]
        assert scores == pytest.approx(scores1, abs=1e-6)
        assert torch.allclose(emb, emb1, atol=1e-6)
    assert emb1.shape == (8, 16)
    assert torch.allclose(emb1.norm(dim=-1), torch.ones(8), atol=1e-5)  # L2-normalised by the predictor


def test_legacy_openai_preprocessor_config_gives_the_same_pixels(tmp_path, tiny_scorer_dir, scorer):
    """Whichever preprocessor_config.json format the downloaded folder has, preprocessing is the same."""
    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_scorer_dir, legacy)
    (legacy / "preprocessor_config.json").write_text(json.dumps({  # openai/clip-vit-large-patch14's file
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}))
    other = AestheticScorer.from_pretrained(legacy)
    images = [im for _, im in varied_images()]
    a = scorer.processor(images=images, return_tensors="pt")["pixel_values"]
    b = other.processor(images=images, return_tensors="pt")["pixel_values"]
    assert a.shape == (8, 3, 224, 224) and torch.equal(a, b)


# ---------------------------------------------------------------------------- coherence and summaries


def test_copies_of_one_image_are_more_coherent_than_unrelated_images(scorer):
    images = [im for _, im in varied_images()]
    same = coherence(scorer.embed([images[0]] * 8))
    unrelated = coherence(scorer.embed(images))
    assert same["coherence"] == pytest.approx(1.0, abs=1e-5)
    assert unrelated["coherence"] < same["coherence"] - 0.05
    # 7 copies + 1 different scene: that scene is the most out-of-style one
    odd = coherence(scorer.embed([images[0]] * 4 + [images[4]] + [images[0]] * 3))
    assert odd["outlier"] == 5 and odd["coherence"] < same["coherence"]


def test_coherence_maths():
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 3.0]])  # unnormalised on purpose
    c = coherence(e)
    assert c["coherence"] == pytest.approx((1 + 0 + 0) / 3)
    assert c["outlier"] == 3 and c["similarity_to_others"] == pytest.approx([0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="N>=2"):
        coherence(torch.ones(1, 4))


def test_summarize_scores_gate():
    s = summarize_scores([6.5, 5.9, 6.0], threshold=6.0)
    assert s["mean"] == pytest.approx(6.1333333) and s["min"] == 5.9 and s["passed"] is True
    assert summarize_scores([6.5, 5.0], threshold=6.0)["passed"] is False
    assert summarize_scores([5.0], threshold=4.0)["passed"] is True
    with pytest.raises(ValueError):
        summarize_scores([])


# ---------------------------------------------------------------------------- errors


def test_missing_real_weights_say_how_to_download(tmp_path):
    missing = tmp_path / REAL_FOLDER_NAME
    with pytest.raises(ScorerError) as err:
        AestheticScorer.from_settings(settings("evaluate", [f"scorer.path={missing}"]).scorer)
    assert str(missing) in str(err.value) and DOWNLOAD_COMMAND in str(err.value)
    missing.mkdir()
    (missing / "config.json").write_text(json.dumps(REAL_PREDICTOR_CONFIG))
    with pytest.raises(ScorerError) as err:
        AestheticScorer.from_pretrained(missing)
    msg = str(err.value)
    assert "incomplete" in msg and "weights" in msg and "preprocessor_config.json" in msg and DOWNLOAD_COMMAND in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is absent")
def test_cuda_device_without_cuda_is_a_clear_error(tiny_scorer_dir):
    with pytest.raises(ScorerError, match="scorer.device=cpu"):
        AestheticScorer.from_pretrained(tiny_scorer_dir, device="cuda")
    with pytest.raises(ScorerError, match="batch_size"):
        AestheticScorer.from_pretrained(tiny_scorer_dir, batch_size=0)


# ---------------------------------------------------------------------------- the real predictor's shape


def test_real_vit_l14_predictor_config_fits_the_classes(tiny_scorer_dir):
    """The real config builds (on the meta device) into ~304 M CLIP params + the 0.93 M MLP head,
    with exactly the parameter names the tiny one saves: the real weights fit these classes."""
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from safetensors import safe_open
    from transformers import CLIPVisionConfig

    with torch.device("meta"):
        real = AestheticsPredictorV2Linear(CLIPVisionConfig(**REAL_PREDICTOR_CONFIG))
    params = dict(real.named_parameters())
    vision = sum(p.numel() for n, p in params.items() if not n.startswith("layers."))
    head = sum(p.numel() for n, p in params.items() if n.startswith("layers."))
    assert 303_000_000 < vision < 305_000_000  # CLIP ViT-L/14 vision tower + 1024->768 projection
    assert head == (768 * 1024 + 1024) + (1024 * 128 + 128) + (128 * 64 + 64) + (64 * 16 + 16) + (16 + 1)
    assert params["visual_projection.weight"].shape == (768, 1024)
    assert params["vision_model.embeddings.position_embedding.weight"].shape == (257, 1024)  # 224/14 = 16x16 + CLS
    # same parameter names, once the encoder layer number is set aside (24 real layers, 2 tiny)
    def names(keys):
        return {re.sub(r"encoder\.layers\.\d+\.", "encoder.layers.N.", k) for k in keys}

    with safe_open(str(tiny_scorer_dir / "model.safetensors"), "pt") as f:
        assert names(f.keys()) == names(real.state_dict().keys())
