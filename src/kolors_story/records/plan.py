"""``plan.json``: the memory plan of a run, written before anything loads (``plan.report.write_plan``):
the budget, whether every stage fits, what ``memory=auto`` chose, and each stage's predicted peak."""

from __future__ import annotations

from kolors_story.records.base import Record

PLAN_FILE = "plan.json"


class StagePlan(Record):
    """One stage's predicted device memory; the settings that shape it ride along as extra keys
    (``batch_size``, ``vae_slicing``, ``offload``, ...)."""

    name: str
    peak_gb: float | None = None
    weights_gb: float | None = None
    work_gb: float | None = None

    @property
    def settings(self) -> dict:
        return dict(self.model_extra or {})


class PlanRecord(Record):
    job: str  # train | generate | evaluate
    device: str
    budget_gb: float | None = None  # None: no GPU to plan for
    usable_gb: float | None = None
    fits: bool
    auto: bool = False
    chosen: dict = {}  # settings memory=auto set ("sampler.batch_size": 4, ...)
    notes: list[str] = []
    stages: list[StagePlan] = []


__all__ = ["PLAN_FILE", "PlanRecord", "StagePlan"]
