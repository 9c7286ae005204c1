"""Section ``plan``: the memory plan at real Kolors size (1024², fp16) for the default configs on
the GPUs users have: predicted peak per stage and what ``memory=auto`` picks, for training,
generation, the hires refine and scoring; and what each adapter type (``lora.type``, LoCon) costs
to train on a 24 GB card (trainable parameters, train-step peak), and what a reward=aesthetic step
costs next to a plain LoRA step (peak memory from the plan, FLOPs counted). Counted on the meta
device, no weights needed."""

from __future__ import annotations

from kolors_story.bench.timing import BenchContext, compose_settings

GPUS = {"T4 16 GB": 16, "A10 / 4090 24 GB": 24, "A100 40 GB": 40, "A100 80 GB": 80}
QUICK_GPUS = {"A10 / 4090 24 GB": 24}
RUNS = {  # name -> (job, overrides)
    "train": ("train", []),
    "generate": ("generate", []),
    "hires": ("generate", ["sampler=hires"]),
    "score": ("evaluate", []),
}


def plan_one(kind: str, overrides: list[str], budget_gb: float) -> dict:
    from kolors_story.plan.auto import make_plan
    from kolors_story.plan.stages import GB, planning_sizes

    job = compose_settings(kind, ["model=kolors", f"memory.budget_gb={budget_gb}", *overrides])
    job, plan = make_plan(kind, job, planning_sizes(job.model, job.scorer))
    return {"fits": plan.fits, "peak_gb": round(plan.worst.peak / GB, 2), "worst_stage": plan.worst.name,
            "chosen": plan.chosen, "stages": {st.name: round(st.peak / GB, 2) for st in plan.stages}}


# lora.type / LoCon at the style preset's rank 16 (LoCon: convolutions at rank 8)
ADAPTERS = {"lora": [], "dora": ["lora.type=dora"], "loha": ["lora.type=loha", "lora.dropout=0"],
            "lokr": ["lora.type=lokr", "lora.dropout=0"], "locon": ["lora=locon"]}
QUICK_ADAPTERS = ("dora",)


def adapter_cost(overrides: list[str], budget_gb: float = 24) -> dict:
    """Trainable parameters and the training plan of one adapter type at real size."""
    from kolors_story.plan import count
    from kolors_story.plan.stages import planning_sizes

    job = compose_settings("train", ["model=kolors", *overrides])
    sizes = planning_sizes(job.model, job.scorer)
    params = count.lora_params(sizes.unet, job.lora.rank, tuple(job.lora.target_modules),
                               (job.lora.type, job.lora.conv_rank))
    pick = plan_one("train", overrides, budget_gb)
    return {"params": params, "fp32_mb": round(params * 4 / 2**20, 1), "peak_gb": pick["peak_gb"],
            "train_step_gb": pick["stages"].get("train step"), "fits": pick["fits"], "chosen": pick["chosen"]}


def section_plan(ctx: BenchContext) -> dict:
    gpus = QUICK_GPUS if ctx.quick else GPUS
    out: dict = {"resolution": 1024, "dtype": "float16", "gpus": gpus, "runs": {}}
    for run, (kind, overrides) in RUNS.items():
        ctx.log(f"plan: {run} on {', '.join(gpus)} ...")
        out["runs"][run] = {gpu: plan_one(kind, overrides, gb) for gpu, gb in gpus.items()}
    names = QUICK_ADAPTERS if ctx.quick else tuple(ADAPTERS)
    ctx.log(f"plan: adapter types {', '.join(names)} on a 24 GB card ...")
    out["adapters"] = {name: adapter_cost(ADAPTERS[name]) for name in names}
    rewards = QUICK_REWARDS if ctx.quick else tuple(REWARDS)
    ctx.log(f"plan: reward refinement {', '.join(rewards)} on a 24 GB card ...")
    out["rewards"] = {name: reward_cost(REWARDS[name], flops=not ctx.quick) for name in rewards}
    ctx.log("plan: character=auto on a 24 GB card ...")
    out["character"] = character_cost(["character=auto"], flops=not ctx.quick)
    return out


# reward=aesthetic next to a plain LoRA step on a 24 GB card (rank 16 style LoRA, 20 Euler steps, CFG 5)
REWARDS = {"refl 512": ["reward=aesthetic"], "draft K=4 512": ["reward=aesthetic", "reward.method=draft",
                                                                "reward.draft_k=4"],
           "refl 1024": ["reward=aesthetic", "reward.resolution=1024"]}
QUICK_REWARDS = ("refl 512",)


def _flops_fwd_bwd(model_fn, make_input) -> tuple[int, int]:
    from kolors_story.accounting import FlopCount

    x = make_input().requires_grad_(True)
    with FlopCount() as flops:
        out = model_fn(x)
        forward = flops.total
        out.float().sum().backward()
    return forward, flops.total


def reward_flops(resolution: int, steps: int, grad_steps: int) -> dict:
    """FLOPs of one reward step at real size (batch 1, CFG doubling the UNet batch) and of a plain
    1024² LoRA step: (steps - grad_steps) UNet calls without gradient, grad_steps with, the VAE
    decode and the float32 scorer forward + backward."""
    import json

    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from kolors_story.bench.flops import count_unet_step
    from kolors_story.models import architectures as configs
    from kolors_story.plan.count import build_on, meta_model

    unet = build_on("meta", lambda: UNet2DConditionModel(**configs.KOLORS_UNET_CONFIG), torch.float16)
    at_res = count_unet_step(unet, resolution, 256, gradient_checkpointing=True)
    plain = count_unet_step(unet, 1024, 256, gradient_checkpointing=True)
    vae = build_on("meta", lambda: AutoencoderKL(**configs.SDXL_VAE_CONFIG), torch.float16)
    side = resolution // 8
    _, vae_fb = _flops_fwd_bwd(lambda z: vae.decode(z).sample, lambda: torch.empty(1, 4, side, side, device="meta",
                                                                                       dtype=torch.float16))
    scorer = meta_model("scorer", json.dumps(configs.REAL_PREDICTOR_CONFIG), "float32")
    _, score_fb = _flops_fwd_bwd(lambda x: scorer.vision_model(pixel_values=F.interpolate(x, size=(224, 224))).pooler_output,
                                 lambda: torch.empty(1, 3, resolution, resolution, device="meta"))
    reward = 2 * ((steps - grad_steps) * at_res["forward"] + grad_steps * at_res["forward_backward"]) + vae_fb + score_fb
    return {"reward_tflop": reward / 1e12, "plain_tflop": plain["forward_backward"] / 1e12,
            "ratio": reward / plain["forward_backward"]}


def reward_cost(overrides: list[str], budget_gb: float = 24, flops: bool = True) -> dict:
    """The plan's peaks of a reward run and (unless ``flops`` is off) the step's FLOPs against a plain step."""
    job = compose_settings("train", ["model=kolors", *overrides])
    r = job.reward
    pick = plan_one("train", overrides, budget_gb)
    grad_steps = int(r.draft_k) if r.method == "draft" else 1
    return {"peak_gb": pick["peak_gb"], "reward_step_gb": pick["stages"].get("reward step"),
            "train_step_gb": pick["stages"].get("train step"), "fits": pick["fits"],
            **(reward_flops(int(r.resolution), int(r.steps), grad_steps) if flops else {})}


# character=auto on a 24 GB card: the loop's stages in the plan, and one round's FLOPs at real size
CARDS_24GB = {"A10 (125 TFLOP/s)": 125.0, "RTX 4090 (165 TFLOP/s)": 165.0}  # dense fp16 tensor rates
UTILIZATION = 0.40  # the share of that rate assumed (as docs/measured-on-a-gpu.md does for the H100)


def character_round_flops(job) -> dict:
    """FLOPs of one round of ``character=auto`` at real size: the candidates' denoising (CFG doubles
    the UNet batch) and decodes, and the entity LoRA's steps (rank ``character.rank``)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from kolors_story.bench.flops import count_unet_step
    from kolors_story.lora import DEFAULT_TARGETS, add_lora
    from kolors_story.models import architectures as configs
    from kolors_story.plan.count import build_on

    c, s = job.character, job.sampler
    unet = build_on("meta", lambda: UNet2DConditionModel(**configs.KOLORS_UNET_CONFIG), torch.float16)
    unet.requires_grad_(False)
    add_lora(unet, rank=c.rank, alpha=c.alpha, target_modules=DEFAULT_TARGETS)
    step = count_unet_step(unet, s.height, 256, gradient_checkpointing=job.trainer.gradient_checkpointing)
    vae = build_on("meta", lambda: AutoencoderKL(**configs.SDXL_VAE_CONFIG), torch.float16)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vae.decode(torch.empty(1, 4, s.height // 8, s.width // 8, device="meta", dtype=torch.float16))
    renders = c.candidates * (s.steps * (2 if s.cfg > 1 else 1) * step["forward"] + counter.get_total_flops())
    training = c.steps * c.batch_size * step["forward_backward"]
    return {"renders_tflop": renders / 1e12, "training_tflop": training / 1e12, "round_tflop": (renders + training) / 1e12}


def character_cost(overrides: list[str], budget_gb: float = 24, flops: bool = True) -> dict:
    """The plan's peaks of the character loop's stages on a 24 GB card and (unless ``flops`` is off)
    one round's FLOPs and the minutes they take at ``UTILIZATION`` of a 24 GB card's fp16 rate."""
    job = compose_settings("train", ["model=kolors", *overrides])
    pick = plan_one("train", overrides, budget_gb)
    out = {"fits": pick["fits"], "peak_gb": pick["peak_gb"], "rounds": job.character.rounds,
           "candidates": job.character.candidates, "steps": job.character.steps,
           "stages_gb": {k: v for k, v in pick["stages"].items() if k.startswith("character")}}
    if flops:  # the training step as the plan runs it (memory=auto may turn gradient checkpointing off)
        job.trainer.gradient_checkpointing = pick["chosen"].get("trainer.gradient_checkpointing",
                                                                job.trainer.gradient_checkpointing)
        counted = character_round_flops(job)
        minutes = {card: counted["round_tflop"] / (rate * UTILIZATION) / 60 for card, rate in CARDS_24GB.items()}
        out.update(counted, utilization=UTILIZATION, minutes_per_round=minutes)
    return out
