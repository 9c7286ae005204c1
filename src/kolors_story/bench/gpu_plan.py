"""What the GPU check measures and what the memory plan predicts for it: each measurement (a
*group*: one job's settings, one plan) and the rows it yields, each row tied to one stage of that
plan. The prediction is ``plan.auto.make_plan`` on the same settings and on the same architecture
dicts the check builds its models from, so predicted and measured are the same stage by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kolors_story.bench.gpu_build import Scale
from kolors_story.bench.timing import compose_settings

STORY = "*"  # a row compared with the largest stage of its plan (a whole story render)


@dataclass(frozen=True)
class Row:
    stage: str  # the table's first column
    plan_stage: str  # the plan's stage it is compared with (STORY: the largest)
    phase: str  # the measured phase that gives it (the meter's name for it)


@dataclass(frozen=True)
class Group:
    """One measurement: a job's settings and the rows it yields. ``choices`` are config-group
    selections (composed by Hydra on top of the scale's settings); ``values`` are typed keys set on
    the composed job, as memory=auto sets its candidates (``plan.auto.with_settings``)."""

    name: str
    kind: str  # train | generate | evaluate
    rows: tuple[Row, ...]
    choices: tuple[str, ...] = ()
    values: tuple[tuple[str, object], ...] = ()
    quick: bool = False  # part of --quick
    budget_gb: float | None = None  # enforced on the card while it runs


def _story_rows(label: str) -> tuple[Row, ...]:
    return (Row(f"{label}: encode prompts", "encode prompts", "encode prompts"),
            Row(f"{label}: denoise", "denoise", "denoise"),
            Row(f"{label}: decode", "decode", "decode"),
            Row(f"{label}: story, batched renderer", STORY, "story"))


TRAIN = (("memory.auto", False),)  # the settings as given: the rows compare one setting each
CKPT_ON, CKPT_OFF = ("trainer.gradient_checkpointing", True), ("trainer.gradient_checkpointing", False)
QUANT_SCHEMES = ("int8", "nf4")  # model.text_encoder_quant besides none (models.quantization)


def _quant_group(scheme: str) -> Group:
    """The cache's prompt embeddings with ChatGLM3 quantized (``model.text_encoder_quant``)."""
    return Group(f"text encoder {scheme}", "train", (Row(f"cache: prompt embeddings, {scheme} text encoder",
                                                         "cache: prompt embeddings", "cache: prompt embeddings"),),
                 values=(*TRAIN, ("model.text_encoder_quant", scheme)))


def _budget(gb: float) -> tuple[tuple[str, object], ...]:
    return (("memory.budget_gb", float(gb)),)


GROUPS = (
    Group("cache", "train", (Row("cache: VAE latents", "cache: VAE latents", "cache: VAE latents"),
                             Row("cache: prompt embeddings", "cache: prompt embeddings", "cache: prompt embeddings")),
          values=TRAIN),
    *(_quant_group(scheme) for scheme in QUANT_SCHEMES),
    Group("generate 24 GB", "generate", _story_rows("generate 24 GB"), values=_budget(24), quick=True, budget_gb=24),
    Group("per-scene 24 GB", "generate", (Row("generate 24 GB: story, per-scene KolorsPipeline calls", STORY, "story"),),
          values=_budget(24), budget_gb=24),
    Group("generate 16 GB", "generate", _story_rows("generate 16 GB"), values=_budget(16), budget_gb=16),
    Group("train", "train", (Row("train step: LoRA r16, checkpointing on", "train step", "step"),),
          values=(*TRAIN, CKPT_ON), quick=True),
    Group("train no ckpt", "train", (Row("train step: LoRA r16, checkpointing off", "train step", "step"),),
          values=(*TRAIN, CKPT_OFF)),
    Group("reward", "train", (Row("reward step: ReFL", "reward step", "step"),), choices=("reward=aesthetic",),
          values=(*TRAIN, CKPT_ON)),
    Group("dora", "train", (Row("train step: DoRA r16, checkpointing on", "train step", "step"),),
          values=(*TRAIN, CKPT_ON, ("lora.type", "dora"))),
    Group("score", "evaluate", (Row("score: 8 images, batched", "score", "score"),), values=(("scorer.batch_size", 8),)),
    Group("score one by one", "evaluate", (Row("score: 8 images, one per call", "score", "score"),),
          values=(("scorer.batch_size", 1),)),
)


def has_quantization() -> bool:
    """Whether this version has ``model.text_encoder_quant`` (the quantized text encoder's rows)."""
    from dataclasses import fields

    from kolors_story.config import ModelSettings

    return "text_encoder_quant" in {f.name for f in fields(ModelSettings)}


def groups(quick: bool) -> tuple[Group, ...]:
    quant = has_quantization()
    return tuple(g for g in GROUPS if (g.quick or not quick) and (quant or not g.name.startswith("text encoder")))


def scale_overrides(scale: Scale, device: str, kind: str) -> list[str]:
    """The settings every job of the check shares (those of ``kind``'s config): the scale's size,
    dtype and run lengths."""
    res = scale.resolution
    out = ["model=kolors", f"model.dtype={scale.dtype}", f"model.device={device}", f"scorer.device={device}"]
    if kind in ("train", "generate"):
        out += [f"sampler.height={res}", f"sampler.width={res}", f"sampler.steps={scale.steps}", "sampler.cfg=4"]
    if kind == "train":
        out += [f"dataset.resolution={res}", f"trainer.precision={scale.precision}",
                f"reward.resolution={scale.reward_resolution}", f"reward.steps={scale.reward_steps}"]
        if scale.reward_steps < 20:  # ReFL's gradient step among the last ones, as the default [14, 19] of 20
            out.append(f"reward.refl_steps=[{scale.reward_steps // 2},{scale.reward_steps - 1}]")
    return out


@dataclass
class Prediction:
    """A group's settings as it runs (``job``, after memory=auto) and its plan."""

    group: Group
    job: object
    plan: object
    chosen: dict = field(default_factory=dict)

    def stage(self, row: Row):
        stages = self.plan.stages
        if row.plan_stage == STORY:
            return max((st for st in stages if st.name in ("encode prompts", "denoise", "decode")),
                       key=lambda st: st.peak)
        return next(st for st in stages if st.name == row.plan_stage)


def _per_scene_values(chosen: dict) -> dict:
    """The 24 GB choice, one scene per pipeline call, the text encoder kept (each call encodes), the
    prompt's projections computed at every step (diffusers' loop)."""
    drop = ("sampler.batch_size", "memory.release_text_encoder", "memory.keep_prompt_projections")
    keep = {k: v for k, v in chosen.items() if k not in drop}
    return {"memory.auto": False, "sampler.batch_size": 1, "memory.release_text_encoder": False,
            "memory.keep_prompt_projections": False, **keep}


def predict(scale: Scale, device: str, selected: tuple[Group, ...]) -> dict[str, Prediction]:
    """Each group's job and plan, counted on the meta device (nothing is allocated). Hydra composes
    once per job kind and group selection; each group's values are set on a copy."""
    from kolors_story.plan.auto import make_plan, with_settings

    sizes = scale.sizes()
    composed: dict[tuple, object] = {}
    out: dict[str, Prediction] = {}
    for group in selected:
        key = (group.kind, group.choices)
        if key not in composed:
            composed[key] = compose_settings(group.kind, [*scale_overrides(scale, device, group.kind), *group.choices])
        values = dict(group.values)
        if group.name == "per-scene 24 GB":
            at_24 = out.get("generate 24 GB")
            chosen = at_24.chosen if at_24 else make_plan("generate", with_settings(composed[key], values), sizes)[1].chosen
            values.update(_per_scene_values(chosen))
        job, plan = make_plan(group.kind, with_settings(composed[key], values), sizes)
        out[group.name] = Prediction(group, job, plan, dict(plan.chosen))
    return out


def settings_text(p: Prediction, row: Row, scale: Scale) -> str:
    """The table's settings column: what shapes this row (memory=auto's choice where it chose)."""
    job, g = p.job, p.group
    if g.kind == "generate":
        chosen = ", ".join(_choice_text(k, v) for k, v in p.chosen.items()) or "nothing to change"
        if g.name.startswith("per-scene"):
            return f"batch 1, {_steps(job.sampler.steps)}, cfg {job.sampler.cfg:g}; {_memory_text(job)}"
        return (f"auto: {chosen}; batch {job.sampler.batch_size}, {_steps(job.sampler.steps)}, "
                f"cfg {job.sampler.cfg:g}")
    if g.kind == "evaluate":
        return f"scorer.batch_size={job.scorer.batch_size}, fp32"
    t = job.trainer
    if g.name == "cache" and row.phase == "cache: VAE latents":
        return f"{scale.cache_images} images {scale.resolution}², cache.batch_size={job.cache.batch_size}"
    if g.name == "cache" or g.name.startswith("text encoder"):
        from kolors_story.models.quantization import LIBRARY

        quant = getattr(job.model, "text_encoder_quant", "none")
        weights = f"ChatGLM3 {quant} ({LIBRARY[quant]})" if quant != "none" else f"ChatGLM3 {job.model.dtype}"
        return f"{scale.cache_images} captions + the story's scenes, cache.batch_size={job.cache.batch_size}, {weights}"
    what = (f"ReFL at {job.reward.resolution}², {job.reward.steps} steps, cfg {job.reward.guidance:g} + the "
            "diffusion loss" if g.name == "reward" else f"batch {t.batch_size}")
    ckpt = "on" if t.gradient_checkpointing else "off"
    steps = "1 step" if g.name in ("reward", "dora") else f"median of {scale.measured} after {scale.warmup}"
    return f"{job.lora.type} r{job.lora.rank}, {what}, ckpt {ckpt}, {t.precision}; {steps}"


def _steps(n: int) -> str:
    return f"{n} step" + "s" * (n != 1)


def _choice_text(key: str, value) -> str:
    """One of memory=auto's choices in words (``memory.offload=model`` -> ``model offload``)."""
    name = key.split(".")[-1]
    if name == "offload":
        return f"{value} offload"
    if name == "batch_size":
        return f"batch {value}"
    words = name.replace("_", " ").replace("vae", "VAE")
    return words if value is True else f"no {words}" if value is False else f"{words} {value}"


def _memory_text(job) -> str:
    m = job.memory
    on = [_choice_text(k, True) for k in ("release_text_encoder", "vae_slicing", "vae_tiling") if getattr(m, k)]
    return ", ".join([f"{m.offload} offload"] * (m.offload != "none") + on) or "everything resident"
