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

from kolors_story.config.compose import explicit_keys, in_multirun, run_identity, task_overrides, to_settings
from kolors_story.errors import SettingsError, print_user_error, user_error_message
from kolors_story.records import record_failure
from kolors_story.story.files import apply_story_file

FAILED_OBJECTIVE = float("-inf")  # what Optuna sees for a failed trial: worse than any score


def exit_on_user_error(fn, cfg):
    """``fn(cfg)``; an error the user can fix ends the run with one ``error: ...`` message and exit
    code 2 (``HYDRA_FULL_ERROR=1`` shows the traceback instead)."""
    try:
        return fn(cfg)
    except Exception as exc:
        if not print_user_error(exc):
            raise
        raise SystemExit(2) from None


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
        details = "" if user_error_message(exc) is not None else f"\n{traceback.format_exc()}"
        print(f"JOB FAILED ({run_dir}): {type(exc).__name__}: {exc}{details}\n"
              "The sweep continues with the next job; the leaderboard lists this one as failed.")
        if run_dir is not None:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                record_failure(run_dir, exc)
            except Exception as write_exc:  # noqa: BLE001 - never let bookkeeping hide the original error
                print(f"(could not record the failure in {run_dir}: {write_exc})")
        try:
            import wandb

            if wandb.run is not None:
                wandb.finish(exit_code=1)  # or the next job would log into this one's run
        except Exception:  # noqa: BLE001
            pass
        return objective_on_failure


def planned(kind: str, job, cfg, folder=None, **extra):
    """The job with the settings ``memory.auto`` chose, after printing the memory plan and writing
    plan.json to ``folder``. Planned when the run is on a GPU, or with ``memory.budget_gb`` or
    ``plan_only``. Raises when nothing fits; ``plan_only`` stops here."""
    from kolors_story.plan.auto import budget_bytes

    if not (job.plan_only or budget_bytes(job.memory.budget_gb, job.model.device)):
        if kind == "generate" and str(job.model.device) == "cpu":
            from kolors_story.plan.auto import cpu_generation_defaults

            return cpu_generation_defaults(job, explicit_keys(cfg))
        return job  # no GPU to plan for
    from kolors_story.plan.auto import make_plan
    from kolors_story.plan.report import no_fit_message, print_plan, write_plan
    from kolors_story.plan.stages import planning_sizes

    job, plan = make_plan(kind, job, planning_sizes(job.model, job.scorer), explicit_keys(cfg), **extra)
    print_plan(plan)
    if folder is not None:
        print(f"plan: {write_plan(plan, folder)}")
    if not plan.fits:
        raise SettingsError(no_fit_message(plan))
    if job.plan_only:
        print("plan_only=true: nothing was loaded; the plan fits.")
        raise SystemExit(0)
    return job


def _hydra_run_dir() -> str | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None
    except Exception:  # noqa: BLE001
        return None


def train_from_config(cfg) -> float | None:
    """The `train.py` job: resume= merged into the run's own config, then ``train.job.train``."""
    from kolors_story.config.saved import resume_config, save_run_config, stopped_run, with_resume
    from kolors_story.train.checks import check_train
    from kolors_story.train.job import handoff_pending, run_handoff, train
    from kolors_story.train.resume import check_trainer_state

    if handoff_pending():  # a DDP child process started by Lightning
        run_handoff()
        return None
    resume_from = None
    requeued = None if cfg.get("resume") else stopped_run(cfg)
    if requeued is not None:  # the same job again in its own folder (a requeue after a stop)
        print(f"{requeued} holds a stopped run: resuming it")
        cfg = with_resume(cfg, requeued)
    if cfg.get("resume"):
        cfg, run_dir, resume_from = resume_config(cfg, check_state=check_trainer_state)
        print(f"Resuming {run_dir} from {resume_from.parent.name}")
    job = to_settings(cfg, "train", lenient=resume_from is not None)  # a resumed run's config may be older
    job = apply_story_file(job)  # story.file: your own scenes, checked before anything loads
    if not job.plan_only:
        check_train(job)  # before any data or model work, and before anything is written to the run
    job = planned("train", job, cfg, job.output_dir if job.stage != "data" or job.plan_only else None)
    if job.stage != "data" and job.output_dir:
        save_run_config(cfg, Path(job.output_dir))
    return train(job, resume_from=resume_from, identity=run_identity())


def train_main(cfg) -> float | None:
    """`train.py`: returns the last checkpoint's mean aesthetic score (what the Optuna sweeper maximises)."""
    return exit_on_user_error(lambda c: run_job(train_from_config, c), cfg)


def generate_from_config(cfg):
    """The `generate.py` job without reproduce=: render (run=/checkpoint= resolved), bundle, report."""
    from kolors_story.config.saved import effective_config
    from kolors_story.generate.job import render_story

    effective, source = effective_config(cfg)
    job = apply_story_file(to_settings(effective, "generate", lenient=source is not None))  # a run's config may be older
    extra = {"lora_files": [effective.lora_path]} if effective.get("lora_path") else {}
    job = planned("generate", job, cfg, job.output_dir, **extra)
    return render_story(job, source=source, overrides=task_overrides(cfg))


def reproduce_from_config(cfg) -> dict:
    """`python generate.py reproduce=<...> [model.path=<moved weights>]`: regenerate and compare."""
    from kolors_story.config.saved import reproduce_request
    from kolors_story.generate.reproduce import format_report, reproduce

    source, out_dir, locations = reproduce_request(cfg)
    report = reproduce(source, out_dir, locations=locations)
    print(format_report(report))
    return report


def _generate(cfg) -> int:
    if cfg.get("reproduce"):
        return 0 if reproduce_from_config(cfg)["all_identical"] else 1
    generate_from_config(cfg)
    return 0


def generate_main(cfg) -> int:
    """`generate.py`: a reproduction (exit code 1 when any image differs) or a rendered story."""
    story = "the new story was not written; the story already in the output folder is untouched"
    return exit_on_user_error(stoppable(_generate, story), cfg)


def evaluate_from_config(cfg) -> dict:
    """The `evaluate.py` job, dispatched on what was asked for: ``images=``, ``sweep=`` or ``report=``."""
    from kolors_story.evaluate.folder import EvaluationError, evaluate_folder
    from kolors_story.evaluate.leaderboard import run_leaderboard

    job = to_settings(cfg, "evaluate")
    asked = [key for key in ("images", "sweep", "report") if getattr(job, key)]
    if len(asked) > 1:
        raise EvaluationError(f"Give one of images=<folder>, sweep=<multirun folder> or report=<run folder>, "
                              f"not {' and '.join(asked)}")
    if job.report:  # reads files only: no model, so no memory plan
        from kolors_story.evaluate.run_report import write_run_report

        path = write_run_report(job.report)
        print(f"report: {path}")
        return {"report": path}
    job = planned("evaluate", job, cfg, job.output_dir or _hydra_run_dir())
    if job.images:
        return evaluate_folder(job)
    if job.sweep:
        try:
            return run_leaderboard(job)
        except (FileNotFoundError, ValueError) as exc:
            raise EvaluationError(str(exc)) from exc
    raise EvaluationError(
        "Nothing to evaluate: pass images=<folder with the story images or a generate run folder>, "
        "sweep=<multirun folder of python train.py -m> or report=<train.py run folder>"
    )


def evaluate_main(cfg) -> int:
    """`evaluate.py`: bad input is one line on stderr and exit code 2, no traceback."""
    exit_on_user_error(stoppable(evaluate_from_config, "no scores or leaderboard files were written"), cfg)
    return 0


class StopSignal(BaseException):
    """SIGTERM or SIGINT during generate.py / evaluate.py, raised in the main thread so that every
    ``with`` block unwinds: a staging folder is removed and nothing half-made is published."""


def _progress() -> str:
    """Where the work was when it stopped, from the progress bars still open."""
    from tqdm import tqdm

    bars = [b for b in list(getattr(tqdm, "_instances", [])) if getattr(b, "total", None)]
    return (" during " + ", ".join(f"'{b.desc.rstrip(': ')}' at {b.n} of {b.total}" for b in bars[:2])) if bars else ""


RESEND_S = 1.0  # a stop signal whose exception was swallowed is delivered again this much later


def stoppable(fn, not_written: str):
    """``fn(cfg)``, ended by SIGTERM/SIGINT with one line saying how far it got and what was not
    written, and the shell's exit code for that signal (143, 130)."""
    import os
    import signal
    import threading

    from kolors_story.train.stopping import EXIT_CODES, STOP_SIGNALS

    resend: list[threading.Timer] = []

    def raise_stop(signum, _frame):  # how far it got is read now: the progress bars close as it unwinds
        # The handler runs wherever the main thread is; inside a finalizer or a weakref callback Python
        # prints its exception and goes on with the work. So the signal comes again until it is caught,
        # and does nothing while a stop is unwinding (a ``finally`` or ``__exit__`` cleaning up).
        if isinstance(sys.exc_info()[1], StopSignal):
            return
        timer = threading.Timer(RESEND_S, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()
        resend.append(timer)
        raise StopSignal(signal.Signals(signum).name, _progress())

    def run(cfg):
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        for sig in STOP_SIGNALS:
            signal.signal(sig, raise_stop)
        try:
            return fn(cfg)
        except StopSignal as stop:
            for sig in STOP_SIGNALS:  # caught: no second stop while this one is reported
                signal.signal(sig, signal.SIG_IGN)
            for timer in resend:
                timer.cancel()
            name, where = stop.args
            print(f"stopped by {name}{where}: {not_written}", file=sys.stderr)
            raise SystemExit(EXIT_CODES[name]) from None
        finally:
            for timer in resend:  # also when the work ended before a repeat came: none after it
                timer.cancel()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    return run
