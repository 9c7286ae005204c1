"""Section ``text_encoder``: what a quantized ChatGLM3 (``model.text_encoder_quant``) costs in prompt
embeddings, time and memory.

Each scheme loads the encoder with the project's own loader in a fresh process (peak RSS belongs to
a process) and encodes the three stories' prompts (``conf/story/*.yaml``) as the cache does; its
embeddings are compared with the unquantized encoder's: cosine and relative error per story, over
all 256 positions (what the UNet attends to). Models: the tiny pre-trained Kolors and ChatGLM3-6B
at full size with random weights (written once into the model cache: 12.5 GB in bf16), or your
real weights with ``model.path=<Kolors folder>``; ``--quick``: the tiny model only.

Random weights lack the outlier weights of a trained LLM, which make per-row rounding coarser: in
that respect they flatter int8/nf4, and their error is a lower bound. But this random network also
amplifies any error (a bf16-rounding-sized nudge to its input embeddings alone ends about 5 % off at
the penultimate layer), which a trained one need not: measure with your weights. Peak RSS is
measured twice: while loading (quantizing reads the full-precision shards, whose pages count while
they are mapped) and while encoding (the loaded encoder and its work: what stays for the run).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from kolors_story.bench.timing import GB, BenchContext, compose_settings, proc_status

STORIES = ("ink_dream", "warrior_dragon", "idol_diary")  # conf/story/*.yaml
ENCODE_BATCH = 8  # prompts per encode_prompt call: one story
RANDOM_MODEL_VERSION = 1


def story_prompts() -> dict[str, list[str]]:
    """The prompts of each example story, as generation renders them."""
    from kolors_story.story import story_scenes

    out = {}
    for name in STORIES:
        job = compose_settings("generate", ["model=tiny", f"story={name}"])
        out[name] = [s.prompt for s in story_scenes(job.story, job.sampler)]
    return out


def text_encoder_layout(folder: Path, tokenizer: Path):
    """A layout of only a text encoder and its tokenizer: all ``load_text_encoder`` reads."""
    from kolors_story.models.loading import KolorsLayout

    return KolorsLayout(root=folder, unet=folder, vae=folder, vae_file=None, text_encoder=folder, tokenizer=tokenizer,
                        scheduler=folder, kind="kolors")


def random_chatglm3(ctx: BenchContext) -> Path:
    """ChatGLM3-6B at full size with random bf16 weights, in the release's format (built once)."""
    from kolors_story.models.architectures import KOLORS_TEXT_ENCODER_CONFIG
    from kolors_story.models.random_init import save_random_text_encoder

    folder = ctx.model_cache / f"chatglm3-6b-random-bf16-v{RANDOM_MODEL_VERSION}"
    stamp = folder / "RANDOM_CHATGLM3.json"
    if not stamp.exists():
        ctx.log(f"text_encoder: writing a random full-size ChatGLM3 (12.5 GB bf16) into {folder} (once) ...")
        import shutil

        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        save_random_text_encoder(tmp, KOLORS_TEXT_ENCODER_CONFIG, torch.bfloat16, seed=0)
        (tmp / stamp.name).write_text(json.dumps({"seed": 0, "dtype": "bfloat16"}))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return folder


def bench_models(ctx: BenchContext, overrides: list[str]) -> list[dict]:
    """What to measure: ``{name, folder, dtype}`` per model (folder: its text encoder + tokenizer)."""
    from kolors_story.models.loading import ensure_model, resolve_layout

    cuda = torch.cuda.is_available()
    if any(o.startswith("model.") for o in overrides):  # your weights
        job = compose_settings("generate", ["model=kolors", *overrides])
        layout = resolve_layout(ensure_model(job.model), job.model.vae_path)
        dtype = "bfloat16" if job.model.dtype in ("float16", "fp16") and not cuda else str(job.model.dtype)
        return [{"name": f"your weights ({layout.root.name})", "folder": str(layout.text_encoder),
                 "tokenizer": str(layout.tokenizer), "dtype": dtype}]
    tiny_job = compose_settings("generate", ["model=tiny", "model.tiny.weights=pretrained"])
    tiny_layout = resolve_layout(ensure_model(tiny_job.model), tiny_job.model.vae_path)
    models = [{"name": "tiny (pre-trained)", "folder": str(tiny_layout.text_encoder),
               "tokenizer": str(tiny_layout.tokenizer), "dtype": str(tiny_job.model.dtype)}]
    if not ctx.quick:
        folder = random_chatglm3(ctx)
        models.append({"name": "ChatGLM3-6B full size, random weights", "folder": str(folder),
                       "tokenizer": str(folder), "dtype": "bfloat16"})
    return models


# --------------------------------------------------------------------------- in the fresh process


def _reset_peak() -> bool:
    """Start a new peak-RSS window (Linux: VmHWM back to the current RSS)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_scheme(job: dict) -> dict:
    """Load the encoder with ``job['scheme']``, encode ``job['prompts']`` and write the embeddings to
    ``job['out']``; returns times and memory. Runs in a process of its own."""
    from safetensors.torch import save_file

    from kolors_story.models.loading import to_dtype
    from kolors_story.models.prompts import encode_captions, text_pipeline

    torch.set_num_threads(job["threads"])
    layout = text_encoder_layout(Path(job["folder"]), Path(job["tokenizer"]))
    from diffusers import KolorsPipeline  # noqa: F401 - imported before the baseline, as every scheme needs it
    from diffusers.pipelines.kolors import ChatGLMModel, ChatGLMTokenizer  # noqa: F401

    base = proc_status(("VmRSS",)).get("VmRSS")
    t0 = time.perf_counter()
    pipe = text_pipeline(layout, to_dtype(job["dtype"]), job["device"], job["scheme"])
    load_s = time.perf_counter() - t0
    loaded = proc_status(("VmHWM", "VmRSS"))
    load_peak, resident = loaded.get("VmHWM"), loaded.get("VmRSS")
    windowed = _reset_peak()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    embeds = encode_captions(pipe, job["prompts"], job["device"], ENCODE_BATCH)
    encode_s = time.perf_counter() - t0
    encode_peak = proc_status(("VmHWM",)).get("VmHWM") if windowed else None
    tensors = {}
    for i, prompt in enumerate(job["prompts"]):
        tensors[f"{i}/prompt_embeds"], tensors[f"{i}/pooled"] = (t.contiguous() for t in embeds[prompt])
    save_file(tensors, job["out"])

    def net(x):
        return None if x is None or base is None else x - base

    return {"load_s": load_s, "encode_s": encode_s, "encode_s_per_prompt": encode_s / len(job["prompts"]),
            "rss_base_gb": (base or 0) / GB, "resident_gb": (net(resident) or 0) / GB,
            "peak_rss_load_gb": (net(load_peak) or 0) / GB,
            "peak_rss_encode_gb": None if encode_peak is None else net(encode_peak) / GB,
            "peak_gpu_encode_gb": torch.cuda.max_memory_allocated() / GB if torch.cuda.is_available() else None}


# ---------------------------------------------------------------------------------- the section


def _in_fresh_process(job: dict) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(measure_scheme, job).result()


def compare(reference: Path, other: Path, stories: dict[str, list[str]]) -> dict:
    """Per story: the prompt embeddings' cosine (mean and worst prompt, each over all 256 x D values),
    their relative error ``|q - r| / |r|`` and the pooled embeddings' cosine."""
    from safetensors.torch import load_file

    ref, new = load_file(str(reference)), load_file(str(other))
    out, start = {}, 0
    for name, prompts in stories.items():
        rows = range(start, start + len(prompts))
        start += len(prompts)
        r = torch.stack([ref[f"{i}/prompt_embeds"] for i in rows]).double()
        q = torch.stack([new[f"{i}/prompt_embeds"] for i in rows]).double()
        cos = torch.nn.functional.cosine_similarity(r.flatten(1), q.flatten(1), dim=1)
        pr = torch.stack([ref[f"{i}/pooled"] for i in rows]).double()
        pq = torch.stack([new[f"{i}/pooled"] for i in rows]).double()
        out[name] = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                     "relative_error": float((q - r).norm() / r.norm()),
                     "pooled_cosine_mean": float(torch.nn.functional.cosine_similarity(pr, pq, dim=1).mean())}
    return out


def _model_results(ctx: BenchContext, n: int, model: dict, stories: dict[str, list[str]], device: str) -> dict:
    """Every scheme that can run here on one model; the others with the reason they cannot."""
    from kolors_story.errors import SettingsError
    from kolors_story.models.quantization import SCHEMES, check_text_encoder_quant

    prompts = [p for ps in stories.values() for p in ps]
    schemes, skipped, files = {}, {}, {}
    for scheme in SCHEMES:
        try:
            check_text_encoder_quant(scheme, device)
        except SettingsError as exc:
            skipped[scheme] = str(exc)
            continue
        ctx.log(f"text_encoder: {model['name']}, {scheme}: load + encode {len(prompts)} prompts (own process) ...")
        files[scheme] = ctx.workdir / f"text-encoder-{n}-{scheme}.safetensors"
        schemes[scheme] = _in_fresh_process({**model, "scheme": scheme, "device": device, "prompts": prompts,
                                             "out": str(files[scheme]), "threads": torch.get_num_threads()})
    for scheme, result in schemes.items():
        result["stories"] = compare(files["none"], files[scheme], stories) if scheme != "none" else None
        result["weights_gb"] = counted_weights(Path(model["folder"]), model["dtype"], scheme) / GB
    return {"name": model["name"], "dtype": model["dtype"], "schemes": schemes, "skipped": skipped}


def counted_weights(folder: Path, dtype: str, scheme: str) -> int:
    """The encoder's weights as the memory plan counts them (what a GPU holds: everything resident)."""
    from kolors_story.plan import count

    config = count.key(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    if scheme == "none":
        return count.param_bytes("text_encoder", config, dtype)
    return count.quantized_text_encoder_bytes(config, dtype, scheme)


def section_text_encoder(ctx: BenchContext) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stories = story_prompts()
    models = [_model_results(ctx, n, m, stories, device) for n, m in enumerate(bench_models(ctx, ctx.overrides))]
    return {"device": device, "prompts_per_story": {k: len(v) for k, v in stories.items()},
            "encode_batch": ENCODE_BATCH, "models": models}
