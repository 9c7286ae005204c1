"""``report.html`` of a sweep, beside ``leaderboard.csv`` and ``best.yaml`` (``evaluate.py sweep=``):
the leaderboard with a thumbnail per row (its cells read back from ``leaderboard.csv``, so the page
and the file never disagree), the best pick and the ranking that chose it, every run's loss curve
on one plot (``loss_curves.png``), what each run changed (its swept overrides), ``grid.png`` when
one was drawn, and a link to each run's own report (written here when missing or older than the
run's metrics)."""

from __future__ import annotations

import csv
from pathlib import Path

from kolors_story.evaluate.grid import GRID_IMAGE, run_overrides, swept_keys, swept_values
from kolors_story.evaluate.html import REPORT_FILE, href, render
from kolors_story.evaluate.plots import overlay_figure, save_figure
from kolors_story.evaluate.run_folder import split_override, stand_in_note
from kolors_story.evaluate.run_report import write_run_report
from kolors_story.files import atomic_write_text
from kolors_story.records import EMA_SUFFIX, METRICS_FILE, RunMetrics

LOSS_CURVES_IMAGE = "loss_curves.png"
TEXT_COLUMNS = ("run", "overrides", "checkpoint", "error")  # long words: wrapped anywhere
NUMBER_COLUMNS = ("rank", "step", "mean", "min", "coherence", "clip_t", "copy_paste", "story_objective", "val_loss",
                  "reward_held_out")  # right-aligned, never wrapped
OBJECTIVE_WORDS = {
    "mean": "the highest mean aesthetic score",
    "min": "the highest minimum aesthetic score (the story's weakest image)",
    "coherence": "the highest CLIP-I coherence (how alike the 8 panels are)",
    "story": "the highest story objective (the mean aesthetic score plus weighted CLIP-I and CLIP-T, "
             "minus copy-paste)",
}


def run_reports(runs: list[Path]) -> dict[Path, Path]:
    """Each run's report.html, written when it is missing or older than the run's metrics."""
    out = {}
    for run in runs:
        page, metrics = run / REPORT_FILE, run / METRICS_FILE
        stale = not page.is_file() or (metrics.is_file() and metrics.stat().st_mtime > page.stat().st_mtime)
        out[run] = write_run_report(run) if stale else page
    return out


def why_best(best, rows) -> str:
    """One sentence on how the best pick was chosen, from its ``ranked_by``."""
    ranked = best.ranked_by or {}
    objective = str(ranked.get("objective", "mean"))
    sentence = f"Ranked by {OBJECTIVE_WORDS.get(objective, objective)}"
    if ranked.get("require_pass", True):
        gate = "the story objective's gate" if objective == "story" else "the gate (mean at or above the threshold)"
        sentence += f", checkpoints that pass {gate} first"
        if best.passed is False:
            sentence += " (none passed, so this is the best of those that did not)"
    scored = sum(1 for r in rows if r.mean is not None)
    return sentence + f"; ties go to CLIP-I, then the minimum score. {scored} scored checkpoint(s) compared."


def _leaderboard(rows, csv_path: Path, page: Path) -> tuple[list[str], list[dict]]:
    """The CSV's header and rows as written, each with its run's thumbnail and report link."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        header, *cells = list(csv.reader(f))
    out = []
    for row, line in zip(rows, cells):
        panel = row.run / row.panel if row.panel else None
        anchor = Path(row.checkpoint.removesuffix(EMA_SUFFIX)).name if row.checkpoint else None
        report = href(row.run / REPORT_FILE, page)
        out.append({"cells": line, "thumb": href(panel, page) if panel and panel.is_file() else None,
                    "report": report + (f"#panel-{anchor}" if anchor else ""), "rank": line[0]})
    return header, out


def _runs(rows, reports: dict[Path, Path], page: Path) -> tuple[list[dict], list[str], list[str]]:
    """Each run's swept overrides, status and report; the swept keys; the overrides all runs share."""
    overrides = run_overrides(rows)
    values = swept_values(overrides)
    swept = swept_keys(values, set(overrides))
    runs = []
    for run, items in overrides.items():
        status = next(r.status for r in rows if r.run == run)
        changed = [o for o in items if split_override(o)[0] in swept]
        runs.append({"path": run, "name": run.name, "changed": changed, "status": status, "report": href(reports[run], page),
                     "label": " ".join(changed) or run.name})
    common = sorted({o for items in overrides.values() for o in items if split_override(o)[0] not in swept})
    return runs, swept, common


def write_sweep_report(sweep_dir: str | Path, result: dict, out_dir: str | Path | None = None) -> Path:
    """``report.html`` (and ``loss_curves.png``) in ``out_dir`` (the sweep folder by default), from
    ``write_leaderboard``'s result; the runs' own reports are written first where missing."""
    sweep_dir = Path(sweep_dir)
    page = Path(out_dir or sweep_dir)
    rows, best = result["rows"], result["best"]
    reports = run_reports(list(run_overrides(rows)))
    runs, swept, common = _runs(rows, reports, page)
    overlay = save_figure(overlay_figure([(r["label"], RunMetrics.read(r["path"])) for r in runs]),
                          page / LOSS_CURVES_IMAGE)
    header, board = _leaderboard(rows, Path(result["paths"]["csv"]), page)
    top = next((r for r in rows if r.mean is not None), None)
    grid = page / GRID_IMAGE
    kinds = ["text" if h in TEXT_COLUMNS else "num" if h in NUMBER_COLUMNS else "" for h in header]
    html = render(
        "sweep_report.html.j2", sweep=str(sweep_dir.resolve()), name=sweep_dir.name, header=header, board=board, kinds=kinds,
        best=best, why=why_best(best, rows) if best else None, runs=runs, swept=swept, common=common,
        best_report=href(top.run / REPORT_FILE, page) if top else None,
        best_label=next((r["label"] for r in runs if top and r["path"] == top.run), ""),
        best_file=href(result["paths"].get("best"), page), best_file_path=str(result["paths"].get("best", "")), overlay=href(overlay, page),
        grid=href(grid, page) if "grid" in result["paths"] else None,
        csv=href(result["paths"]["csv"], page), note=stand_in_note(top.run, top.checkpoint) if top else None,
    )
    return atomic_write_text(page / REPORT_FILE, html)


__all__ = ["LOSS_CURVES_IMAGE", "run_reports", "why_best", "write_sweep_report"]
