"""What `train.py`, `generate.py` and `evaluate.py` call with their composed Hydra config: the
config becomes typed settings here, and the library below never sees the raw config.

In a multirun a job that raises (bad override, NaN, out of memory, missing data) is recorded as
failed in its own ``metrics.jsonl`` and the launcher moves on to the next job; the leaderboard then
lists it with its error. A single run still raises, so the user sees the full error.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

from kolors_story.configs import in_multirun, task_overrides, to_settings
from kolors_story.records import record_failure

FAILED_OBJECTIVE = float("-inf")  # what Optuna sees for a failed trial: worse than any score


def run_job(fn, cfg, *, objective_on_failure=FAILED_OBJECTIVE):
    """``fn(cfg)``; in a multirun a failure is recorded and ``objective_on_failure`` returned."""
    try:
        return fn(cfg)
    except Exception as exc:
        if not in_multirun():
            raise
        try:
            run_dir = Path(str(cfg.output_dir))
        except Exception:  # noqa: BLE001 - an unresolvable output_dir
            run_dir = None
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
        except Exception:  # noqa: BLE001
            pass
        return objective_on_failure


def train_from_config(cfg) -> float | None:
    """The `train.py` job: resume= merged into the run's own config, then ``train.run.train``."""
    from kolors_story.train.resume import resume_config, save_run_config
    from kolors_story.train.run import handoff_pending, run_handoff, train

    if handoff_pending():  # a DDP child process started by Lightning
        run_handoff()
        return None
    resume_from = None
    if cfg.get("resume"):
        cfg, run_dir, resume_from = resume_config(cfg)
        print(f"Resuming {run_dir} from {resume_from.parent.name}")
    job = to_settings(cfg, "train", lenient=resume_from is not None)  # a resumed run's config may be older
    if job.stage != "data" and job.output_dir:
        save_run_config(cfg, Path(job.output_dir))
    return train(job, resume_from=resume_from)


def train_main(cfg) -> float | None:
    """`train.py`: returns the last checkpoint's mean aesthetic score (what the Optuna sweeper maximises)."""
    return run_job(train_from_config, cfg)


def generate_from_config(cfg):
    """The `generate.py` job without reproduce=: render (run=/checkpoint= resolved), bundle, report."""
    from kolors_story.generate.run import render_story
    from kolors_story.generate.runs import effective_config

    effective, source = effective_config(cfg)
    job = to_settings(effective, "generate", lenient=source is not None)  # a training run's config may be older
    return render_story(job, source=source, overrides=task_overrides(cfg))


def generate_main(cfg) -> int:
    """`generate.py`: a reproduction (exit code 1 when any image differs) or a rendered story."""
    if cfg.get("reproduce"):
        from kolors_story.generate.reproduce import reproduce_from_config

        return 0 if reproduce_from_config(cfg)["all_identical"] else 1
    generate_from_config(cfg)
    return 0


def evaluate_from_config(cfg) -> dict:
    """The `evaluate.py` job, dispatched on what was asked for: ``images=`` or ``sweep=``."""
    from kolors_story.evaluate.folder import EvaluationError, evaluate_folder
    from kolors_story.evaluate.leaderboard import run_leaderboard

    job = to_settings(cfg, "evaluate")
    if job.images and job.sweep:
        raise EvaluationError("Give either images=<folder> or sweep=<multirun folder>, not both")
    if job.images:
        return evaluate_folder(job)
    if job.sweep:
        try:
            return run_leaderboard(job)
        except (FileNotFoundError, ValueError) as exc:
            raise EvaluationError(str(exc)) from exc
    raise EvaluationError(
        "Nothing to evaluate: pass images=<folder with the story images or a generate run folder> "
        "or sweep=<multirun folder of python train.py -m>"
    )


def evaluate_main(cfg) -> int:
    """`evaluate.py`: bad input is one line on stderr and exit code 2, no traceback."""
    from kolors_story.evaluate.folder import EvaluationError
    from kolors_story.evaluate.scorer import ScorerError

    try:
        evaluate_from_config(cfg)
    except (EvaluationError, ScorerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
