"""`python -m kolors_story.bench`: the quick run writes every section; the accounting is right."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kolors_story.accounting import PeakTensorMemory
from kolors_story.bench import flops, run, timing
from kolors_story.tiny import architectures as tiny_architectures
from kolors_story.tiny import kolors as tiny_kolors

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_bench_cli_writes_every_section(tmp_path, tiny_model_dir):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "kolors_story.bench", "--quick", "--out", str(out)],
                          cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "B / A" in proc.stdout and "wrote" in proc.stdout
    result = json.loads(out.read_text())
    assert result["quick"] is True and result["format"] == run.BENCH_FORMAT
    sections = result["sections"]
    assert set(sections) == set(run.SECTIONS)
    assert not [k for k, v in sections.items() if "error" in v]

    f = sections["flops"]
    tf = f["tflop"]
    # A frozen-base LoRA step: backward ~ one more forward; checkpointing recomputes the blocks.
    assert tf["unet_forward"] < tf["unet_forward_backward"] < tf["unet_forward_backward_checkpointed"]
    assert 0 < f["cache_saving"]["flops_pct_checkpointing"] < f["cache_saving"]["flops_pct_no_checkpointing"] < 100
    assert f["resident_gb"]["encode_every_step"] > f["resident_gb"]["cached"] > 0

    t = sections["train"]
    names = [c["name"] for c in t["comparisons"]]
    assert any("cache" in n for n in names) and any("checkpointing" in n for n in names)
    assert any("Lightning" in n for n in names) and 0 < t["cache_read_share_of_step"] < 1
    assert all(c["a_median"] > 0 and c["b_median"] > 0 and len(c["a_runs"]) == 1 for c in t["comparisons"])
    assert t["cache_vs_encoding_max_diff"] <= 1e-4 and t["loss"] == "KolorsLoraModule.compute_loss"
    assert t["peak_step_mb"]["cached"] > 0 and t["resident_mb"]["encode_every_step"] > t["resident_mb"]["cached"]

    plan = sections["plan"]  # real-size counts: DoRA costs more than LoRA to train; the reward step more still
    assert plan["adapters"]["dora"]["train_step_gb"] > plan["runs"]["train"]["A10 / 4090 24 GB"]["stages"]["train step"]
    assert plan["rewards"]["refl 512"]["fits"] and plan["rewards"]["refl 512"]["reward_step_gb"] > 0

    g = sections["generate"]
    assert g["scenes"] == 8 and g["max_pixel_diff"] <= timing.PIXEL_TOLERANCE
    s = sections["score"]
    assert s["images"] == 8 and s["max_score_diff"] <= timing.SCORE_TOLERANCE
    sel = sections["select"]
    assert [c["name"].split(":")[0] for c in sel["comparisons"][:3]] == [f"story search N={n}" for n in (2, 3, 4)]
    assert all(sel["search"][f"n{n}"]["objective_gain_over_per_scene"] >= 0 for n in (2, 3, 4, 8))
    assert sel["comparisons"][-1]["b"] == "aesthetic + CLIP-T" and sel["clip_params"] > 0
    co = sections["coherence"]
    assert co["reading_over_plain"] > 1.0 and co["ip_adapter_gb"] > 0 and co["shared_tokens_gb_per_reference"] > 0
    d = sections["data"]
    assert d["preflight"]["images"] == 24 and d["cache_reuse"]["files_reused"] == d["cache_build"]["images"]
    assert d["preflight_parallel"]["same_result"] and d["preflight_parallel"]["speedup"] > 0

    # --only re-runs one section and keeps the others already in the file.
    before = sections["flops"]
    assert run.main(["--quick", "--only", "score", "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["sections"]["flops"] == before
    assert again["sections"]["score"]["seconds"] != sections["score"]["seconds"]


def test_real_scale_text_encoder_and_vae_flops():
    """ChatGLM3-6B on 256 tokens and the SDXL VAE encode at 1024², counted on the meta device."""
    from diffusers.pipelines.kolors import ChatGLMModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

    from kolors_story.models.architectures import KOLORS_TEXT_ENCODER_CONFIG, SDXL_VAE_CONFIG

    te = flops.count_text_encoder(KOLORS_TEXT_ENCODER_CONFIG, 256)
    # A transformer's forward is ~2 FLOPs per weight per token (embedding lookup and the unused
    # output head excluded) plus attention: the count must agree.
    model = flops.build_on("meta", lambda: ChatGLMModel(ChatGLMConfig(**KOLORS_TEXT_ENCODER_CONFIG), empty_init=False))
    matmul_params = sum(p.numel() for n, p in model.named_parameters()
                        if p.dim() == 2 and "word_embeddings" not in n and "output_layer" not in n)
    assert 2 * matmul_params * 256 < te < 1.1 * 2 * matmul_params * 256
    assert te / 1e12 == pytest.approx(2.95, rel=0.02)
    assert flops.count_vae_encode(SDXL_VAE_CONFIG, 1024) / 1e12 == pytest.approx(4.88, rel=0.02)


def test_flop_count_equals_flopcountermode_and_spares_checkpointed_memory():
    """The bench's lean counter gives FlopCounterMode's totals on a LoRA UNet step (with and without
    gradient checkpointing), and unlike it does not keep checkpointed activations alive."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from kolors_story.lora import add_lora
    from kolors_story.tiny.architectures import tiny_unet_config

    unet = flops.build_on("meta", lambda: UNet2DConditionModel(**tiny_unet_config()), torch.float16)
    unet.requires_grad_(False)
    add_lora(unet, 4, 4)
    plain: dict = {}
    for ckpt in (False, True):
        ours = flops.count_unet_step(unet, 64, 32, gradient_checkpointing=ckpt)
        x, t, enc, added = flops.unet_inputs(unet, 1, 64, 64, 32, torch.float16, "meta")
        with PeakTensorMemory() as mem, FlopCounterMode(display=False) as ref:
            out = unet(x, t, encoder_hidden_states=enc, added_cond_kwargs=added, return_dict=False)[0]
            fwd = ref.get_total_flops()
            out.float().square().mean().backward()
        assert (ours["forward"], ours["forward_backward"]) == (fwd, ref.get_total_flops())
        if ckpt:
            assert ours["peak_activation_bytes"] < mem.peak
            assert ours["peak_activation_bytes"] < plain["peak_activation_bytes"]
        plain = ours


def test_meta_counts_attention_the_cpu_kernel_would_hide():
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(1, 2, 64, 16, device="meta")
    with FlopCounterMode(display=False) as flops:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert flops.get_total_flops() == 2 * 2 * (2 * 64 * 64 * 16)  # QK^T and PV, 2 heads


def test_alternate_interleaves_and_warms_up():
    calls = []
    ta, tb = timing.alternate(lambda: calls.append("a"), lambda: calls.append("b"), repeats=4)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(ta) == len(tb) == 4 and all(t >= 0 for t in ta + tb)
    c = timing.Comparison("x", "n", "A", "B", [1.0, 3.0, 2.0], [4.0, 8.0, 6.0])
    assert c.ratio == 3.0 and c.as_dict()["ratio_b_over_a"] == 3.0


def test_peak_tensor_memory_counts_new_storage_only():
    base = torch.zeros(1000)
    with PeakTensorMemory() as mem:
        view = base[:10]  # no new memory
        base.add_(1)  # in place: no new memory
        tmp = torch.ones(250_000)  # 1 MB
        del tmp
        kept = torch.ones(1000)
    assert mem.peak == 1_000_000 and mem.current == 4000  # the 1 MB temporary, then what is kept
    del view, kept


def test_mismatching_outputs_fail_the_bench(monkeypatch, tmp_path):
    from kolors_story.bench import score

    monkeypatch.setattr(score, "SCORE_TOLERANCE", -1.0)
    with pytest.raises(timing.BenchError, match="batched and per-image scores differ"):
        run.run_bench(["score"], quick=True, out=tmp_path / "b.json", log=lambda m: None)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(timing.BenchError, match=r"unknown section\(s\) \['nope'\]"):
        run.run_bench(["nope"], quick=True, out=tmp_path / "b.json")
    with pytest.raises(timing.BenchError, match="--repeats=0"):
        run.run_bench(["score"], quick=True, repeats=0, out=tmp_path / "b.json")
    with pytest.raises(SystemExit):
        run.main(["--only", "nope"])


def test_bench_model_is_kolors_shaped_and_loads(tmp_path):
    from kolors_story.models.loading import load_pipeline

    folder = tiny_kolors.ensure_bench_model(tmp_path / "bench-model")
    stamp = (folder / "BENCH_MODEL.json").stat().st_mtime_ns
    assert tiny_kolors.ensure_bench_model(folder) == folder and (folder / "BENCH_MODEL.json").stat().st_mtime_ns == stamp
    pipe = load_pipeline(folder)
    c = pipe.unet.config
    assert (c.encoder_hid_dim_type, c.addition_embed_type) == ("text_proj", "text_time")
    assert c.encoder_hid_dim == pipe.text_encoder.config.hidden_size
    assert c.sample_size * pipe.vae_scale_factor == tiny_architectures.BENCH_RESOLUTION
