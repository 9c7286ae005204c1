"""Story coherence I: consistent self-attention across scenes (two passes) and a reference image
through Kolors-IP-Adapter-Plus, with hires, best-of, stacked LoRAs, bundles, reproduce and
training-time validation renders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kolors_story.errors import UserError
from kolors_story.generate.render import Job, render_jobs
from kolors_story.generate.sampler import sampler_settings
from kolors_story.models.ip_adapter import WEIGHT_NAME, adapter_shapes, file_shapes
from kolors_story.tiny.ip_adapter import ensure_tiny_ip_adapter
from tests.helpers import settings
from tests.test_generate import make_lora, max_diff, pixels, run_generate
from tests.test_train import RUN


def _png_bytes(folder: Path) -> list[bytes]:
    return [(folder / f"{i}.png").read_bytes() for i in range(1, 9)]


def _arrays(images) -> list[np.ndarray]:
    return [np.asarray(im.convert("RGB"), dtype=np.int16) for im in images]


# ---------------------------------------------------------------------------- off is off


def test_off_zero_strength_and_zero_scale_render_todays_images_byte_for_byte(tmp_path):
    off, _ = run_generate(tmp_path, name="off")
    run_generate(tmp_path, "coherence=sharing", "coherence.sharing.strength=0", name="strength0")
    run_generate(tmp_path, "coherence=reference", "coherence.reference.scale=0", name="scale0")
    run_generate(tmp_path, "coherence=both", "coherence.sharing.strength=0",
                 "coherence.reference.scales=[0,0,0,0,0,0,0,0]", name="both0")
    for name in ("strength0", "scale0", "both0"):
        assert _png_bytes(tmp_path / name) == _png_bytes(tmp_path / "off"), name
        assert json.loads((tmp_path / name / "manifest.json").read_text())["coherence"] is None
    assert off["manifest"]["coherence"] is None


def test_kept_prompt_projections_change_no_pixel_with_the_ip_adapter_sharing_loras_and_hires(tmp_path, tiny_model_dir):
    """memory.keep_prompt_projections with everything that touches the prompt's path through the UNet:
    the IP-Adapter (its text projection moves to ``text_encoder_hid_proj``), shared attention, a LoRA
    on the keys and values, the hires refine (a second pipeline call in the same render batch)."""
    sheet = tmp_path / "sheet.png"
    Image.new("RGB", (96, 96), (200, 60, 120)).save(sheet)
    style = make_lora(tmp_path / "style", tiny_model_dir, seed=3)["diffusers"]
    common = ("coherence=both", f"coherence.reference.image={sheet}", f"lora_path={style}",
              "sampler.hires.enabled=true", "sampler.hires.scale=1.5", "sampler.hires.steps=4")
    kept, _ = run_generate(tmp_path, *common, name="kept")
    run_generate(tmp_path, *common, "memory.keep_prompt_projections=false", name="every_step")
    assert kept["manifest"]["memory"]["keep_prompt_projections"] is True
    assert _png_bytes(tmp_path / "kept") == _png_bytes(tmp_path / "every_step")


# ---------------------------------------------------------------------------- the mechanism


def _attention(dim: int = 8):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=dim, heads=2, dim_head=4).eval()
    return attn, AttnProcessor2_0()


def test_readers_attend_to_the_recorded_reference_tokens_and_their_own():
    from kolors_story.config import SharingSettings
    from kolors_story.generate.sharing import SharedSelfAttention, SharingState

    attn, inner = _attention()
    state = SharingState(SharingSettings(enabled=True, token_ratio=0.5, strength=1.0, end=0.5), 1000, None)
    proc = SharedSelfAttention("up_blocks.0.attn1.processor", inner, state)
    ref, own = torch.randn(2, 16, 8), torch.randn(2, 16, 8)  # CFG halves: [negative, positive] of one image

    state.begin_batch("record", [0])
    state.on_unet_call(None, (None, torch.tensor(999)), {})  # progress 0.001: inside [0, 0.5]
    assert torch.equal(proc(attn, ref), inner(attn, ref))  # recording does not change the reference
    recorded = state.bank.parts[(0, proc.name, 1)][0]
    idx = state.token_indices(0, 16)
    assert recorded.shape == (8, 8) and torch.equal(recorded, ref[1, idx])  # half of the tokens, fixed subset

    state.begin_batch("read", [3], readers=[True])
    state.on_unet_call(None, (None, torch.tensor(999)), {})
    out = proc(attn, own)
    for half in (0, 1):
        ctx = torch.cat([ref[half, idx], own[half]])[None]
        expected = inner(attn, own[half : half + 1], ctx)
        assert torch.allclose(out[half : half + 1], expected, atol=1e-6)
    assert not torch.allclose(out, inner(attn, own), atol=1e-3)  # it did attend elsewhere

    state.settings.strength = 0.25  # a blend of the two
    mixed = proc(attn, own)
    assert torch.allclose(mixed, torch.lerp(inner(attn, own), out, 0.25), atol=1e-6)
    state.on_unet_call(None, (None, torch.tensor(100)), {})  # progress 0.9: outside the window
    assert torch.equal(proc(attn, own), inner(attn, own))


def test_a_later_reference_reads_the_earlier_ones_and_records_its_own_tokens():
    from kolors_story.config import SharingSettings
    from kolors_story.generate.sharing import SharedSelfAttention, SharingState

    attn, inner = _attention()
    state = SharingState(SharingSettings(enabled=True, token_ratio=1.0, strength=1.0), 1000, None)
    proc = SharedSelfAttention("up_blocks.0.attn1.processor", inner, state)
    first, second = torch.randn(1, 16, 8), torch.randn(1, 16, 8)  # no CFG: one row per image
    state.begin_batch("record", [0], readers=[False])
    state.on_unet_call(None, (None, torch.tensor(999)), {})
    assert torch.equal(proc(attn, first), inner(attn, first))  # the first reference: as alone
    state.begin_batch("record", [2], readers=[True])
    state.on_unet_call(None, (None, torch.tensor(999)), {})
    out = proc(attn, second)
    assert torch.allclose(out, inner(attn, second, torch.cat([first, second], dim=1)), atol=1e-6)  # it read the first
    key = (0, proc.name, 0)
    assert sorted(state.bank.parts[key]) == [0, 2] and torch.equal(state.bank.parts[key][2], second[0])
    state.begin_batch("read", [5], readers=[True])
    state.on_unet_call(None, (None, torch.tensor(999)), {})
    assert state.bank.get(key, "cpu", torch.float32).shape == (32, 8)  # a reader sees both references


@pytest.fixture()
def loud_attention_pipe(tiny_pipe):
    """The tiny Kolors with its self-attention made to matter (the random init leaves it at a few
    8-bit levels): so that what sharing does shows in the pixels."""
    with torch.no_grad():
        for name, p in tiny_pipe.unet.named_parameters():
            if "attn1.to_v" in name or "attn1.to_out.0.weight" in name:
                p.mul_(10)
            elif "attn1.to_q" in name or "attn1.to_k" in name:
                p.mul_(5)
    return tiny_pipe


def _render(pipe, scenes, embeds, batch_size: int, coherence_settings=None, steps: int = 3):
    from kolors_story.generate.coherence import StoryCoherence

    s = sampler_settings(steps=steps, height=64, width=64, batch_size=batch_size, seeds=None)
    jobs = [Job(i, sc.seed) for i, sc in enumerate(scenes)]
    coherence = StoryCoherence(pipe, scenes, coherence_settings) if coherence_settings is not None else None
    try:
        return _arrays(render_jobs(pipe, jobs, embeds, s, progress=False, coherence=coherence)), coherence
    finally:
        if coherence is not None:
            coherence.close()


def test_sharing_does_not_depend_on_the_batch(loud_attention_pipe):
    from kolors_story.models.prompts import encode_scenes
    from kolors_story.story import story_scenes

    pipe = loud_attention_pipe
    job = settings("generate", ["model=tiny", "coherence=sharing", "coherence.sharing.end=1.0"])
    scenes = story_scenes(job.story, job.sampler)
    embeds = encode_scenes(pipe, scenes)
    off, _ = _render(pipe, scenes, embeds, 8)
    runs = {b: _render(pipe, scenes, embeds, b, job.coherence) for b in (1, 2, 8)}
    on = runs[8][0]
    assert runs[8][1].references == [0]  # scene 1 names the heroine first
    assert max(int(np.abs(a - b).max()) for a, b in zip(off[1:], on[1:])) > 30  # sharing changes the readers
    assert int(np.abs(off[0] - on[0]).max()) <= 2  # the reference itself renders as alone
    for b in (1, 2):  # as much as plain rendering differs between batch sizes (fp rounding), no more
        assert max_diff(runs[b][0], on) <= 2, b
    assert runs[8][1].record()["sharing"]["recorded_bytes"] > 0


def test_references_agree_with_each_other_whatever_the_batch(loud_attention_pipe):
    """reference_scenes=[1,3]: scene 1 renders as alone, scene 3 reads scene 1 (it changes), every
    other scene reads both; batch sizes 1, 2 and 8 give the same images."""
    from kolors_story.models.prompts import encode_scenes
    from kolors_story.story import story_scenes

    pipe = loud_attention_pipe
    job = settings("generate", ["model=tiny", "coherence=sharing", "coherence.sharing.end=1.0",
                                "coherence.sharing.reference_scenes=[1,3]"])
    scenes = story_scenes(job.story, job.sampler)
    embeds = encode_scenes(pipe, scenes)
    off, _ = _render(pipe, scenes, embeds, 8)
    runs = {b: _render(pipe, scenes, embeds, b, job.coherence) for b in (1, 2, 8)}
    on, coherence = runs[8]
    assert coherence.references == [0, 2]
    assert int(np.abs(off[0] - on[0]).max()) <= 2  # the first reference renders as alone
    assert int(np.abs(off[2] - on[2]).max()) > 30  # the second one read the first
    for b in (1, 2):
        assert max_diff(runs[b][0], on) <= 2, b


def test_a_reference_scene_that_is_no_sharing_reference_is_not_recorded(tmp_path):
    """coherence=both with the IP-Adapter's reference on scene 3 and sharing's on scene 1: scene 3
    is rendered in the first pass but only scene 1's tokens are recorded for the others."""
    both, _ = run_generate(tmp_path, "coherence=both", "coherence.reference.scene=3", name="both")
    sharing, _ = run_generate(tmp_path, "coherence=sharing", name="sharing")
    recorded = [r["manifest"]["coherence"]["sharing"] for r in (both, sharing)]
    assert recorded[0]["references"] == recorded[1]["references"] == [1]
    assert recorded[0]["recorded_bytes"] == recorded[1]["recorded_bytes"] > 0


def test_reference_scenes_come_from_the_story_character_or_the_setting():
    from kolors_story.generate.coherence import reference_positions
    from kolors_story.story import story_scenes

    for name, first in (("idol_diary", 0), ("ink_dream", 0), ("warrior_dragon", 0)):
        job = settings("generate", ["model=tiny", f"story={name}"])
        assert reference_positions(story_scenes(job.story, job.sampler), job.coherence.sharing) == [first]
    job = settings("generate", ["model=tiny", "story=ink_dream", "story.character='英俊少年'"])
    assert reference_positions(story_scenes(job.story, job.sampler), job.coherence.sharing) == [3]  # scene 4
    job = settings("generate", ["model=tiny", "coherence.sharing.reference_scenes=[2,5]"])
    assert reference_positions(story_scenes(job.story, job.sampler), job.coherence.sharing) == [1, 4]


def test_bad_coherence_settings_name_the_key(tmp_path):
    for override, match in (("coherence.sharing.strength=1.5", "coherence.sharing.strength=1.5"),
                            ("coherence.sharing.end=0", "start=0.0, end=0"),
                            ("coherence.sharing.reference_scenes=[9]", r"reference_scenes=\[9\]"),
                            ("coherence.reference.scene=0", "coherence.reference.scene=0"),
                            (f"coherence.reference.image={tmp_path / 'nope.png'}", "nope.png: no such file"),
                            ("coherence.reference.scales=[1,2]", "2 values for 8 scenes"),
                            ("coherence.reference.tiny.weights=fancy", "coherence.reference.tiny.weights='fancy'")):
        with pytest.raises(UserError, match=match):  # one line at the command line, before any model loads
            run_generate(tmp_path, "coherence=both", override)
        assert not (tmp_path / "out" / "1.png").exists()


# ---------------------------------------------------------------------------- the IP-Adapter


def test_tiny_ip_adapter_has_the_release_layout_and_loads_through_diffusers(tiny_pipe, tmp_path):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    from kolors_story.generate.reference import (
        image_embeds,
        load_adapter,
        unload_adapter,
    )
    from kolors_story.tiny.architectures import (
        TINY_IP_RESAMPLER,
        tiny_ip_encoder_config,
        tiny_unet_config,
    )

    folder = ensure_tiny_ip_adapter(tmp_path / "ipa", seed=0)
    assert (folder / WEIGHT_NAME).is_file() and (folder / "image_encoder" / "config.json").is_file()
    keys = file_shapes(folder / WEIGHT_NAME)
    assert keys == adapter_shapes(tiny_unet_config(), tiny_ip_encoder_config()["hidden_size"], TINY_IP_RESAMPLER)
    assert "image_proj.layers.3.0.to_kv.weight" in keys and "ip_adapter.1.to_k_ip.weight" in keys
    job = settings("generate", ["model=tiny", "coherence=reference", f"coherence.reference.path={folder}"])
    for _ in range(2):  # load, unload, load: Kolors' text projection survives diffusers' unload
        record = load_adapter(tiny_pipe, job.coherence.reference, torch.float32, "cpu")
        unet = tiny_pipe.unet
        assert unet.config.encoder_hid_dim_type == "ip_image_proj" and unet.text_encoder_hid_proj is not None
        ip = [p for p in unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)]
        assert len(ip) == sum(k.endswith("to_k_ip.weight") for k in keys)
        embeds = image_embeds(tiny_pipe, Image.new("RGB", (80, 60), (200, 40, 40)), "cpu", True)
        assert embeds[0].shape == (2, 1, 577, 32)  # [negative, positive] x 336/14 patches + CLS, encoder width
        unload_adapter(tiny_pipe)
        assert unet.config.encoder_hid_dim_type == "text_proj"
    assert len(record["weight_sha256"]) == 64


def test_reference_strength_per_scene(tmp_path):
    sheet = tmp_path / "sheet.png"
    Image.new("RGB", (96, 96), (30, 90, 200)).save(sheet)
    run_generate(tmp_path, name="off")
    scales = [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    result, _ = run_generate(tmp_path, "coherence=reference", f"coherence.reference.image={sheet}",
                             f"coherence.reference.scales=[{','.join(map(str, scales))}]", name="ref")
    off, ref = pixels(tmp_path / "off"), pixels(tmp_path / "ref")
    for n, scale in enumerate(scales):
        diff = int(np.abs(off[n] - ref[n]).max())
        assert (diff <= 2) if scale == 0 else (diff > 5), (n, diff)
    rec = result["manifest"]["coherence"]["reference"]
    assert rec["image"]["sha256"] and rec["scales"] == scales and rec["adapter"]["weight"] == WEIGHT_NAME


# ---------------------------------------------------------------------------- with everything else


def test_both_with_hires_best_of_and_stacked_loras_bundle_and_reproduce(tmp_path, tiny_model_dir):
    from kolors_story.generate.reproduce import ReproduceError, reproduce

    sheet = tmp_path / "sheet.png"
    Image.new("RGB", (96, 96), (200, 60, 120)).save(sheet)
    style = make_lora(tmp_path / "style", tiny_model_dir, seed=3)["diffusers"]
    entity = make_lora(tmp_path / "entity", tiny_model_dir, seed=4)["diffusers"]
    result, _ = run_generate(
        tmp_path, "coherence=both", f"coherence.reference.image={sheet}", "coherence.sharing.reference_scenes=[1,2]",
        "sampler.hires.enabled=true", "sampler.hires.scale=1.5", "sampler.hires.steps=2", "sampler.hires.strength=0.5",
        "sampler.best_of.n=2", f"lora_path={style}", f"loras=[{{path: '{entity}', scale: 0.5}}]",
        "submit.team=Team", name="out")
    manifest = result["manifest"]
    assert manifest["coherence"]["sharing"]["references"] == [1, 2]
    assert manifest["coherence"]["reference"]["image"]["name"] == "sheet.png" and len(manifest["loras"]) == 2
    bundle = Path(result["bundle"])
    assert (bundle / "reference_sheet.png").read_bytes() == sheet.read_bytes()
    card = (bundle / "README.md").read_text(encoding="utf-8")
    assert "reference_sheet.png" in card and "Consistent self-attention" in card
    report = reproduce(bundle, tmp_path / "again", progress=False)
    assert report["all_identical"], report["images"]
    # another reference image cannot claim the same story
    changed = tmp_path / "changed"
    shutil.copytree(bundle, changed)
    Image.new("RGB", (96, 96), (10, 10, 10)).save(changed / "reference_sheet.png")
    Image.new("RGB", (96, 96), (10, 10, 10)).save(sheet)
    with pytest.raises(ReproduceError, match="reference image sheet.png"):
        reproduce(changed, tmp_path / "x", progress=False)


def test_validation_renders_use_the_coherence_settings(tmp_path, tiny_batches, story):
    from kolors_story.records import read_metrics
    from kolors_story.train.job import run_training

    scenes, embeds = story
    common = ["model=tiny", "logger=none", "trainer.progress_bar=false", *RUN, "trainer.max_steps=2",
              "trainer.checkpoint_every_n_steps=2", "sampler.steps=2"]
    results = {}
    for name, extra in (("plain", []), ("both", ["coherence=both"])):
        cfg = settings("train", [*common, f"output_dir={tmp_path / name}", *extra])
        result = run_training(cfg, tmp_path / name, tiny_batches, scenes=scenes, story_embeds=embeds,
                              dataset_hash="d" * 64)
        assert result.status == "finished"
        results[name] = [r for r in read_metrics(tmp_path / name) if r["type"] == "checkpoint"][-1]
    plain, both = (pixels(tmp_path / name / results[name]["dir"]) for name in ("plain", "both"))
    assert max_diff(plain[:1], both[:1]) <= 2 and max_diff(plain[1:], both[1:]) > 2  # scene 1 is the reference
    losses = {name: [r["loss"] for r in read_metrics(tmp_path / name) if r["type"] == "train"] for name in results}
    assert losses["plain"] == losses["both"]  # the training steps never see the adapter


def test_comparison_sheet_labels_each_row_with_its_similarities():
    from kolors_story.generate.compare import comparison_sheet, pixel_similarity

    same = [Image.new("RGB", (64, 64), (120, 120, 120))] * 8
    varied = [Image.new("RGB", (64, 64), (30 * i, 255 - 30 * i, 90)) for i in range(8)]
    assert pixel_similarity(same) == 1.0 and pixel_similarity(varied) < pixel_similarity(same)
    rows = [{"label": "a", "images": same, "tiny": True, "clip_i": 1.0, "pixels": 1.0},
            {"label": "b", "images": varied, "tiny": True, "clip_i": 0.5, "pixels": pixel_similarity(varied)}]
    sheet = comparison_sheet(rows, tile=64)
    label_h = 18
    assert sheet.size == (8 * 64, label_h + 2 * (64 + label_h))  # the tiny-model title, then two labelled rows
    second_row_first_tile = np.asarray(sheet)[label_h + 64 + label_h + label_h + 10, 10]
    assert tuple(second_row_first_tile) == (0, 255, 90)


def test_versus_off_is_taken_seed_set_by_seed_set():
    from kolors_story.generate.compare import versus_off

    def row(label, pixels, clip):
        return {"label": label, "sets": [{"pixels": p, "clip_i": c} for p, c in zip(pixels, clip)]}

    rows = [row("no coherence", [0.80, 0.70, 0.90], [0.5, 0.5, 0.5]),
            row("attention sharing", [0.81, 0.69, 0.93], [0.5, 0.4, 0.6])]
    got = versus_off(rows)["attention sharing"]
    assert got["pixels"]["higher_in"] == 2 and got["pixels"]["sets"] == 3
    assert got["pixels"]["mean_change"] == pytest.approx((0.01 - 0.01 + 0.03) / 3)
    assert got["clip_i"]["higher_in"] == 1 and got["clip_i"]["mean_change"] == pytest.approx(0.0)


@pytest.mark.slow
def test_compare_renders_every_variant_with_each_seed_set_and_writes_every_number(tmp_path, tiny_model_dir, capsys):
    """--seed-sets 2: set 0 renders the story's seeds (as generate.py), set 1 each seed + 1000; the
    sheet shows set 0 and <out>.json has every number; a bad count or override exits 2."""
    from kolors_story.generate.compare import main

    out = tmp_path / "sheet.png"
    base = ["model=tiny", "sampler.steps=2", "scorer.alignment=false"]
    assert main([*base, "--seed-sets", "2", "--out", str(out)]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert [v["coherence"] for v in record["variants"]] == ["none", "sharing", "reference", "both"]
    first, second = (record["variants"][0]["sets"][k]["seeds"] for k in (0, 1))
    assert first == [0, 1, 2, 5, 0, 1, 7, 0]  # idol_diary's own seeds
    assert second == [s + 1000 for s in first]
    for variant in record["variants"]:
        assert len(variant["sets"]) == 2 and all(0 < s["pixels"] <= 1 for s in variant["sets"])
    ref = record["variants"][2]["sets"]
    off = record["variants"][0]["sets"]
    assert record["versus_off"]["reference image"]["pixels"]["mean_change"] == pytest.approx(
        (ref[0]["pixels"] - off[0]["pixels"] + ref[1]["pixels"] - off[1]["pixels"]) / 2)
    assert Image.open(out).size[0] == 8 * 128
    assert "vs off over 2 seed sets" in capsys.readouterr().out
    assert main([*base, "--seed-sets", "0", "--out", str(tmp_path / "x.png")]) == 2
    assert main([*base, "sampler.nope=1", "--out", str(tmp_path / "y.png")]) == 2
    assert "--seed-sets 0" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_the_comparison_renders_your_story_file_and_a_character_lora_row(tmp_path):
    """`compare story.file=<yours> --character-lora <file>`: the file's scenes and seeds are what the
    seed sets shift (not the built-in story's), and the character LoRA is one more row stacking it."""
    from kolors_story.errors import SettingsError
    from kolors_story.generate.compare import CHARACTER_ROW, SEED_SET_STEP, seed_set_overrides, variants
    from kolors_story.tiny.probes import probe_story

    story = probe_story("ink_dream")
    for i, scene in enumerate(story["scenes"]):
        scene["seed"] = 500 + i
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(story, ensure_ascii=False), encoding="utf-8")
    sets = seed_set_overrides(["model=tiny", f"story.file={path}"], 2)
    assert sets[1] == [f"sampler.seeds=[{','.join(str(500 + i + SEED_SET_STEP) for i in range(8))}]"]

    assert [row[0] for row in variants()] == ["no coherence", "attention sharing", "reference image", "both"]
    with pytest.raises(SettingsError, match="--character-lora .*no such file"):
        variants(str(tmp_path / "missing.safetensors"))
    lora = tmp_path / "it's mine" / "lora.safetensors"  # a quote in the path survives Hydra's grammar
    lora.parent.mkdir()
    lora.write_bytes(b"")
    label, preset, extra = variants(str(lora), 0.5)[-1]
    assert (label, preset) == (CHARACTER_ROW, "none")
    job = settings("generate", ["model=tiny", *extra])
    assert [(Path(x["path"]), x["scale"]) for x in job.loras] == [(lora.resolve(), 0.5)]
