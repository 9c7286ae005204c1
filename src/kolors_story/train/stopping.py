"""Stopping is not losing: SIGTERM (a cluster's preemption, ``timeout``, a spot instance going away)
and SIGINT (Ctrl-C) during training finish the current optimizer step, save a checkpoint to resume
from, and end the run as ``stopped``, with exit code 143 or 130.

The handler only records the signal; the checkpoint callback acts on it at the next step boundary,
so a checkpoint is never written from inside a signal handler and a second signal during the save
cannot cut it short (the save is atomic anyway: ``kill -9`` leaves the previous checkpoint in use).
It is installed when training starts, after Lightning's own SIGTERM handler, which it replaces for
the fit: Lightning's would end the fit at the end of the batch, before the step's checkpoint.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXIT_CODES = {"SIGTERM": 143, "SIGINT": 130, "SIGUSR2": 140}  # 128 + the signal's number, as a shell reports it
# submitit (+launcher=slurm) sends SIGUSR2 before a preemption or the time limit, and its handler
# requeues the job and exits: the stop checkpoint is written first, then that handler is called.
REQUEUE_SIGNAL = getattr(signal, "SIGUSR2", None)


class StopRequest:
    """The first stop signal received while training (None until one arrives)."""

    def __init__(self):
        self.signal: str | None = None
        self._previous: dict = {}
        self._requeue = None  # submitit's SIGUSR2 handler, when it runs this job

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)
        requeue = signal.getsignal(REQUEUE_SIGNAL) if REQUEUE_SIGNAL is not None else None
        if callable(requeue):
            self._previous[REQUEUE_SIGNAL], self._requeue = requeue, requeue
            signal.signal(REQUEUE_SIGNAL, self._on_signal)

    def after_checkpoint(self) -> None:
        """Once the stop checkpoint is written: a submitit job is handed back to submitit, which
        requeues it (the requeued job resumes from that checkpoint) and exits."""
        if self.signal == "SIGUSR2" and self._requeue is not None:
            self._requeue(REQUEUE_SIGNAL, None)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _on_signal(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal = name
            print(f"\n{name}: finishing this step, then saving a checkpoint to resume from ...", flush=True)
        else:
            print(f"\n{name} again: the checkpoint is being saved; the run stops right after it.", flush=True)

    def requested(self, trainer) -> bool:
        """Whether any rank received a stop signal (every rank must call this at the same step)."""
        local = self.signal is not None
        if trainer.world_size > 1:
            return bool(trainer.strategy.reduce_boolean_decision(local, all=False))
        return local

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal or "SIGTERM", 143)


def stop_line(signal_name: str, step: int, checkpoint: Path | None, run_dir: Path) -> str:
    """The one line a stopped run ends with: what stopped it, what was kept, how to go on."""
    kept = f"checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint (stopped before the first step)"
    return f"stopped by {signal_name} at step {step}; {kept}; resume: python train.py resume={run_dir}"
