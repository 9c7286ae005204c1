"""Section ``plan``: the memory plan at real Kolors size (1024², fp16) for the default configs on
the GPUs users have: predicted peak per stage and what ``memory=auto`` picks, for training,
generation, the hires refine and scoring; and what each adapter type (``lora.type``, LoCon) costs
to train on a 24 GB card (trainable parameters, train-step peak). Counted on the meta device, no
weights needed."""

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
QUICK_ADAPTERS = ("lora", "dora")


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
    return out
