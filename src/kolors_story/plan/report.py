"""The plan as the user reads it: a short table before the work starts, ``plan.json`` in the run
folder, and the one-line reason when nothing fits."""

from __future__ import annotations

import sys
from pathlib import Path

from kolors_story.plan.auto import Plan
from kolors_story.plan.stages import GB
from kolors_story.records import PLAN_FILE


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / GB:.1f} GB"


def print_plan(plan: Plan) -> None:
    from rich.console import Console
    from rich.table import Table

    budget = "no GPU budget" if plan.budget is None else f"{_gb(plan.budget)} ({_gb(plan.usable)} usable)"
    table = Table(title=f"Memory plan ({plan.job}, {plan.device}, {budget})")
    for col, justify in (("stage", "left"), ("peak", "right"), ("weights", "right"), ("work", "right"),
                         ("settings", "left")):
        table.add_column(col, justify=justify)
    for st in plan.stages:
        over = plan.usable is not None and st.peak > plan.usable
        table.add_row(st.name, f"[red]{_gb(st.peak)}[/]" if over else _gb(st.peak), _gb(st.weights), _gb(st.work),
                      ", ".join(f"{k}={v}" for k, v in st.settings.items()))
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(table)
    if plan.chosen:
        console.print("memory=auto chose: " + ", ".join(f"{k}={v}" for k, v in plan.chosen.items()))
    for note in plan.notes:
        console.print(f"note: {note}")


def write_plan(plan: Plan, folder: str | Path) -> Path:
    return plan.record().write(Path(folder) / PLAN_FILE)


def _sentence(text: str) -> str:
    """``text`` with a capital first letter (``str.capitalize`` would lower ``ChatGLM3``)."""
    return text[:1].upper() + text[1:]


def no_fit_message(plan: Plan) -> str:
    st = plan.worst
    tried = "even at the most frugal settings memory=auto can pick" if plan.auto else "with these settings"
    return (f"the run does not fit the GPU: stage '{st.name}' needs {_gb(st.peak)} ({_gb(st.weights)} weights + "
            f"{_gb(st.work)} work) {tried}, and {_gb(plan.usable)} of {_gb(plan.budget)} is usable. "
            f"{_sentence(plan.advice())}" + ("" if plan.auto else ", or let memory.auto=true choose the settings")
            + ". (Nothing was loaded; memory.budget_gb=<GB> plans for another GPU.)")
