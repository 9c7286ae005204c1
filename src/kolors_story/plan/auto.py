"""``memory=auto``: the fastest settings whose every stage fits the GPU, chosen before anything loads.

The budget is ``memory.budget_gb`` or the GPU's own memory, less a reserve (the CUDA context and
what the allocator keeps: 1 GB or 10 %, the larger). Candidates are tried fastest first: everything
resident at the configured batch; then the text encoder released after the prompts (free); VAE
slicing and tiling (cheap); the prompt projections computed every step again (a few % of the UNet's
work); smaller scene batches; model offload; sequential offload (slow, least
memory). With ``memory.allow_quantized_text_encoder`` the text encoder in int8, then nf4, is tried
before each offload mode (sequential offload never quantizes). Training tries gradient checkpointing
off first (faster), then on, with the largest cache and validation batches that fit (and, when
allowed, a quantized encoder for the prompt cache). A setting the user gave explicitly is never
changed; if nothing fits, the plan says which stage needs how much, and what to change.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field

from kolors_story.models.quantization import available_schemes
from kolors_story.plan.stages import (
    GB,
    Sizes,
    Stage,
    evaluate_stages,
    generate_stages,
    train_stages,
)
from kolors_story.records import PlanRecord, StagePlan

RESERVE_GB = 1.0
RESERVE_SHARE = 0.10

# What to change when a stage cannot fit even at the most frugal settings.
ADVICE = {
    "encode prompts": "use a GPU with more memory (ChatGLM3 encodes the 8 prompts at once), or allow a quantized "
                      "ChatGLM3 (memory.allow_quantized_text_encoder=true)",
    "denoise": "lower sampler.height/width",
    "decode": "lower sampler.height/width",
    "hires": "lower sampler.hires.scale or turn hires off",
    "score": "lower scorer.batch_size or set scorer.device=cpu",
    "train step": "lower trainer.batch_size or dataset.resolution",
    "cache: prompt": "lower cache.batch_size, or allow a quantized ChatGLM3 for the prompt cache "
                     "(memory.allow_quantized_text_encoder=true)",
    "cache": "lower cache.batch_size or dataset.resolution",
    "validation": "lower sampler.height/width of the validation renders, or validate=false",
    "character": "lower sampler.batch_size or sampler.height/width (the candidate renders), character.batch_size, "
                 "or character=none",
}

# The stages whose weights are ChatGLM3: when those alone are more than the usable memory, only a
# quantized encoder (or a larger GPU) helps, not a smaller batch.
TEXT_ENCODER_STAGES = ("encode prompts", "cache: prompt", "character: prompt")


def _gb(n: int | None) -> float | None:
    return None if n is None else round(n / GB, 3)


@dataclass
class Plan:
    job: str  # train | generate | evaluate
    device: str
    budget: int | None  # bytes; None: no GPU to plan for
    stages: list[Stage]
    auto: bool
    chosen: dict = field(default_factory=dict)  # settings memory=auto set ("sampler.batch_size": 4, ...)
    notes: list[str] = field(default_factory=list)

    @property
    def usable(self) -> int | None:
        return None if self.budget is None else int(self.budget - max(RESERVE_GB * GB, RESERVE_SHARE * self.budget))

    @property
    def fits(self) -> bool:
        return self.usable is None or all(st.peak <= self.usable for st in self.stages)

    @property
    def worst(self) -> Stage:
        return max(self.stages, key=lambda st: st.peak)

    def advice(self) -> str:
        worst = self.worst
        if self.usable is not None and worst.weights > self.usable:  # no batch or size setting helps then
            lighter = ("allow a quantized ChatGLM3 (memory.allow_quantized_text_encoder=true), or use a GPU with "
                       "more memory" if worst.name.startswith(TEXT_ENCODER_STAGES) else "use a GPU with more memory")
            return f"its weights alone are more than the usable memory: {lighter}"
        return next((text for prefix, text in ADVICE.items() if worst.name.startswith(prefix)),
                    "use a GPU with more memory")

    def record(self) -> PlanRecord:
        """``plan.json``: the plan in GB."""
        return PlanRecord(job=self.job, device=self.device, budget_gb=_gb(self.budget), usable_gb=_gb(self.usable),
                          fits=self.fits, auto=self.auto, chosen=self.chosen, notes=self.notes,
                          stages=[StagePlan(name=st.name, peak_gb=_gb(st.peak), weights_gb=_gb(st.weights),
                                            work_gb=_gb(st.work), **st.settings) for st in self.stages])


def budget_bytes(budget_gb: float | None, device: str) -> int | None:
    """The GPU memory to plan for: ``memory.budget_gb``, else the device's own (None on a CPU)."""
    if budget_gb:
        return int(float(budget_gb) * GB)
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            index = int(str(device).split(":")[1]) if ":" in str(device) else torch.cuda.current_device()
            return int(torch.cuda.get_device_properties(index).total_memory)
    return None


def is_fixed(key: str, fixed: set[str]) -> bool:
    """Whether the user set ``key`` (``sampler.batch_size``) or chose its group (``sampler=hires``)."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in fixed for i in range(1, len(parts) + 1))


def with_settings(job, values: dict):
    """A copy of ``job`` with dotted keys set."""
    job = copy.deepcopy(job)
    for dotted, value in values.items():
        *path, last = dotted.split(".")
        node = job
        for part in path:
            node = getattr(node, part)
        setattr(node, last, value)
    return job


def _get(job, dotted: str):
    node = job
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _halvings(n: int) -> list[int]:
    out = []
    while n >= 1:
        out.append(n)
        n //= 2
    return out or [1]


def text_encoder_schemes(job) -> tuple[str, ...]:
    """ChatGLM3's weights auto may use: as configured, and int8/nf4 only when the user allows it
    (their quality on the real weights is unmeasured) and the scheme can run here."""
    allowed = available_schemes(job.model.device) if job.memory.allow_quantized_text_encoder else ()
    return tuple(dict.fromkeys(("none", *allowed, job.model.text_encoder_quant)))


def generate_candidates(job) -> Iterator[dict]:
    schemes = text_encoder_schemes(job)
    for offload, quant in [(o, q) for o in ("none", "model") for q in schemes] + [("sequential", "none")]:
        for b in _halvings(job.sampler.batch_size):
            for keep in (True, False):  # off: a few % more UNet work, less than a halved batch costs
                for release, slicing, tiling in ((False, False, False), (True, False, False), (False, True, False),
                                                 (True, True, False), (False, True, True), (True, True, True)):
                    yield {"sampler.batch_size": b, "memory.offload": offload, "memory.release_text_encoder": release,
                           "memory.vae_slicing": slicing, "memory.vae_tiling": tiling,
                           "memory.keep_prompt_projections": keep, "model.text_encoder_quant": quant}


def train_candidates(job) -> Iterator[dict]:
    for quant in text_encoder_schemes(job):  # only the prompt cache's stage depends on it
        for ckpt in (False, True):
            for cache_b in _halvings(job.cache.batch_size):
                for val_b in _halvings(job.sampler.batch_size):
                    for slicing in (False, True):
                        yield {"trainer.gradient_checkpointing": ckpt, "cache.batch_size": cache_b,
                               "sampler.batch_size": val_b, "memory.vae_slicing": slicing,
                               "model.text_encoder_quant": quant}


# Scenes denoised together where no plan applies (a CPU): near 8's speed with half its activations
# (measured by the bench's peers section: docs/generating.md). The images are the same at any batch.
CPU_SCENE_BATCH = 4


def cpu_generation_defaults(job, fixed: set[str] = frozenset()):
    """Generation where no plan applies (on a CPU): the text encoder released once the prompts are
    encoded (``generate`` then encodes before it loads the UNet), the VAE decoding one image at a
    time, and ``CPU_SCENE_BATCH`` scenes per batch; each only where the command line left it open.
    Together they keep the run's peak memory below the seeds' one-call-per-scene loop, with the same
    images (within one 8-bit level)."""
    values = {"memory.release_text_encoder": True, "memory.vae_slicing": True,
              "sampler.batch_size": min(CPU_SCENE_BATCH, int(job.sampler.batch_size))}
    return with_settings(job, {k: v for k, v in values.items() if not is_fixed(k, fixed)})


STAGES = {"generate": generate_stages, "train": train_stages, "evaluate": evaluate_stages}
CANDIDATES = {"generate": generate_candidates, "train": train_candidates}


def make_plan(kind: str, job, sizes: Sizes, fixed: set[str] = frozenset(), **extra) -> tuple[object, Plan]:
    """The plan of ``job`` (``kind``: generate, train, evaluate) and the job to run: with
    ``memory.auto`` the first (fastest) candidate whose every stage fits, explicit settings kept."""
    device = str(job.model.device)
    budget = budget_bytes(job.memory.budget_gb, device)
    as_is = Plan(kind, device, budget, STAGES[kind](sizes, job, **extra), auto=bool(job.memory.auto))
    if not job.memory.auto or budget is None or kind not in CANDIDATES:
        if budget is None:
            as_is.notes.append("no GPU to plan for (set memory.budget_gb to plan for one)")
        return job, as_is
    frugal = None
    for values in CANDIDATES[kind](job):
        if any(is_fixed(k, fixed) and v != _get(job, k) for k, v in values.items()):
            continue  # the user chose this setting: auto never overrides it
        trial = with_settings(job, values)
        plan = Plan(kind, device, budget, STAGES[kind](sizes, trial, **extra), auto=True)
        changed = {k: v for k, v in values.items() if v != _get(job, k)}
        plan.chosen = changed
        if plan.fits:
            return trial, plan
        if frugal is None or plan.worst.peak < frugal[1].worst.peak:
            frugal = (trial, plan)
    trial, plan = frugal if frugal is not None else (job, as_is)
    plan.notes.append("no candidate fits: the most frugal one is shown")
    return trial, plan
