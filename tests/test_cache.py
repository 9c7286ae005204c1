"""The latent / prompt-embedding cache: equal to generation, reused without loading encoders,
recomputed exactly where something changed or a file cannot be trusted."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import textwrap
import time
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kolors_story.data import cache as cache_module
from kolors_story.data.cache import build_cache
from kolors_story.data.cache_files import (
    CacheError,
    load_cached_item,
    load_story_embeddings,
    read_cache_metadata,
)
from kolors_story.data.crop import crop_geometry
from kolors_story.files import STALE_TMP_SECONDS
from kolors_story.models import loading, prompts
from kolors_story.models.loading import model_hash
from kolors_story.story import story_scenes
from tests.helpers import REPO, settings

# (width, height) of the training images: landscape, portrait, exact size, wide, duplicate caption
SIZES = [(128, 96), (96, 128), (64, 64), (200, 100), (80, 120)]
CAPTIONS = ["二次元，一个紫色短发小女孩", "a watercolor dragon over misty mountains", "二次元，一个紫色短发小女孩",
            "ink painting of a lone boat", "a red lantern at night"]


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x / w, y / h, (x + y) / (w + h)], axis=-1) * 200
    return Image.fromarray(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype("uint8"))


def _write_dataset(data_dir: Path, captions=CAPTIONS) -> Path:
    train = data_dir / "train"
    train.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(SIZES):
        _image(w, h, i).save(train / f"{i}.jpg", quality=95)
    _write_metadata(train, captions)
    return train


def _write_metadata(train: Path, captions) -> None:
    with open(train / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "text"])
        w.writerows((f"{i}.jpg", c) for i, c in enumerate(captions))


def _cfg(data_dir: Path, *overrides: str, batch_size: int = 2):
    return settings("train", ["model=tiny", f"data_dir={data_dir}", f"cache.batch_size={batch_size}", *overrides])


# Where the cache build gets each model part from: patched to prove a part is (not) constructed.
PART_LOADERS = {
    "text": [(prompts, "load_text_encoder"), (prompts, "load_tokenizer")],
    "vae": [(cache_module, "load_vae")],
    "other": [(loading, "load_unet"), (loading, "load_pipeline")],
}


def _forbid(monkeypatch, replacement, *parts: str) -> None:
    for part in parts:
        for module, name in PART_LOADERS[part]:
            monkeypatch.setattr(module, name, replacement)


def _build(job, prepared, scenes=None):
    """``build_cache`` called as the trainer's data stage calls it (``train.job.data_stage``)."""
    return build_cache(job.model, prepared, data_dir=job.data_dir, resolution=job.dataset.resolution,
                       crop=job.dataset.crop, crop_seed=job.trainer.seed, batch_size=job.cache.batch_size,
                       scenes=scenes)


def _copy(base: Path, dst: Path) -> Path:
    shutil.copytree(base, dst)
    return dst


def _snapshot(paths) -> dict[Path, tuple[int, bytes]]:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in paths}


@pytest.fixture(scope="module")
def built(tiny_model_dir, tmp_path_factory):
    """One dataset cached once (text encoder and VAE constructed), shared read-only by the tests."""
    data_dir = tmp_path_factory.mktemp("cache-base") / "data"
    train = _write_dataset(data_dir)
    cfg = _cfg(data_dir)
    assert Path(cfg.model.path) == tiny_model_dir
    scenes = story_scenes(cfg.story, cfg.sampler)
    prepared = SimpleNamespace(  # a PreparedDataset, duck-typed as the data stage returns it
        data_dir=data_dir, train_dir=train, dataset_hash="abc123",
        items=[(train / f"{i}.jpg", c) for i, c in enumerate(CAPTIONS)],
    )
    encoders = []
    real = prompts.load_text_encoder

    def recording(layout, dtype, *args):
        model = real(layout, dtype, *args)
        encoders.append(weakref.ref(model))
        return model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prompts, "load_text_encoder", recording)
        result = _build(cfg, prepared, scenes)
    return SimpleNamespace(cfg=cfg, data_dir=data_dir, scenes=scenes, cache=result, encoders=encoders)


def test_contract_shapes_order_and_text_encoder_released(built, tiny_model_dir):
    c = built.cache
    assert c.cache_dir == built.data_dir / "cache"
    assert c.model_hash == model_hash(tiny_model_dir)
    assert len(c.items) == len(CAPTIONS) and all(p.suffix == ".safetensors" and p.is_file() for p in c.items)
    # metadata.csv order, one file per image (same caption, different image -> different file)
    assert [read_cache_metadata(p)["caption"] for p in c.items] == CAPTIONS
    assert [read_cache_metadata(p)["image_file"] for p in c.items] == [f"{i}.jpg" for i in range(len(SIZES))]
    assert len(set(c.items)) == len(CAPTIONS)
    assert c.stats["embeds_computed"] == len(set(CAPTIONS)), "a repeated caption is encoded once"
    for p, (w, h) in zip(c.items, SIZES):
        t = load_cached_item(p)
        assert set(t) == {"latents", "prompt_embeds", "pooled_prompt_embeds", "add_time_ids"}
        assert all(v.dtype == torch.float32 for v in t.values())
        assert t["latents"].shape == (4, 8, 8)
        assert t["prompt_embeds"].shape == (256, 32) and t["pooled_prompt_embeds"].shape == (32,)
        ids = t["add_time_ids"].tolist()
        assert ids[:2] == [h, w] and ids[4:] == [64, 64], "original (h, w) ... target (h, w)"
    # center crop of the 128x96 image: resized to 85x64, crop left (85-64)//2 = 10
    assert load_cached_item(c.items[0])["add_time_ids"].tolist() == [96, 128, 0, 10, 64, 64]
    assert load_cached_item(c.items[1])["add_time_ids"].tolist() == [128, 96, 10, 0, 64, 64]
    assert load_cached_item(c.items[2])["add_time_ids"].tolist() == [64, 64, 0, 0, 64, 64]
    story = load_story_embeddings(c.story)
    assert story["prompt_embeds"].shape == (8, 256, 32) and story["negative_pooled_prompt_embeds"].shape == (8, 32)
    # the text encoder was built once and is gone once build_cache returned
    import gc

    gc.collect()
    assert len(built.encoders) == 1 and built.encoders[0]() is None, "text encoder still referenced"


def test_cached_embeddings_follow_the_kolors_encoding_convention(built, tiny_pipe):
    """The guard against training on other text features than generation sees, written out without
    encode_prompt (SimpleTuner's 77 tokens would fail it): ChatGLM3 tokens padded on the LEFT to
    256, the penultimate layer's hidden states as the sequence, the last layer's state at the last
    position as the pooled vector."""
    tok, te = tiny_pipe.tokenizer, tiny_pipe.text_encoder
    for path, caption in zip(built.cache.items, CAPTIONS):
        inputs = tok([caption], padding="max_length", max_length=256, truncation=True, return_tensors="pt")
        assert inputs["input_ids"].shape == (1, 256) and inputs["attention_mask"][0, 0] == 0  # left padding
        assert inputs["attention_mask"][0, -1] == 1
        with torch.no_grad():
            out = te(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     position_ids=inputs["position_ids"], output_hidden_states=True)
        sequence = out.hidden_states[-2].permute(1, 0, 2)[0]  # ChatGLM is sequence-first
        pooled = out.hidden_states[-1][-1, 0, :]
        t = load_cached_item(path)
        assert t["prompt_embeds"].shape == (256, sequence.shape[-1])
        assert torch.allclose(t["prompt_embeds"], sequence.float(), atol=1e-6)
        assert torch.allclose(t["pooled_prompt_embeds"], pooled.float(), atol=1e-6)
        assert not torch.allclose(t["pooled_prompt_embeds"], out.hidden_states[-2][-1, 0, :].float(), atol=1e-3)


def test_cached_embeddings_equal_generation_exactly(built, tiny_pipe):
    for path, caption in zip(built.cache.items, CAPTIONS):
        t = load_cached_item(path)
        # the call KolorsPipeline.__call__ makes for a prompt at generation time
        embeds, _, pooled, _ = tiny_pipe.encode_prompt(caption, torch.device("cpu"), 1, True, negative_prompt="丑陋")
        assert (t["prompt_embeds"] - embeds[0]).abs().max().item() == 0.0
        assert (t["pooled_prompt_embeds"] - pooled[0]).abs().max().item() == 0.0
    from kolors_story.models.prompts import encode_scenes

    want = encode_scenes(tiny_pipe, built.scenes)
    got = load_story_embeddings(built.cache.story)
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape
        assert (got[k] - want[k]).abs().max().item() == 0.0, k


def test_latents_are_scaled_posterior_mean_and_decode_like_the_image(built, tiny_pipe):
    vae = tiny_pipe.vae
    train = built.data_dir / "train"
    for i, path in enumerate(built.cache.items):
        t = load_cached_item(path)
        oh, ow, top, left, th, tw = (int(v) for v in t["add_time_ids"].tolist())
        # the crop, rebuilt independently from the recorded geometry
        im = Image.open(train / f"{i}.jpg").convert("RGB")
        scale = max(th / oh, tw / ow)
        size = (max(tw, round(ow * scale)), max(th, round(oh * scale)))
        im = im.resize(size, Image.Resampling.LANCZOS) if size != im.size else im
        crop = np.asarray(im.crop((left, top, left + tw, top + th)), dtype=np.float32) / 127.5 - 1
        x = torch.from_numpy(crop).permute(2, 0, 1)[None]
        with torch.no_grad():
            mean = vae.encode(x).latent_dist.mean
            want = mean * vae.config.scaling_factor
            # generation decodes latents / scaling_factor: that must give the VAE's reconstruction
            decoded = vae.decode(t["latents"][None] / vae.config.scaling_factor).sample
            recon = vae.decode(mean).sample
        torch.testing.assert_close(t["latents"][None], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(decoded, recon, rtol=1e-4, atol=1e-4)
        assert decoded.shape == x.shape and torch.isfinite(decoded).all()
    # (the tiny VAE is random, so its reconstruction does not look like the image; with real
    # weights the same path decodes back to the picture)


def test_second_run_constructs_no_encoder_and_rewrites_nothing(built, tmp_path, monkeypatch):
    data_dir = _copy(built.data_dir, tmp_path / "data")

    def forbidden(*a, **k):
        raise AssertionError("nothing is missing: no model part may be constructed")

    _forbid(monkeypatch, forbidden, "text", "vae", "other")
    items = [data_dir / "cache" / "items" / p.name for p in built.cache.items]
    before = _snapshot(items)
    again = _build(_cfg(data_dir), data_dir, built.scenes)
    assert again.items == items
    # a PreparedDataset whose item paths are relative to train_dir finds the same files
    prepared = SimpleNamespace(train_dir=data_dir / "train", dataset_hash="h",
                               items=[(f"{i}.jpg", c) for i, c in enumerate(CAPTIONS)])
    assert _build(_cfg(data_dir), prepared, built.scenes).items == items and again.story == data_dir / "cache" / "story" / built.cache.story.name
    assert again.stats["files_reused"] == len(set(items)) and again.stats["story"] == "reused"
    assert _snapshot(items) == before, "reused files must not be rewritten"


def test_changing_one_caption_recomputes_exactly_that_one(built, tmp_path, monkeypatch, tiny_pipe, capfd):
    from diffusers import KolorsPipeline

    data_dir = _copy(built.data_dir, tmp_path / "data")
    captions = list(CAPTIONS)
    captions[3] = "ink painting of two boats under the moon"
    _write_metadata(data_dir / "train", captions)

    def no_vae(*a, **k):
        raise AssertionError("only a caption changed: the VAE must not be loaded")

    encoded = []
    real_encode = KolorsPipeline.encode_prompt

    def recording(self, prompt=None, *a, **k):
        encoded.append(prompt)
        return real_encode(self, prompt, *a, **k)

    _forbid(monkeypatch, no_vae, "vae")
    monkeypatch.setattr(KolorsPipeline, "encode_prompt", recording)
    old = [data_dir / "cache" / "items" / p.name for p in built.cache.items]
    keep = [p for i, p in enumerate(old) if i != 3]
    before = _snapshot(keep)
    capfd.readouterr()
    result = _build(_cfg(data_dir), data_dir, built.scenes)
    err = capfd.readouterr().err
    assert encoded == [[captions[3]]], "only the changed caption is encoded (story reused)"
    assert "cache: prompt embeddings" in err and "1/1" in err, "progress with counts"
    assert result.stats["embeds_computed"] == 1 and result.stats["latents_computed"] == 0
    assert result.stats["latents_reused"] == 1
    assert [p for i, p in enumerate(result.items) if i != 3] == keep
    assert _snapshot(keep) == before
    assert result.items[3] != old[3]
    new, prev = load_cached_item(result.items[3]), load_cached_item(old[3])
    assert torch.equal(new["latents"], prev["latents"]) and torch.equal(new["add_time_ids"], prev["add_time_ids"])
    embeds, _, pooled, _ = tiny_pipe.encode_prompt(captions[3], torch.device("cpu"), 1, True)
    assert (new["prompt_embeds"] - embeds[0]).abs().max().item() == 0.0
    assert (new["pooled_prompt_embeds"] - pooled[0]).abs().max().item() == 0.0
    assert read_cache_metadata(result.items[3])["caption"] == captions[3]


def test_changing_one_image_or_the_crop_recomputes_only_latents(built, tmp_path, monkeypatch):
    data_dir = _copy(built.data_dir, tmp_path / "data")
    _image(*SIZES[1], seed=99).save(data_dir / "train" / "1.jpg", quality=95)

    def no_text(*a, **k):
        raise AssertionError("captions are unchanged: the text encoder must not be loaded")

    monkeypatch.setattr(prompts, "load_text_encoder", no_text)
    old = [data_dir / "cache" / "items" / p.name for p in built.cache.items]
    result = _build(_cfg(data_dir), data_dir, built.scenes)
    assert result.stats["latents_computed"] == 1 and result.stats["embeds_computed"] == 0
    assert [p == q for p, q in zip(result.items, old)] == [True, False, True, True, True]
    assert not torch.equal(load_cached_item(result.items[1])["latents"], load_cached_item(old[1])["latents"])

    # random crop: a new image key for every image, still no text encoder; offsets are per image
    # (seeded by trainer.seed + image hash), inside the resized image, and stable across runs
    rand = _build(_cfg(data_dir, "dataset.crop=random", "trainer.seed=7"), data_dir, built.scenes)
    assert rand.stats["latents_computed"] == len(SIZES) and rand.stats["embeds_reused"] == len(set(CAPTIONS))
    for p, (w, h) in zip(rand.items, SIZES):
        meta = read_cache_metadata(p)
        ids = load_cached_item(p)["add_time_ids"].tolist()
        (rh, rw), (top, left) = crop_geometry((h, w), (64, 64), "random", 7, meta["image_sha256"])
        assert ids == [h, w, top, left, 64, 64] and 0 <= top <= rh - 64 and 0 <= left <= rw - 64
    _forbid(monkeypatch, no_text, "vae")
    assert _build(_cfg(data_dir, "dataset.crop=random", "trainer.seed=7"), data_dir).items == rand.items
    offsets = {
        seed: [crop_geometry((h, w), (64, 64), "random", seed, read_cache_metadata(p)["image_sha256"])[1]
               for p, (w, h) in zip(rand.items, SIZES)]
        for seed in (7, 8, 9)
    }
    assert offsets[7] != offsets[8] or offsets[7] != offsets[9], "the seed must move the random crops"


def test_corrupt_partial_or_wrong_files_are_recomputed_not_trusted(built, tmp_path):
    data_dir = _copy(built.data_dir, tmp_path / "data")
    items = [data_dir / "cache" / "items" / p.name for p in built.cache.items]
    good = [load_cached_item(p) for p in items]
    # 0: a write cut off half way; 1: garbage; 2: valid file, wrong shapes; 3: NaN latents
    data = items[0].read_bytes()
    items[0].write_bytes(data[: len(data) // 2])
    items[1].write_bytes(b"\x00not a safetensors file")
    wrong = dict(good[2], latents=torch.zeros(4, 4, 4))
    save_file(wrong, str(items[2]))
    nan = dict(good[3], latents=torch.full((4, 8, 8), float("nan")))
    save_file(nan, str(items[3]))
    story = data_dir / "cache" / "story" / built.cache.story.name
    story.write_bytes(story.read_bytes()[:100])

    with pytest.raises(CacheError, match=items[0].name):
        load_cached_item(items[0])
    with pytest.raises(CacheError, match="NaN"):
        load_cached_item(items[3])
    with pytest.raises(CacheError, match=story.name):
        load_story_embeddings(story)

    result = _build(_cfg(data_dir, batch_size=3), data_dir, built.scenes)
    assert len(result.stats["bad_files"]) == 5, result.stats["bad_files"]
    assert result.stats["files_reused"] == 1 and result.stats["story"] == "computed"
    assert result.items == items
    for p, want in zip(result.items, good):
        got = load_cached_item(p)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    want_story = load_story_embeddings(built.cache.story)
    got_story = load_story_embeddings(result.story)
    assert all(torch.equal(got_story[k], want_story[k]) for k in want_story)


def test_same_size_retrained_vae_is_not_mistaken_for_the_cached_one(built, tmp_path, tiny_model_dir, monkeypatch):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    vae_file = model / "vae" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(vae_file), framework="pt") as f:
        meta = f.metadata()
    size = vae_file.stat().st_size
    save_file({k: v * 1.05 for k, v in load_file(str(vae_file)).items()}, str(vae_file), metadata=meta)
    assert vae_file.stat().st_size == size
    # same names and sizes: the model hash samples weight bytes, so it tells these VAEs apart ...
    assert model_hash(model) != model_hash(tiny_model_dir)

    def no_text(*a, **k):
        raise AssertionError("the text encoder files are unchanged: embeddings must be reused")

    monkeypatch.setattr(prompts, "load_text_encoder", no_text)
    data_dir = _copy(built.data_dir, tmp_path / "data")
    result = _build(_cfg(data_dir, f"model.path={model}"), data_dir, built.scenes)
    # ... and the cache keys each part by its own component: new latents, reused embeddings and story
    assert result.stats["latents_computed"] == len(SIZES) and result.stats["embeds_reused"] == len(set(CAPTIONS))
    assert result.stats["story"] == "reused"
    for new, old in zip(result.items, built.cache.items):
        a, b = load_cached_item(new), load_cached_item(old)
        assert not torch.equal(a["latents"], b["latents"]) and torch.equal(a["prompt_embeds"], b["prompt_embeds"])


def test_undecodable_image_stops_with_its_name_and_finished_batches_are_kept(built, tmp_path):
    data_dir = _copy(built.data_dir, tmp_path / "data")
    good = (data_dir / "train" / "3.jpg").read_bytes()
    (data_dir / "train" / "3.jpg").write_bytes(good[:200])  # truncated JPEG
    cfg = _cfg(data_dir, "dataset.crop=random", "trainer.seed=3", batch_size=2)
    with pytest.raises(CacheError, match=r"3\.jpg.*stage=data"):
        _build(cfg, data_dir)
    (data_dir / "train" / "3.jpg").write_bytes(good)
    result = _build(cfg, data_dir)
    # the first batch (images 0, 1) was written before the failure and is reused now
    assert result.stats["files_reused"] == 2 and result.stats["latents_computed"] == len(SIZES) - 2


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import kolors_story.data.cache_files as cache_files
    from kolors_story.data.cache import build_cache
    from tests.helpers import settings

    real = cache_files.save_safetensors

    def dying(tensors, filename, metadata=None):
        real(tensors, filename, metadata)  # a complete file at the temp path ...
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])  # ... then cut, as a kill mid-write leaves it
        os.kill(os.getpid(), signal.SIGKILL)

    cache_files.save_safetensors = dying
    data_dir = Path(sys.argv[1])
    job = settings("train", ["model=tiny", f"data_dir={data_dir}"])
    build_cache(job.model, data_dir, data_dir=data_dir, resolution=job.dataset.resolution)
    """
)


@pytest.mark.slow
def test_killed_write_leaves_no_corrupt_file_in_use(built, tmp_path):
    data_dir = _copy(built.data_dir, tmp_path / "data")
    _image(*SIZES[4], seed=123).save(data_dir / "train" / "4.jpg", quality=95)
    items_dir = data_dir / "cache" / "items"
    before = set(items_dir.iterdir())
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(data_dir)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -9, proc.stderr[-2000:]
    left = set(items_dir.iterdir()) - before
    assert len(left) == 1 and next(iter(left)).name.endswith(".tmp"), left  # only the half temp file
    assert all(p.suffix == ".safetensors" for p in before), "no finished file was written by the killed run"

    result = _build(_cfg(data_dir), data_dir)
    assert result.stats["latents_computed"] == 1 and result.stats["files_reused"] == len(SIZES) - 1
    assert all(p.suffix == ".safetensors" for p in result.items)
    for p in result.items:
        load_cached_item(p)  # every file in use loads and has the right shapes
    # the killed writer's temp file is never read, and is cleaned up once it is old
    tmp = next(iter(left))
    assert tmp.exists()
    old = time.time() - 2 * STALE_TMP_SECONDS
    os.utime(tmp, (old, old))
    _build(_cfg(data_dir), data_dir)
    assert not tmp.exists()


def test_bad_input_gives_clear_errors(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CacheError, match=r"metadata\.csv.*stage=data"):
        _build(_cfg(empty), empty)

    data_dir = tmp_path / "data"
    train = _write_dataset(data_dir)
    (train / "2.jpg").unlink()
    with pytest.raises(CacheError, match=r"2\.jpg"):
        _build(_cfg(data_dir), data_dir)
    with pytest.raises(ValueError, match="dataset.crop='diagonal'"):
        _build(_cfg(data_dir, "dataset.crop=diagonal"), data_dir)
    with pytest.raises(ValueError, match="dataset.resolution=60"):
        _build(_cfg(data_dir, "dataset.resolution=60"), data_dir)
    (train / "metadata.csv").write_text("file,caption\n0.jpg,x\n", encoding="utf-8")
    with pytest.raises(CacheError, match=r"lacks column.*file_name"):
        _build(_cfg(data_dir), data_dir)


def test_crop_geometry_covers_target_and_is_deterministic():
    assert crop_geometry((96, 128), (64, 64), "center", 0, "x") == ((64, 85), (0, 10))
    assert crop_geometry((64, 64), (64, 64), "random", 0, "x") == ((64, 64), (0, 0))
    a = crop_geometry((100, 300), (64, 64), "random", 1, "abc")
    assert a == crop_geometry((100, 300), (64, 64), "random", 1, "abc")
    (rh, rw), (top, left) = a
    assert (rh, rw) == (64, 192) and top == 0 and 0 <= left <= 128
    lefts = {crop_geometry((100, 300), (64, 64), "random", s, "abc")[1][1] for s in range(20)}
    assert len(lefts) > 5, "random crops must vary with the seed"
    assert crop_geometry((300, 100), (64, 32), "center", 0, "x") == ((300 * 32 // 100, 32), ((96 - 64) // 2, 0))


# ---------------------------------------------------------------------------- caption variants and dropout


def test_caption_variants_keep_the_trigger_and_first_tags():
    from kolors_story.data.tag_shuffle import caption_variants

    caption = "水墨画，一只鸟，竹子，月亮，远山，小桥"
    out = caption_variants(caption, prefix="水墨画，", keep_tokens=1, count=4, seed=3)
    assert out[0] == caption and len(out) == len(set(out)) == 4
    for v in out:
        assert v.startswith("水墨画，一只鸟，") and sorted(v.split("，")) == sorted(caption.split("，"))
    assert out == caption_variants(caption, prefix="水墨画，", keep_tokens=1, count=4, seed=3)  # fixed by the seed
    assert out != caption_variants(caption, prefix="水墨画，", keep_tokens=1, count=4, seed=4)
    assert caption_variants("a single caption", count=4) == ["a single caption"]  # nothing to reorder


def test_cache_holds_each_tag_order_and_the_empty_caption(built, tmp_path, tiny_pipe):
    from functools import partial

    from kolors_story.data.cache_files import load_empty_prompt, read_cache_metadata
    from kolors_story.data.tag_shuffle import caption_variants

    data_dir = _copy(built.data_dir, tmp_path / "data")
    cfg = _cfg(data_dir)
    prepared = SimpleNamespace(data_dir=data_dir, train_dir=data_dir / "train", dataset_hash="abc123",
                               items=[(data_dir / "train" / f"{i}.jpg", c) for i, c in enumerate(CAPTIONS)])
    variants = partial(caption_variants, count=3, seed=0)
    result = build_cache(cfg.model, prepared, data_dir=data_dir, resolution=cfg.dataset.resolution,
                         batch_size=2, variants=variants, empty_caption=True)
    assert result.stats["latents_computed"] == 0  # the latents are the image's, whatever the caption
    assert len(result.variants) == len(CAPTIONS) and result.items == [g[0] for g in result.variants]
    for group, caption in zip(result.variants, CAPTIONS):
        assert [read_cache_metadata(p)["caption"] for p in group] == variants(caption)
        assert torch.equal(load_cached_item(group[0])["latents"], load_cached_item(group[-1])["latents"])
    empty = load_empty_prompt(result.empty)
    embeds, _, pooled, _ = tiny_pipe.encode_prompt("", torch.device("cpu"), 1, False)
    assert torch.equal(empty["prompt_embeds"], embeds[0].float()) and torch.equal(empty["pooled_prompt_embeds"], pooled[0])


def test_loader_picks_variants_and_drops_captions_from_each_samples_seed():
    from kolors_story.train.loader import CachedItems

    def item(value: float) -> dict:
        return {"latents": torch.zeros(4, 2, 2), "prompt_embeds": torch.full((3, 2), value),
                "pooled_prompt_embeds": torch.full((2,), value), "add_time_ids": torch.zeros(6)}

    empty = {"prompt_embeds": torch.full((3, 2), -1.0), "pooled_prompt_embeds": torch.full((2,), -1.0)}
    data = CachedItems([[item(0.0), item(1.0), item(2.0)]], caption_dropout=0.1, empty=empty)
    seen = [data[(0, seed)] for seed in range(4000)]
    dropped = [bool(s["caption_dropped"]) for s in seen]
    assert abs(sum(dropped) / len(dropped) - 0.1) < 0.015
    assert all(float(s["prompt_embeds"][0, 0]) == -1.0 for s, d in zip(seen, dropped) if d)
    kept = [float(s["prompt_embeds"][0, 0]) for s, d in zip(seen, dropped) if not d]
    assert {v: kept.count(v) / len(kept) > 0.3 for v in (0.0, 1.0, 2.0)} == {0.0: True, 1.0: True, 2.0: True}
    assert all(torch.equal(data[(0, s)]["prompt_embeds"], seen[s]["prompt_embeds"]) for s in range(50))  # by seed
    plain = CachedItems([item(5.0)])[(0, 7)]
    assert "caption_dropped" not in plain and float(plain["prompt_embeds"][0, 0]) == 5.0


# ---------------------------------------------------------------------------- aspect-ratio buckets


def test_buckets_keep_each_images_aspect_with_the_pipelines_time_ids(built, tmp_path, tiny_pipe):
    from kolors_story.data.buckets import auto_buckets, bucket_for

    assert auto_buckets((1024, 1024))[0] == (1344, 768) and (1024, 1024) in auto_buckets((1024, 1024))
    assert all(h % 64 == 0 and w % 64 == 0 and 0.5 <= w / h <= 2 for h, w in auto_buckets((1024, 1024)))
    buckets = [[64, 64], [64, 128], [128, 64]]
    data_dir = _copy(built.data_dir, tmp_path / "data")
    cfg = _cfg(data_dir, f"dataset.buckets={buckets}")
    prepared = SimpleNamespace(data_dir=data_dir, train_dir=data_dir / "train", dataset_hash="abc123",
                               items=[(data_dir / "train" / f"{i}.jpg", c) for i, c in enumerate(CAPTIONS)])
    result = build_cache(cfg.model, prepared, data_dir=data_dir, resolution=cfg.dataset.resolution, batch_size=2,
                         buckets=cfg.dataset.buckets)
    sizes = set()
    for path, (w, h) in zip(result.items, SIZES):
        t = load_cached_item(path)
        bucket = bucket_for((h, w), [tuple(b) for b in buckets])
        sizes.add(bucket)
        assert tuple(t["latents"].shape) == (4, bucket[0] // 8, bucket[1] // 8)
        ids = [int(v) for v in t["add_time_ids"].tolist()]
        assert ids[:2] == [h, w] and ids[4:] == list(bucket)
        # exactly what KolorsPipeline computes for that original size, crop and target
        want = tiny_pipe._get_add_time_ids((h, w), tuple(ids[2:4]), bucket, torch.float32,
                                           tiny_pipe.text_encoder.config.hidden_size)
        assert want[0].tolist() == t["add_time_ids"].tolist()
    assert len(sizes) > 1  # the dataset's images really went to different buckets
    with pytest.raises(ValueError, match="multiples of 64"):
        build_cache(cfg.model, prepared, data_dir=data_dir, buckets=[[60, 64]])


def test_bucket_batches_hold_one_size_and_resume_in_the_same_order():
    from kolors_story.train.loader import StreamBatchSampler

    groups = [0, 1, 0, 2, 1, 0, 2, 2, 1, 0]
    sampler = StreamBatchSampler(len(groups), 2, 12, seed=5, groups=groups)
    batches = sampler.batches(0)
    assert len(batches) == 12 and all(len({groups[i] for i, _ in b}) == 1 for b in batches)
    assert batches == sampler.batches(0) and batches != sampler.batches(1)
    seeds = [s for b in batches for _, s in b]
    assert len(set(seeds)) == len(seeds)  # every sample its own noise seed
    ranks = [StreamBatchSampler(len(groups), 2, 6, seed=5, groups=groups).batches(0, r, 2) for r in (0, 1)]
    assert [b for pair in zip(*ranks) for b in pair] == batches  # two ranks share the same stream


def _files(cache_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cache_dir)): p.read_bytes() for p in sorted(cache_dir.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_cache_built_by_two_processes_is_byte_identical_to_one(built, tmp_path):
    """cache.devices=2: the batches go to two spawned processes; every file (items, story, manifest)
    is the one-process build's, byte for byte, and no part file is left behind."""
    data_dir = tmp_path / "data"
    cfg = _cfg(data_dir, "cache.devices=2")
    train = built.data_dir / "train"  # the same images, so the manifest's paths match too
    prepared = SimpleNamespace(data_dir=data_dir, train_dir=train, dataset_hash="abc123",
                               items=[(train / f"{i}.jpg", c) for i, c in enumerate(CAPTIONS)])
    result = build_cache(cfg.model, prepared, data_dir=data_dir, resolution=cfg.dataset.resolution,
                         crop=cfg.dataset.crop, crop_seed=cfg.trainer.seed, batch_size=cfg.cache.batch_size,
                         scenes=built.scenes, devices=cfg.cache.devices)
    one, two = _files(built.data_dir / "cache"), _files(data_dir / "cache")
    assert sorted(two) == sorted(one) and not (data_dir / "cache" / "parts").exists()
    assert [name for name in one if one[name] != two[name]] == []
    assert result.stats["latents_computed"] == len(SIZES) and result.stats["story"] == "computed"


def test_finished_parts_of_a_killed_sharded_build_are_reused_without_a_worker(tmp_path, monkeypatch):
    """A part file a worker finished before the build was killed is read back, not recomputed."""
    from kolors_story.data import cache_shards

    plan = cache_shards.ShardPlan(None, torch.float32, ["cpu", "cpu"], tmp_path, 1)
    batches = [[("k1", "a cat"), ("k2", "a dog")], [("k3", "a boat")]]
    embeds = {k: (torch.full((4, 3), float(i)), torch.full((3,), float(i))) for i, k in enumerate(("k1", "k2", "k3"))}
    for batch in batches:
        path = cache_shards.part_path(plan, "text", [k for k, _ in batch])
        cache_shards._write_part(path, {k: embeds[k] for k, _ in batch}, cache_shards.TEXT_NAMES)
    monkeypatch.setattr(cache_shards, "_run", lambda plan, tasks: iter(()) if not tasks else pytest.fail("recomputed"))
    got = {k: v for part in cache_shards.texts_in_shards(plan, batches, None) for k, v in part.items()}
    assert set(got) == set(embeds) and all(torch.equal(got[k][0], embeds[k][0]) for k in embeds)
    # a torn part is not trusted: its batch goes to a worker again
    path = cache_shards.part_path(plan, "text", ["k3"])
    path.write_bytes(path.read_bytes()[:40])
    monkeypatch.setattr(cache_shards, "_run", lambda plan, tasks: iter([]) if len(tasks) == 1 else pytest.fail(str(tasks)))
    assert len(list(cache_shards.texts_in_shards(plan, batches, None))) == 1


def test_a_workers_error_reaches_the_parent_as_itself(tmp_path):
    """A CacheError in a spawned worker (here: a missing file) is raised in the parent unchanged."""
    from kolors_story.data import cache_shards
    from kolors_story.data.cache_files import load_cached_item

    plan = cache_shards.ShardPlan(None, torch.float32, ["cpu", "cpu"], tmp_path, 1)
    with pytest.raises(CacheError, match="gone.safetensors"):
        list(cache_shards._run(plan, [(load_cached_item, (tmp_path / "gone.safetensors",))]))
