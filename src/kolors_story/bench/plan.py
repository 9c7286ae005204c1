"""Section ``plan``: the memory plan at real Kolors size (1024², fp16) for the default configs on
the GPUs users have: predicted peak per stage and what ``memory=auto`` picks, for training,
generation, the hires refine and scoring. Counted on the meta device, no weights needed."""

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


def section_plan(ctx: BenchContext) -> dict:
    gpus = QUICK_GPUS if ctx.quick else GPUS
    out: dict = {"resolution": 1024, "dtype": "float16", "gpus": gpus, "runs": {}}
    for run, (kind, overrides) in RUNS.items():
        ctx.log(f"plan: {run} on {', '.join(gpus)} ...")
        out["runs"][run] = {gpu: plan_one(kind, overrides, gb) for gpu, gb in gpus.items()}
    return out
