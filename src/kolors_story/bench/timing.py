"""Measuring A against B fairly: alternate runs after a warm-up, medians, B/A from the same run;
plus the shared context (model folders, scratch space) of one bench run."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kolors_story import tiny
from kolors_story.accounting import PeakTensorMemory

GB = 1e9
TFLOP = 1e12

# Tolerances of the "same output" checks: fp reordering between batch sizes may flip a pixel by
# one level (uint8) and move a score in its last float32 bits; anything more is a real difference.
PIXEL_TOLERANCE = 2
SCORE_TOLERANCE = 1e-4


class BenchError(RuntimeError):
    """A benchmark's A and B disagree (images or scores differ) or a section cannot run."""


def proc_status(keys: tuple[str, ...], pid: int | str = "self") -> dict[str, int]:
    """Values of ``/proc/<pid>/status`` in bytes (VmRSS, VmHWM, RssAnon, ...): those of ``keys`` found,
    none where there is no such file (not Linux, or the process has ended)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


@dataclass
class Comparison:
    """A vs B measured alternately; ``ratio`` = median(B) / median(A) (> 1: A is faster)."""

    section: str
    name: str
    a: str
    b: str
    a_runs: list[float]
    b_runs: list[float]
    unit: str = "s"
    per: str = ""  # what one run covers ("step", "story", "8 images"), for the table
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return median(self.b_runs) / median(self.a_runs)

    def as_dict(self) -> dict:
        return {
            "section": self.section, "name": self.name, "a": self.a, "b": self.b, "unit": self.unit,
            "per": self.per, "a_median": median(self.a_runs), "b_median": median(self.b_runs),
            "ratio_b_over_a": self.ratio, "a_runs": self.a_runs, "b_runs": self.b_runs, **self.extra,
        }


def alternate(a: Callable[[], object], b: Callable[[], object], repeats: int, warmup: bool = True
              ) -> tuple[list[float], list[float]]:
    """Seconds per call of ``a`` and ``b``, run A B B A A B ... so drifts in machine load hit both."""
    if warmup:  # first calls pay one-time costs (allocator growth, kernel selection, lazy state)
        a()
        b()
    ta: list[float] = []
    tb: list[float] = []
    for i in range(repeats):
        order = ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta))
        for fn, out in order:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return ta, tb


def peak(fn: Callable[[], object]) -> int:
    gc.collect()
    with PeakTensorMemory() as mem:
        fn()
    return mem.peak


def param_bytes(module, dtype_bytes: int | None = None) -> int:
    if module is None:
        return 0
    return sum(p.numel() * (dtype_bytes or p.element_size()) for p in module.parameters())


@dataclass
class BenchContext:
    quick: bool
    repeats: int
    workdir: Path  # scratch space (datasets, caches) for this run
    model_cache: Path  # where the tiny / bench models are built once and reused
    log: Callable[[str], None] = print
    overrides: list[str] = field(default_factory=list)  # model.*=... from the command line (text_encoder: your weights)
    _model_dir: Path | None = None

    @property
    def model_name(self) -> str:
        return "tiny" if self.quick else "bench"

    @property
    def resolution(self) -> int:
        return tiny.resolution("tiny" if self.quick else "bench")

    def model_dir(self) -> Path:
        if self._model_dir is None:
            if self.quick:
                self._model_dir = tiny.build_model(self.model_cache / "tiny-kolors-seed0", "tiny")
            else:
                folder = self.model_cache / f"bench-kolors-v{tiny.model_version('bench')}"
                if not (folder / "BENCH_MODEL.json").exists():
                    self.log(f"building the bench model into {folder} (once) ...")
                self._model_dir = tiny.build_model(folder, "bench")
        return self._model_dir


def compose_settings(job: str, overrides: list[str]):
    """The typed settings of ``conf/<job>.yaml`` with ``overrides`` (configs.compose_settings)."""
    from kolors_story.config.compose import compose_settings as compose

    try:
        return compose(job, overrides)
    except FileNotFoundError as exc:
        raise BenchError(str(exc)) from None
