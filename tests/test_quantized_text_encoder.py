"""``model.text_encoder_quant``: ChatGLM3 in int8 (torchao) or nf4 (bitsandbytes). On the tiny model:
int8 renders the story and reproduces it exactly, the cache keeps int8 and full-precision embeddings
apart; in the memory plan (real sizes, meta device): memory=auto picks it at 12 and 16 GB only when
allowed, and counts what the loader keeps; a scheme that cannot run here is refused in one line
before anything loads; the bench reports its cost (quick: tiny sizes)."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
import torch

from kolors_story.data.cache_files import load_story_embeddings, read_cache_metadata
from kolors_story.errors import SettingsError
from kolors_story.generate.reproduce import reproduce
from kolors_story.models import architectures, quantization
from kolors_story.models.loading import load_text_encoder, resolve_layout
from kolors_story.plan import count
from kolors_story.plan.auto import make_plan
from kolors_story.plan.report import no_fit_message
from kolors_story.plan.stages import GB, planning_sizes
from kolors_story.story import story_scenes
from tests.helpers import compose, settings
from tests.test_cache import _build, _cfg, _write_dataset
from tests.test_generate import run_generate

# int8 is the [int8] extra (torchao pairs with one torch); without it these tests have nothing to run
needs_torchao = pytest.mark.skipif(not quantization._installed("torchao"), reason="pip install -e '.[int8]'")


def _plan(kind: str, overrides: list[str]):
    job = settings(kind, overrides)
    return make_plan(kind, job, planning_sizes(job.model, job.scorer), set())


# ------------------------------------------------------------------------------ the tiny model


def test_the_unquantized_encoder_loads_without_its_lm_head_and_the_plan_counts_what_is_loaded(tiny_model_dir):
    """Prompt encoding never reads logits: ChatGLM's LM head (0.53 GB in fp16 at real size) is not kept
    in any scheme, and the plan's weights are the loaded encoder's bytes."""
    full = load_text_encoder(resolve_layout(tiny_model_dir), torch.float32)
    assert full.output_layer is None
    config = json.loads((tiny_model_dir / "text_encoder" / "config.json").read_text())
    assert count.param_bytes("text_encoder", count.key(config), "float32") == quantization.stored_bytes(full)


def test_the_prompt_encoder_keeps_two_hidden_states_and_its_embeddings_are_bit_identical(tiny_model_dir):
    """encode_prompt reads the last block's input and output; the other hidden states are no longer
    held (0.45 GB in fp16 for 8 prompts at real size), and the embeddings are the same bits as the
    plain ChatGLMModel's. The plan counts the smaller peak."""
    from diffusers import KolorsPipeline
    from diffusers.pipelines.kolors import ChatGLMModel

    from kolors_story.models.loading import load_tokenizer
    from kolors_story.models.prompts import text_pipeline

    layout = resolve_layout(tiny_model_dir)
    ours = text_pipeline(layout, torch.float32, "cpu")
    plain = KolorsPipeline(vae=None, text_encoder=ChatGLMModel.from_pretrained(str(layout.text_encoder)),
                           tokenizer=load_tokenizer(layout), unet=None, scheduler=None,
                           force_zeros_for_empty_prompt=False)
    prompts = ["一只红色的狐狸在雪地里", "a lighthouse at night, ink wash"]
    with torch.no_grad():
        a = ours.encode_prompt(prompt=prompts, device="cpu", do_classifier_free_guidance=True)
        b = plain.encode_prompt(prompt=prompts, device="cpu", do_classifier_free_guidance=True)
        states = ours.text_encoder(input_ids=torch.ones(1, 4, dtype=torch.long), output_hidden_states=True).hidden_states
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert len(states) == len(ours.text_encoder.encoder.layers) + 1 and states[0] is None and states[-2] is not None

    real = count.key(architectures.KOLORS_TEXT_ENCODER_CONFIG)
    kept = count.text_encode(real, 8, "float16")
    count.meta_model.cache_clear()
    count.text_encode.cache_clear()
    with mock.patch("kolors_story.models.loading.as_prompt_encoder", lambda m: setattr(m, "output_layer", None) or m):
        every = count.text_encode(real, 8, "float16")
    count.meta_model.cache_clear()
    count.text_encode.cache_clear()
    assert every - kept > 0.4 * GB  # 27 of 29 hidden states of 8 x 256 x 4096 fp16 values no longer held


@needs_torchao
def test_int8_loads_through_transformers_quantization_config_and_the_plan_counts_it(tiny_model_dir):
    layout = resolve_layout(tiny_model_dir)
    full = load_text_encoder(layout, torch.float32)
    int8 = load_text_encoder(layout, torch.float32, "int8")
    linear = int8.encoder.layers[0].mlp.dense_h_to_4h.weight
    assert type(linear.data).__name__ == "Int8Tensor" and int8.hf_quantizer is not None  # torchao, not our kernels
    assert int8.output_layer is None and type(int8.embedding.word_embeddings.weight.data) is torch.Tensor
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = full(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        b = int8(input_ids=ids, output_hidden_states=True).hidden_states[-2]
    cosine = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert not torch.equal(a, b) and cosine > 0.999
    config = json.loads((tiny_model_dir / "text_encoder" / "config.json").read_text())
    assert count.quantized_text_encoder_bytes(count.key(config), "float32", "int8") == quantization.stored_bytes(int8)


@needs_torchao
def test_int8_on_the_cpu_reads_its_embedding_rows_from_a_fresh_mapping_of_the_checkpoint(tiny_model_dir):
    """The full-precision tensors of an int8 encoder stay file-backed (the embedding table is 0.53 GB at
    real size, and a prompt reads a few hundred of its 65,024 rows) but leave the loader's mappings,
    whose every page the quantizer read: one fresh mapping per shard, the same values, nothing copied."""
    layout = resolve_layout(tiny_model_dir)
    full = load_text_encoder(layout, torch.float32)
    int8 = load_text_encoder(layout, torch.float32, "int8")
    table = int8.embedding.word_embeddings.weight
    path, _ = quantization.mapped_file(table)
    assert Path(path).parent == layout.text_encoder
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # encodes through the new mapping, which holds only the pages read
        assert torch.isfinite(int8(input_ids=ids, output_hidden_states=True).hidden_states[-2]).all()
    assert _resident_bytes(table) < 0.5 * table.nbytes  # 32 rows of 65,024 read (2 MB pages here), not all
    assert torch.equal(table, full.embedding.word_embeddings.weight)


def _resident_bytes(t: torch.Tensor) -> int:
    """Resident bytes of the mapping that holds ``t`` (Linux /proc/self/smaps)."""
    ptr, inside = t.data_ptr(), False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ")[0] and not line.startswith(("Rss", "Size")):
            start, end = (int(x, 16) for x in line.split(" ")[0].split("-"))
            inside = start <= ptr < end
        elif inside and line.startswith("Rss:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("not mapped")


@needs_torchao
def test_int8_renders_the_story_and_its_bundle_reproduces_exactly(tmp_path):
    result, _ = run_generate(tmp_path, "model.text_encoder_quant=int8", "submit.team=Quant", name="int8")
    manifest = result["manifest"]
    assert manifest["model"]["text_encoder_quant"] == "int8"
    assert manifest["config"]["model"]["text_encoder_quant"] == "int8"  # what reproduce= renders with
    assert len(result["images"]) == 8
    for n, source in enumerate((result["bundle"], result["out_dir"])):
        report = reproduce(source, tmp_path / f"again-{n}", progress=False)
        assert (report["identical"], report["all_identical"]) == (8, True)
        again = json.loads((tmp_path / f"again-{n}" / "manifest.json").read_text())
        assert again["model"]["text_encoder_quant"] == "int8"


@needs_torchao
def test_the_cache_records_the_scheme_and_a_run_with_none_rebuilds_the_embeddings(tmp_path):
    data_dir = tmp_path / "data"
    _write_dataset(data_dir)
    int8_job = _cfg(data_dir, "model.text_encoder_quant=int8")
    scenes = story_scenes(int8_job.story, int8_job.sampler)
    int8 = _build(int8_job, data_dir, scenes)
    assert read_cache_metadata(int8.story)["text_encoder_quant"] == "int8"
    assert {read_cache_metadata(p)["text_encoder_quant"] for p in int8.items} == {"int8"}
    assert json.loads((int8.cache_dir / "manifest.json").read_text())["text_encoder_quant"] == "int8"

    none = _build(_cfg(data_dir), data_dir, scenes)
    s = none.stats
    assert (s["embeds_reused"], s["story"], s["files_reused"]) == (0, "computed", 0)
    assert s["embeds_computed"] == len({c for c in (read_cache_metadata(p)["caption"] for p in int8.items)})
    assert s["latents_reused"] == len(int8.items)  # the VAE's part does not depend on the text encoder
    assert none.story != int8.story and not set(none.items) & set(int8.items)
    assert read_cache_metadata(none.story)["text_encoder_quant"] == "none"
    a, b = (load_story_embeddings(c.story)["prompt_embeds"] for c in (int8, none))
    assert not torch.equal(a, b) and torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999

    again = _build(int8_job, data_dir, scenes)  # both kept side by side: int8 again is all reused
    assert (again.stats["files_reused"], again.stats["story"]) == (len(int8.items), "reused")


# ------------------------------------------------------------------------------------ the plan


@needs_torchao
@pytest.mark.parametrize("budget, offload", [(12, "model"), (16, "none")])
def test_allowed_the_plan_quantizes_at_12_and_16_gb_instead_of_offloading_layer_by_layer(budget, offload):
    job, plan = _plan("generate", ["model=kolors", f"memory.budget_gb={budget}",
                                   "memory.allow_quantized_text_encoder=true"])
    assert plan.fits and plan.chosen["model.text_encoder_quant"] == job.model.text_encoder_quant == "int8"
    assert job.memory.offload == offload != "sequential"
    encode = next(st for st in plan.stages if st.name == "encode prompts")
    assert encode.settings["text_encoder_quant"] == "int8"
    te = count.quantized_text_encoder_bytes(planning_sizes(job.model, job.scorer).text_encoder, "float16", "int8")
    assert 6.1 * GB < te < 6.4 * GB  # 5.7 B int8 weights + their scales + the fp16 embedding, no LM head
    assert encode.weights >= te and encode.work > count.dequantized_layer_bytes(
        planning_sizes(job.model, job.scorer).text_encoder, "float16") > 0.2 * GB


@pytest.mark.parametrize("budget, chosen, peak_gb", [
    (12, {"memory.offload": "sequential", "memory.vae_slicing": True}, 4.7),  # the prompt projections kept (3.1 without)
    (16, {"memory.offload": "model", "memory.vae_slicing": True}, 12.3),
])
def test_not_allowed_the_plan_is_unchanged(budget, chosen, peak_gb):
    for extra in ([], ["memory.allow_quantized_text_encoder=false"]):
        job, plan = _plan("generate", ["model=kolors", f"memory.budget_gb={budget}", *extra])
        assert plan.fits and plan.chosen == chosen and round(plan.worst.peak / GB, 1) == peak_gb
        assert job.model.text_encoder_quant == "none"
        assert not any("text_encoder_quant" in st.settings for st in plan.stages)


@needs_torchao
def test_training_on_12_gb_fits_with_a_quantized_prompt_cache_only_when_allowed():
    _, plan = _plan("train", ["model=kolors", "memory.budget_gb=12"])
    assert not plan.fits and plan.worst.name == "cache: prompt embeddings"
    # ChatGLM3's 12.0 GB alone is over the 10.8 GB usable: the advice is quantization, not a smaller batch
    message = no_fit_message(plan)
    assert "weights alone" in message and "allow_quantized_text_encoder=true" in message
    assert "cache.batch_size" not in message
    job, plan = _plan("train", ["model=kolors", "memory.budget_gb=12", "memory.allow_quantized_text_encoder=true"])
    assert plan.fits and job.model.text_encoder_quant == "int8"
    nf4 = count.quantized_text_encoder_bytes(planning_sizes(job.model, job.scorer).text_encoder, "float16", "nf4")
    assert 3.3 * GB < nf4 < 3.6 * GB  # 4 bits + absmax per 64 + a float32 per 256 absmax


# -------------------------------------------------------------------------------- refusals


def test_nf4_on_the_cpu_is_refused_in_one_line_before_anything_loads(tmp_path, monkeypatch, capsys, tiny_model_dir):
    import kolors_story.generate.checks  # noqa: F401 - bound before the loaders are patched
    from kolors_story.cli import generate_main, train_main
    from kolors_story.generate import job as generate_run
    from kolors_story.models import loading
    from kolors_story.train import job as train_run

    def forbidden(*a, **k):
        raise AssertionError("a model or the data stage was loaded before the scheme was checked")

    for module, name in ((loading, "load_pipeline"), (loading, "load_vae"), (loading, "load_unet"),
                         (generate_run, "load_pipeline"), (train_run, "data_stage")):
        monkeypatch.setattr(module, name, forbidden)
    monkeypatch.setattr("diffusers.pipelines.kolors.ChatGLMModel.from_pretrained", forbidden)
    runs = ((generate_main, compose("generate", ["model=tiny", "model.text_encoder_quant=nf4", f"output_dir={tmp_path}"])),
            (train_main, compose("train", ["model=tiny", "model.text_encoder_quant=nf4", f"output_dir={tmp_path}/t",
                                           f"data_dir={tmp_path}/d"])))
    for main, cfg in runs:
        with pytest.raises(SystemExit) as stop:
            main(cfg)
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert all(w in err[0] for w in ("model.text_encoder_quant=nf4", "CUDA", "model.device=cpu", "int8"))
    layout = resolve_layout(tiny_model_dir)
    with pytest.raises(SettingsError, match="nf4 runs only on a CUDA GPU"):
        load_text_encoder(layout, torch.float32, "nf4", "cpu")


@needs_torchao
def test_each_scheme_that_cannot_run_names_the_alternative(monkeypatch):
    with pytest.raises(SettingsError, match="use one of none, int8, nf4"):
        quantization.check_text_encoder_quant("int4", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(quantization, "_installed", lambda package: package != "bitsandbytes")
    with pytest.raises(SettingsError, match=r"needs bitsandbytes.*\[gpu\].*int8"):
        quantization.check_text_encoder_quant("nf4", "cuda")
    with pytest.raises(SettingsError, match="memory.offload=model"):
        quantization.check_text_encoder_quant("int8", "cuda", offload="sequential")
    quantization.check_text_encoder_quant("int8", "cuda", offload="model")
    assert quantization.available_schemes("cuda") == ("int8",) and quantization.available_schemes("cpu") == ("int8",)


def test_int8_without_its_extra_names_the_extra(monkeypatch):
    monkeypatch.setattr(quantization, "_installed", lambda package: False)
    with pytest.raises(SettingsError, match=r"needs torchao.*pip install -e '\.\[int8\]'"):
        quantization.check_text_encoder_quant("int8", "cpu")
    assert quantization.available_schemes("cpu") == ()  # memory=auto never picks what is not installed


# ---------------------------------------------------------------------------------- the bench


@needs_torchao
@pytest.mark.slow
def test_quick_bench_reports_cosine_per_story_time_and_peak_rss(tmp_path):
    from rich.console import Console

    from kolors_story.bench.run import run_bench
    from kolors_story.bench.table import render_table

    result = run_bench(["text_encoder"], quick=True, out=tmp_path / "bench.json", log=lambda m: None)
    sec = result["sections"]["text_encoder"]
    assert "error" not in sec, sec
    (model,) = sec["models"]  # --quick: the tiny model only (the full-size numbers are in the docs)
    assert set(model["schemes"]) == {"none", "int8"} and "nf4" in model["skipped"]
    int8 = model["schemes"]["int8"]
    assert set(int8["stories"]) == {"ink_dream", "warrior_dragon", "idol_diary"}
    for story in int8["stories"].values():
        assert 0.999 < story["cosine_min"] <= story["cosine_mean"] < 1 and 0 < story["relative_error"] < 0.05
    for r in model["schemes"].values():
        assert r["encode_s"] > 0 and r["load_s"] > 0 and r["peak_rss_encode_gb"] > 0 and r["peak_rss_load_gb"] > 0
    console = Console(record=True, width=200)
    console.print(render_table(result))
    assert "int8 vs none, ink_dream: cosine mean / worst prompt" in console.export_text()
