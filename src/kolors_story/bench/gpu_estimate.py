"""How long the GPU check takes, estimated before it runs: each group's FLOPs counted on the meta
device with the bench's counters (``bench.flops``: a UNet step, ChatGLM3 encoding, the VAE), run at
an assumed share of the card's dense fp16 rate, plus the host transfers (offload, parking) and fixed
costs (start-up, building each model, per group). No GPU needed: ``--only gpu --plan-only`` prints it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from kolors_story.bench.gpu_build import Scale
from kolors_story.bench.gpu_plan import Prediction

# An H100 SXM's dense fp16/bf16 tensor rate (1979 TFLOP/s is with 2:4 sparsity); the H200 has the
# same compute (more, faster memory).
H100_DENSE_FP16_TFLOPS = 990.0
UTILIZATION = 0.40  # assumed share of that rate the UNet, ChatGLM3 and the VAE reach in fp16
HOST_GB_PER_S = 10.0  # host <-> device copies of pageable weights (offload hooks, parking)
START_S = 30.0  # interpreter, torch/diffusers imports, the CUDA context
GROUP_S = 3.0  # per group: placing the models, synchronising, first-call kernel selection
BUILD_S = {"text_encoder": 10.0, "unet": 10.0, "vae": 3.0, "predictor": 3.0, "clip": 3.0,  # construct + draw
           # the quantized text encoders: the random one written to local disk once, each read back quantized
           "text_encoder_file": 15.0, "text_encoder_int8": 15.0, "text_encoder_nf4": 15.0}
LIMIT_S = {"full": 8 * 60.0, "quick": 3 * 60.0}  # what the check is designed for on one H100-class card


@dataclass(frozen=True)
class Cost:
    """What one group of the check costs: FLOPs on the card and bytes copied to or from the host."""

    flops: float
    host_bytes: float = 0.0


def estimate_seconds(costs: Iterable[Cost], builds: Iterable[str], tflops: float = H100_DENSE_FP16_TFLOPS,
                     utilization: float = UTILIZATION) -> float:
    """Seconds of a check run: compute at ``utilization`` of ``tflops``, host copies, fixed costs."""
    costs = list(costs)
    compute = sum(c.flops for c in costs) / (tflops * 1e12 * utilization)
    host = sum(c.host_bytes for c in costs) / (HOST_GB_PER_S * 1e9)
    return START_S + sum(BUILD_S[k] for k in builds) + GROUP_S * len(costs) + compute + host


# --------------------------------------------------------------------------- FLOP counts


def _counted(fn) -> int:
    from kolors_story.accounting import FlopCount

    with FlopCount() as flops:
        fn()
    return flops.total


def _unet_call(sizes, resolution: int, kept: bool = False) -> int:
    """One UNet forward of one image without gradient (a denoising step is two: CFG); ``kept``: a
    later step's, served the prompt projections of the first (memory.keep_prompt_projections)."""
    from kolors_story.models.prompt_projections import keep_across_steps, kept_across_steps
    from kolors_story.plan import count

    unet = count.meta_model("unet", sizes.unet, sizes.dtype)
    keep_across_steps(unet, kept)
    x, t, enc, added = count.unet_inputs(unet, 1, resolution, resolution, 256, next(unet.parameters()).dtype)
    with torch.no_grad(), kept_across_steps(unet):
        if kept:
            unet(x, t, encoder_hidden_states=enc, added_cond_kwargs=added)
        return _counted(lambda: unet(x, t, encoder_hidden_states=enc, added_cond_kwargs=added))


def _vae_decode(sizes, resolution: int) -> int:
    from kolors_story.plan import count

    vae = count.meta_model("vae", sizes.vae, sizes.dtype)
    z = torch.empty(1, 4, resolution // 8, resolution // 8, device="meta", dtype=next(vae.parameters()).dtype)
    with torch.no_grad():
        return _counted(lambda: vae.decode(z))


def _score(sizes) -> int:
    from kolors_story.plan import count

    predictor = count.meta_model("scorer", sizes.scorer, "float32")
    with torch.no_grad():
        return _counted(lambda: predictor(pixel_values=torch.empty(1, 3, 224, 224, device="meta")))


def count_flops(scale: Scale) -> dict[str, float]:
    """Per-image / per-prompt FLOPs of the pieces the check runs, at ``scale``, on the meta device."""
    from kolors_story.bench.flops import count_text_encoder, count_unet_step, count_vae_encode
    from kolors_story.lora import DEFAULT_TARGETS
    from kolors_story.plan import count

    sizes = scale.sizes()
    lora_unet = count.meta_lora_unet(sizes.unet, _dtype(scale.dtype), 16, tuple(DEFAULT_TARGETS))
    res = scale.resolution
    return {
        "unet_call": _unet_call(sizes, res),
        "unet_call_kept": _unet_call(sizes, res, kept=True),
        "unet_call_reward": _unet_call(sizes, scale.reward_resolution),
        "train_step_ckpt": count_unet_step(lora_unet, res, 256, gradient_checkpointing=True)["forward_backward"],
        "train_step": count_unet_step(lora_unet, res, 256, gradient_checkpointing=False)["forward_backward"],
        "text_encoder": count_text_encoder(scale.text_encoder, 256),
        "vae_encode": count_vae_encode(scale.vae, res),
        "vae_decode": _vae_decode(sizes, res),
        "vae_decode_reward": _vae_decode(sizes, scale.reward_resolution),
        "score": _score(sizes),
    }


def _dtype(name: str) -> torch.dtype:
    from kolors_story.models.loading import to_dtype

    return to_dtype(name)


# ------------------------------------------------------------------------- groups' costs


def _story_costs(f: dict, p: Prediction, weights: dict[str, int], scenes: int = 8) -> dict[str, Cost]:
    """Encode (prompt + negative per scene), denoise (CFG: two UNet calls a step), decode; with
    offload the models are parked in host memory first and move in and out once per batch."""
    s, m = p.job.sampler, p.job.memory
    halves = 2 if s.cfg > 1 else 1
    batches = -(-scenes // int(s.batch_size))
    host = sum(weights.values()) * (1 + 2 * batches) if m.offload != "none" else 0
    later = f["unet_call_kept"] if m.keeps_prompt_projections() else f["unet_call"]  # a step after the first
    phases = {"encode prompts": Cost(2 * scenes * f["text_encoder"]),
              "denoise": Cost(scenes * halves * (f["unet_call"] + (s.steps - 1) * later)),
              "decode": Cost(scenes * f["vae_decode"])}
    phases["story"] = Cost(sum(c.flops for c in phases.values()), host)
    return phases


def _reward_flops(f: dict, job) -> float:
    """The diffusion step plus ReFL, at most: CFG UNet calls without gradient to the last step, the one
    with gradient costing what a checkpointed training step costs per forward, the VAE decode and the
    scorer forward + backward (about 3 forwards each)."""
    r = job.reward
    halves = 2 if float(r.guidance) > 1 else 1
    grad_call = f["train_step_ckpt"] / f["unet_call"]  # forward + recompute + backward, in forwards
    unet = halves * f["unet_call_reward"] * (int(r.steps) - 1 + grad_call)
    return f["train_step_ckpt"] + unet + 3 * f["vae_decode_reward"] + 3 * f["score"]


def phase_costs(p: Prediction, f: dict, scale: Scale, weights: dict[str, int]) -> dict[str, Cost]:
    """FLOPs and host copies of each measured phase of one group, as ``gpu_stages`` runs it."""
    job, name = p.job, p.group.name
    n = scale.cache_images
    prompts = Cost((n + 2 * 8) * f["text_encoder"])  # the captions + the story's 8 scenes with negatives
    if name == "cache":
        return {"cache: VAE latents": Cost(n * f["vae_encode"]), "cache: prompt embeddings": prompts}
    if name.startswith("text encoder"):  # the unquantized encoder parked in host memory, later back
        return {"cache: prompt embeddings": Cost(prompts.flops, weights["text_encoder"])}
    if p.group.kind == "generate":
        return _story_costs(f, p, weights)
    if p.group.kind == "evaluate":
        return {"score": Cost(9 * f["score"])}  # one warm-up image, 8 measured
    if name == "reward":
        return {"step": Cost(_reward_flops(f, job))}
    step = f["train_step_ckpt"] if job.trainer.gradient_checkpointing else f["train_step"]
    return {"step": Cost(step * (1 if name == "dora" else scale.warmup + scale.measured))}


def group_cost(p: Prediction, f: dict, scale: Scale, weights: dict[str, int]) -> Cost:
    """A group's whole cost: its story phase where it renders one (the sum of its parts), else its phases."""
    phases = phase_costs(p, f, scale, weights)
    if "story" in phases:
        return phases["story"]
    return Cost(sum(c.flops for c in phases.values()), sum(c.host_bytes for c in phases.values()))


def _weights(scale: Scale) -> dict[str, int]:
    from kolors_story.plan import count

    sizes = scale.sizes()
    return {kind: count.param_bytes(kind, getattr(sizes, kind), sizes.dtype) for kind in ("text_encoder", "unet", "vae")}


def _seconds(cost: Cost, tflops: float = H100_DENSE_FP16_TFLOPS, utilization: float = UTILIZATION) -> float:
    return cost.flops / (tflops * 1e12 * utilization) + cost.host_bytes / (HOST_GB_PER_S * 1e9)


def row_seconds(predictions: dict[str, Prediction], scale: Scale, f: dict) -> dict[str, float]:
    """Each table row's estimated seconds of work (without the fixed costs), by row name, in the
    measured rows' unit (a training step, a story, a cache phase)."""
    weights = _weights(scale)
    out = {}
    for p in predictions.values():
        phases = phase_costs(p, f, scale, weights)
        # the measured training rows are one step's time (a median); the group runs warm-ups + measured
        steps = scale.warmup + scale.measured if p.group.name in ("train", "train no ckpt") else 1
        for row in p.group.rows:
            out[row.stage] = _seconds(phases[row.phase]) / steps
    return out


def models_built(selected: list[Prediction]) -> list[str]:
    """The models the run builds, in order: each on first use, the text encoder again after a release."""
    needs = {"cache": ("vae", "text_encoder"), "score": ("predictor", "clip"), "score one by one": ("predictor", "clip"),
             "text encoder int8": ("text_encoder", "text_encoder_file", "text_encoder_int8"),
             "text encoder nf4": ("text_encoder", "text_encoder_file", "text_encoder_nf4")}
    built: set[str] = set()
    out: list[str] = []
    for p in selected:
        name = p.group.name
        want = needs.get(name) or (("text_encoder", "unet", "vae") if p.group.kind == "generate"
                                   else ("unet", "vae", "predictor", "clip"))
        for kind in want:
            if kind not in built:
                built.add(kind)
                out.append(kind)
        if p.group.kind == "generate" and p.job.memory.release_text_encoder:
            built.discard("text_encoder")
    return out


def estimate(predictions: dict[str, Prediction], scale: Scale, flops: dict, quick_names: set[str]) -> dict:
    """Seconds of the full run and of --quick, with the costs they are made of."""
    weights = _weights(scale)
    costs = {name: group_cost(p, flops, scale, weights) for name, p in predictions.items()}
    out = {"tflops": H100_DENSE_FP16_TFLOPS, "utilization": UTILIZATION, "host_gb_per_s": HOST_GB_PER_S,
           "start_s": START_S, "group_s": GROUP_S, "build_s": BUILD_S, "limits_s": LIMIT_S,
           "groups": {n: {"tflop": c.flops / 1e12, "host_gb": c.host_bytes / 1e9} for n, c in costs.items()}}
    for run, names in (("full", set(predictions)), ("quick", quick_names)):
        chosen = [p for n, p in predictions.items() if n in names]
        out[f"{run}_s"] = estimate_seconds([costs[p.group.name] for p in chosen], models_built(chosen))
        out[f"{run}_s_at_15pct"] = estimate_seconds([costs[p.group.name] for p in chosen], models_built(chosen),
                                                    utilization=0.15)
    return out
