"""Samplers for story generation, each built from the model's own scheduler config.

Kolors ships an ``EulerDiscreteScheduler`` (1100 train timesteps, scaled_linear betas
0.00085..0.014, "leading" spacing). Every other sampler here is built with
``<Class>.from_config(that config, **preset)`` so it keeps the model's noise schedule and only
changes how the steps are taken.
"""

from __future__ import annotations

from typing import Any

from kolors_story.errors import SettingsError

# name -> (diffusers class name, preset options on top of the model's scheduler config)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpmpp_2m_sde_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def scheduler_names() -> list[str]:
    return sorted(SCHEDULERS)


def check_scheduler_name(name: str) -> str:
    key = str(name).lower()
    if key not in SCHEDULERS:
        raise SettingsError(f"sampler.scheduler={name!r} is not a known sampler; use one of {', '.join(scheduler_names())}")
    return key


def build_scheduler(name: str, base_config, **overrides):
    """A scheduler of kind ``name`` on the noise schedule of ``base_config`` (a scheduler config).

    ``overrides`` (``sampler.scheduler_kwargs``) win over both the model config and the preset,
    e.g. ``timestep_spacing: trailing``.
    """
    import diffusers

    class_name, preset = SCHEDULERS[check_scheduler_name(name)]
    cls = getattr(diffusers, class_name)
    config = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
    # Keys the class does not know (Euler-only options) are ignored by from_config.
    return cls.from_config({**config, **preset, **dict(overrides or {})})


def describe(scheduler) -> dict:
    """What to record in a manifest: the class and its full config."""
    return {"class": type(scheduler).__name__, "config": {k: _plain(v) for k, v in dict(scheduler.config).items()}}


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value
