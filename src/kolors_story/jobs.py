"""Running one Hydra job so a sweep survives its failures.

In a multirun, a job that raises (bad override, NaN, out of memory, missing data) is recorded as
failed in its own ``metrics.jsonl`` and the launcher moves on to the next job; the leaderboard then
lists it with its error. A single run still raises, so the user sees the full error.
"""

from __future__ import annotations

import traceback
from pathlib import Path

from kolors_story.metrics import MetricsWriter, read_metrics

FAILED_OBJECTIVE = float("-inf")  # what Optuna sees for a failed trial: worse than any score


def in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        return False


def _job_dir(cfg) -> Path | None:
    try:
        return Path(str(cfg.output_dir))
    except Exception:
        return None


def record_failure(run_dir: Path, exc: BaseException) -> None:
    """Append a failed status line unless the job already wrote its own."""
    records = read_metrics(run_dir)
    if records and records[-1].get("type") == "status" and records[-1].get("status") == "failed":
        return
    step = max((int(r.get("step", 0)) for r in records if isinstance(r.get("step"), int)), default=0)
    MetricsWriter(run_dir).write({"type": "status", "status": "failed", "step": step,
                                  "error": f"{type(exc).__name__}: {exc}"})


def run_job(fn, cfg, *, objective_on_failure=FAILED_OBJECTIVE):
    """``fn(cfg)``; in a multirun a failure is recorded and ``objective_on_failure`` returned."""
    try:
        return fn(cfg)
    except Exception as exc:
        if not in_multirun():
            raise
        run_dir = _job_dir(cfg)
        print(f"JOB FAILED ({run_dir}): {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
              "The sweep continues with the next job; the leaderboard lists this one as failed.")
        if run_dir is not None:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                record_failure(run_dir, exc)
            except Exception as write_exc:  # never let bookkeeping hide the original error
                print(f"(could not record the failure in {run_dir}: {write_exc})")
        try:
            import wandb

            if wandb.run is not None:
                wandb.finish(exit_code=1)  # or the next job would log into this one's run
        except Exception:
            pass
        return objective_on_failure
