"""``python -m kolors_story.bench --only gpu``: the memory plan measured on a GPU. Every GPU number
of this project is counted on the meta device; this check builds Kolors at full size on the card
with random weights (no download), runs the project's own training, generation, cache and scoring
code, and compares each stage's measured peak with the plan's prediction for the same settings.

- ``--device cuda`` (the default where CUDA is): real sizes, fp16, 1024². ``--device cpu``: the
  same code on the bench-size models, peaks counted by ``PeakTensorMemory`` (the test suite runs it).
- ``--quick``: the training step (checkpointing on) and the story at 24 GB only.
- ``--plan-only``: the stages with their predicted peaks and the run's estimated time; nothing is
  allocated (meta device), no GPU needed.

It writes ``gpu.json``, prints one table (stage, settings, predicted GB, measured GB, measured /
predicted, time) and exits 1 when a stage's measured peak exceeds its prediction by more than 10 %
(a plan that under-counts is an out-of-memory on a user's card) or a stage failed.
"""

from __future__ import annotations

import datetime
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kolors_story.bench.gpu_build import Check, Meter, Scale, Workbench, bench_scale, free_device_cache, real_scale
from kolors_story.bench.gpu_plan import Prediction, groups, has_quantization, predict, settings_text
from kolors_story.files import atomic_write_json
from kolors_story.plan.stages import GB

GPU_FORMAT = 1
TOLERANCE = 0.10  # measured may exceed predicted by this share before the check fails
COLUMNS = ("stage", "settings", "predicted GB", "measured GB", "measured / predicted", "time")


def over_prediction(rows: list[dict], tolerance: float = TOLERANCE) -> list[str]:
    """The stages whose measured peak exceeds the predicted one by more than ``tolerance``."""
    return [r["stage"] for r in rows
            if r.get("measured_gb") is not None and r["measured_gb"] > r["predicted_gb"] * (1 + tolerance)]


def exit_code(result: dict) -> int:
    """1 when a stage is over its prediction or failed to run, else 0."""
    return 1 if result["over"] or result["failed"] else 0


def card_skips(predictions: dict[str, Prediction], total: int | None) -> dict[str, str]:
    """Groups that cannot run on a card of ``total`` bytes (its budget or its predicted peak does not fit)."""
    from kolors_story.plan.auto import RESERVE_GB, RESERVE_SHARE

    if total is None:
        return {}
    usable = total - max(RESERVE_GB * GB, RESERVE_SHARE * total)
    skips = {}
    for name, p in predictions.items():
        need = max(p.stage(row).peak for row in p.group.rows)
        if p.group.budget_gb and p.group.budget_gb * GB > total:
            skips[name] = f"skipped: its {p.group.budget_gb:g} GB budget is more than this card's {total / GB:.0f} GB"
        elif need > usable:
            skips[name] = f"skipped: needs {need / GB:.1f} GB, this card has {usable / GB:.1f} GB usable"
    return skips


def quant_skips(predictions: dict[str, Prediction], device: torch.device) -> dict[str, str]:
    """Quantized text encoders that cannot run here (bitsandbytes' nf4 needs CUDA and the [gpu] extra)."""
    from kolors_story.models.quantization import LIBRARY, available_schemes

    skips = {}
    for name, p in predictions.items():
        quant = getattr(p.job.model, "text_encoder_quant", "none")
        if name.startswith("text encoder") and quant not in available_schemes(str(device)):
            gpu_only = " and a CUDA GPU" if quant == "nf4" else ""
            skips[name] = f"skipped: model.text_encoder_quant={quant} needs {LIBRARY[quant]}{gpu_only} here"
    return skips


def _measure(name: str) -> Callable:
    from kolors_story.bench import gpu_stages as s
    from kolors_story.bench import gpu_training as t

    story = lambda c, p: s.measure_story(c, p.job, p.group.budget_gb)  # noqa: E731
    return {"cache": lambda c, p: s.measure_cache(c, p.job), "generate 24 GB": story, "generate 16 GB": story,
            "per-scene 24 GB": lambda c, p: s.measure_per_scene(c, p.job, p.group.budget_gb),
            "train": lambda c, p: t.measure_train(c, p.job), "train no ckpt": lambda c, p: t.measure_train(c, p.job),
            "reward": lambda c, p: t.measure_reward(c, p.job), "dora": lambda c, p: t.measure_dora(c, p.job),
            "text encoder int8": lambda c, p: s.measure_quantized_text(c, p.job),
            "text encoder nf4": lambda c, p: s.measure_quantized_text(c, p.job),
            "score": lambda c, p: s.measure_score(c, p.job),
            "score one by one": lambda c, p: s.measure_score(c, p.job)}[name]


def _rows(predictions: dict[str, Prediction], scale: Scale, measured: dict, notes: dict[str, str],
          estimated: dict | None = None) -> list[dict]:
    rows = []
    for name, p in predictions.items():
        for row in p.group.rows:
            st = p.stage(row)
            out = {"stage": row.stage, "group": name, "plan_stage": st.name, "settings": settings_text(p, row, scale),
                   "predicted_gb": st.peak / GB, "predicted_weights_gb": st.weights / GB,
                   "predicted_work_gb": st.work / GB, "measured_gb": None, "reserved_gb": None, "ratio": None,
                   "seconds": None, "note": notes.get(name)}
            r = measured.get(name, {}).get(row.phase)
            if r is not None:
                out.update(measured_gb=r.peak / GB, reserved_gb=None if r.reserved is None else r.reserved / GB,
                           resident_gb=r.resident / GB, ratio=r.peak / st.peak, seconds=r.time,
                           step_seconds=r.step_seconds or None)
            if estimated is not None:
                out["estimated_seconds"] = estimated.get(row.stage)
            rows.append(out)
    return rows


def _not_measured() -> str | None:
    if has_quantization():
        return None
    return "this version has no model.text_encoder_quant: the quantized text encoder's rows are left out"


def _machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, total_gb=props.total_memory / GB, cuda=torch.version.cuda)
    else:
        info.update(gpu=None, cpu=platform.processor() or platform.machine())
    return info


def run_check(device: torch.device, quick: bool = False, log: Callable[[str], None] = print,
              only_groups: tuple[str, ...] | None = None) -> dict:
    """Measure each stage on ``device`` (real sizes on CUDA, bench sizes on the CPU) against its plan."""
    t0 = time.perf_counter()
    scale = real_scale() if device.type == "cuda" else bench_scale()
    selected = tuple(g for g in groups(quick) if only_groups is None or g.name in only_groups)
    log(f"gpu: the memory plan of {len(selected)} measurements ({scale.name} size, meta device) ...")
    predictions = predict(scale, str(device), selected)
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    notes = {**quant_skips(predictions, device), **card_skips(predictions, total)}
    skipped = dict(notes)
    wb = Workbench(scale, device)
    failed = []
    with tempfile.TemporaryDirectory(prefix="kolors-gpu-check-") as tmp:
        c = Check(wb, Meter(device, wb.resident_bytes), scale, Path(tmp), log)
        measured = {}
        for name, p in predictions.items():
            if name in notes:
                log(f"gpu: {name}: {notes[name]}")
                continue
            log(f"gpu: {name} ...")
            c.current = name
            try:
                measured[name] = _measure(name)(c, p)
            except Exception as exc:  # noqa: BLE001 - one failed measurement must not hide the others
                notes[name] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
                failed.append(name)
                log(f"gpu: {name}: {notes[name]}")
                free_device_cache(device)
        for name, problem in c.problems.items():
            notes[name], failed = problem, [*failed, name]
    rows = _rows(predictions, scale, measured, notes)
    return {"format": GPU_FORMAT, "mode": device.type, "scale": scale.name, "quick": quick, "plan_only": False,
            "machine": _machine(device), "tolerance": TOLERANCE, "rows": rows, "over": over_prediction(rows),
            "failed": sorted(set(failed)), "skipped": skipped, "not_measured": _not_measured(),
            "seconds": time.perf_counter() - t0}


def plan_only(device: torch.device, quick: bool = False, log: Callable[[str], None] = print) -> dict:
    """Every stage the run on ``device`` would measure, with its predicted peak and the run's estimated
    time, counted on the meta device (real sizes unless ``device`` is the CPU)."""
    from kolors_story.bench.gpu_estimate import count_flops, estimate, row_seconds

    t0 = time.perf_counter()
    scale = bench_scale() if device.type == "cpu" else real_scale()
    log(f"gpu --plan-only: the memory plan ({scale.name} size, meta device) ...")
    predictions = predict(scale, str(device), groups(False))  # all of them: the estimate covers both runs
    log("gpu --plan-only: FLOPs of each stage (meta device) ...")
    flops = count_flops(scale)
    listed = {g.name for g in groups(quick)}
    est = estimate(predictions, scale, flops, {g.name for g in groups(True)})
    rows = _rows({n: p for n, p in predictions.items() if n in listed}, scale, {}, {},
                 row_seconds(predictions, scale, flops))
    return {"format": GPU_FORMAT, "mode": device.type, "scale": scale.name, "quick": quick, "plan_only": True,
            "tolerance": TOLERANCE, "rows": rows, "over": [], "failed": [], "estimate": est, "flops": flops,
            "not_measured": _not_measured(), "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------ output


def _gb(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" if x >= 1 else f"{x:.3f}"  # the bench-size models' stages are tens of MB


def _seconds(x: float | None, estimated: bool = False) -> str:
    if x is None:
        return "-"
    text = f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"
    return f"~{text} (est.)" if estimated else text


def render_table(result: dict):
    """One table, the same columns in every mode (GPU, CPU, plan only)."""
    from rich.table import Table

    what = "plan only" if result.get("plan_only") else f"measured on {result['mode']}"
    table = Table(title=f"kolors-story GPU check ({what}, {result['scale']} size{', quick' if result['quick'] else ''})")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("stage", "settings") else "right")
    over = set(result["over"])
    for r in result["rows"]:
        measured = _gb(r["measured_gb"]) if r["measured_gb"] is not None else (r["note"] or "-")
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        if r["stage"] in over:
            ratio = f"[red]{ratio}[/red]"
        time_text = _seconds(r.get("estimated_seconds"), True) if result.get("plan_only") else _seconds(r["seconds"])
        table.add_row(r["stage"], r["settings"], _gb(r["predicted_gb"]), measured, ratio, time_text)
    return table


def summary_lines(result: dict) -> list[str]:
    """What the table does not say: the verdict, what failed, the time estimate (plan only)."""
    lines = []
    est = result.get("estimate")
    if est:
        lines.append(f"estimated on one H100/H200-class card ({est['tflops']:.0f} TFLOP/s dense fp16 at "
                     f"{100 * est['utilization']:.0f} %, host copies at {est['host_gb_per_s']:.0f} GB/s, "
                     f"{est['start_s']:.0f} s start-up, model builds, {est['group_s']:.0f} s per measurement): "
                     f"full run {est['full_s'] / 60:.1f} min (designed for <= {est['limits_s']['full'] / 60:.0f}), "
                     f"--quick {est['quick_s'] / 60:.1f} min (<= {est['limits_s']['quick'] / 60:.0f}); at 15 % "
                     f"of the rate: {est['full_s_at_15pct'] / 60:.1f} / {est['quick_s_at_15pct'] / 60:.1f} min")
    if result.get("not_measured"):
        lines.append(f"note: {result['not_measured']}")
    if result.get("plan_only"):
        return lines + ["plan only: nothing was allocated (meta device)"]
    for stage in result["over"]:
        row = next(r for r in result["rows"] if r["stage"] == stage)
        lines.append(f"OVER: '{stage}' measured {row['measured_gb']:.2f} GB against {row['predicted_gb']:.2f} GB "
                     f"predicted ({row['ratio']:.2f}x, more than {100 * result['tolerance']:.0f} % over)")
    for group in result["failed"]:
        note = next((r["note"] for r in result["rows"] if r["group"] == group), "")
        lines.append(f"FAILED: {group}: {note}")
    for group, reason in (result.get("skipped") or {}).items():
        lines.append(f"{group}: {reason}")
    tol = 1 + result["tolerance"]
    reserved = [f"{r['stage']} ({r['reserved_gb'] / r['predicted_gb']:.2f}x)" for r in result["rows"]
                if r.get("reserved_gb") and r["reserved_gb"] > r["predicted_gb"] * tol]
    if reserved:  # what nvidia-smi sees; the plan's work factor is meant to cover the allocator's share
        lines.append("note: the allocator reserved more than the prediction + "
                     f"{100 * result['tolerance']:.0f} % for: {', '.join(reserved)}")
    if not result["over"] and not result["failed"]:
        lines.append(f"every measured stage is within {100 * result['tolerance']:.0f} % of its prediction or under it")
    return lines


def main(device: str | None, quick: bool, plan: bool, out: str | Path, console) -> int:
    """The ``--only gpu`` command: 0 when every stage is within its prediction, 1 when one is over or
    failed, 2 when there is no CUDA device and ``--device cpu`` / ``--plan-only`` was not asked for."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() or plan else None
    if device is None:
        console.print("[red]gpu check: no CUDA device here.[/red] Run the CPU mode with --device cpu, or list "
                      "what a GPU run measures with --plan-only.")
        return 2
    dev = torch.device(device)
    if dev.type == "cuda" and not plan and not torch.cuda.is_available():
        console.print(f"[red]gpu check: --device {device} but CUDA is not available.[/red]")
        return 2
    log = lambda m: console.print(f"[dim]{m}[/dim]")  # noqa: E731
    result = plan_only(dev, quick, log) if plan else run_check(dev, quick, log)
    atomic_write_json(Path(out), result)
    console.print(render_table(result))
    for line in summary_lines(result):
        console.print(line)
    console.print(f"wrote {Path(out).resolve()} in {result['seconds']:.0f} s")
    return exit_code(result)
