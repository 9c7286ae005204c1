"""``python -m kolors_story.bench``: run the sections, keep every finished one in ``bench.json``,
print the table. ``--quick`` uses the tiny model and one repeat (for tests). ``--only gpu`` runs the
GPU check on its own (``bench.gpu``: ``gpu.json``, its own table and exit code)."""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kolors_story.bench.coherence import section_coherence
from kolors_story.bench.data import section_data
from kolors_story.bench.flops import section_flops
from kolors_story.bench.generate import section_generate
from kolors_story.bench.peers import section_peers
from kolors_story.bench.plan import section_plan
from kolors_story.bench.score import section_score
from kolors_story.bench.select import section_select
from kolors_story.bench.table import render_table
from kolors_story.bench.text_encoder import section_text_encoder
from kolors_story.bench.timing import BenchContext, BenchError
from kolors_story.bench.train import section_train
from kolors_story.files import atomic_write_json

SECTIONS = ("flops", "train", "generate", "score", "select", "coherence", "data", "plan", "text_encoder")
OPT_IN = ("peers",)  # run only when named (--only peers): ~15 minutes and a 7 GB model folder
GPU = "gpu"  # the GPU check: not a section of the default run (it needs a GPU, or --device cpu)
BENCH_FORMAT = 1
RUNNERS = {"flops": section_flops, "train": section_train, "generate": section_generate,
           "score": section_score, "select": section_select, "coherence": section_coherence, "data": section_data, "plan": section_plan,
           "text_encoder": section_text_encoder, "peers": section_peers}


def _machine() -> dict:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "loadavg_at_start": load, "cuda": torch.cuda.is_available(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def run_bench(sections=SECTIONS, *, quick: bool = False, repeats: int | None = None, out: str | Path = "bench.json",
              model_cache: str | Path | None = None, log: Callable[[str], None] = print,
              overrides: list[str] | None = None) -> dict:
    """Run the sections, merge them into ``out`` (other sections already there are kept), return the result."""
    unknown = [s for s in sections if s not in RUNNERS]
    if unknown:
        raise BenchError(f"unknown section(s) {unknown}; choose from {list(RUNNERS)}")
    out = Path(out)
    repeats = int(repeats if repeats is not None else (1 if quick else 3))
    if repeats < 1:
        raise BenchError(f"--repeats={repeats}: must be >= 1")
    cache = Path(model_cache or os.environ.get("KOLORS_STORY_CACHE", ".cache/kolors-story")).expanduser()
    result: dict = {}
    if out.exists():
        try:
            previous = json.loads(out.read_text(encoding="utf-8"))
            if previous.get("format") == BENCH_FORMAT and previous.get("quick") == quick:
                result = previous
        except ValueError:
            log(f"{out} is not valid JSON: it will be replaced")
    result.update(format=BENCH_FORMAT, quick=quick, repeats=repeats, machine=_machine())
    result.setdefault("sections", {})
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kolors-bench-") as tmp:
        ctx = BenchContext(quick=quick, repeats=repeats, workdir=Path(tmp), model_cache=cache, log=log,
                           overrides=list(overrides or []))
        for name in sections:
            t0 = time.perf_counter()
            torch.manual_seed(0)
            try:
                sec = RUNNERS[name](ctx)
            except BenchError:
                raise
            except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others
                sec = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"{name}: FAILED ({sec['error']})")
            sec["seconds"] = time.perf_counter() - t0
            result["sections"][name] = sec
            atomic_write_json(out, result)  # each finished section is kept even if a later one dies
            gc.collect()
    result["seconds"] = time.perf_counter() - t_all
    atomic_write_json(out, result)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kolors_story.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, 1 repeat (seconds; for tests); with --only gpu: the short GPU check")
    parser.add_argument("--only", action="append", choices=(*SECTIONS, *OPT_IN, GPU), metavar="SECTION",
                        help=f"run only this section (repeatable): {', '.join(SECTIONS)}; {', '.join(OPT_IN)} (only "
                             f"when named: this project against DiffSynth's trainer and the seeds' loop); or {GPU} "
                             "(alone): the memory plan measured on a GPU")
    parser.add_argument("--repeats", type=int, default=None, help="A/B pairs per comparison after one warm-up pair (default 3, quick 1)")
    parser.add_argument("--out", default=None, help="result file (default: bench.json; gpu.json with --only gpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("overrides", nargs="*", metavar="model.KEY=VALUE",
                        help="--only text_encoder on your weights: model.path=<Kolors folder> (model.dtype=...)")
    parser.add_argument("--device", default=None,
                        help="--only gpu: cuda (default where CUDA is), cuda:N, or cpu (the bench-size models)")
    parser.add_argument("--plan-only", action="store_true",
                        help="--only gpu: list the stages with their predicted peaks and the estimated time; "
                             "allocates nothing, needs no GPU")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if any(not o.startswith("model.") or "=" not in o for o in args.overrides):
        parser.error(f"settings on the command line are model.KEY=VALUE (got {args.overrides})")
    gpu = GPU in (args.only or [])
    if gpu and (len(set(args.only)) > 1 or args.overrides):
        parser.error(f"--only {GPU} runs alone and builds its own models (it writes gpu.json and has its own "
                     "exit code): no other section, no model.KEY=VALUE")
    if not gpu and (args.device or args.plan_only):
        parser.error(f"--device and --plan-only belong to --only {GPU}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from rich.console import Console

    console = Console(width=max(120, shutil.get_terminal_size((120, 24)).columns))
    if gpu:
        from kolors_story.bench.gpu import main as gpu_main

        return gpu_main(args.device, args.quick, args.plan_only, args.out or "gpu.json", console)
    try:
        result = run_bench(args.only or SECTIONS, quick=args.quick, repeats=args.repeats, out=args.out or "bench.json",
                           log=lambda m: console.print(f"[dim]{m}[/dim]"), overrides=args.overrides)
    except BenchError as exc:
        console.print(f"[red]bench failed:[/red] {exc}")
        return 1
    console.print(render_table(result))
    load = result["machine"].get("loadavg_at_start")
    if load and load[0] > (os.cpu_count() or 1):
        console.print(f"[yellow]The CPU was busy when the bench started (load {load[0]:.1f} on {os.cpu_count()} cores): "
                      "absolute times are inflated; the A/B ratios are measured under the same load.[/yellow]")
    console.print(f"wrote {Path(args.out or 'bench.json').resolve()} in {result['seconds']:.0f} s")
    failed = [k for k, v in result["sections"].items() if isinstance(v, dict) and "error" in v]
    missed = missed_goals(result)
    for line in missed:
        console.print(f"[red]goal missed:[/red] {line}")
    return 1 if failed or missed else 0


def missed_goals(result: dict) -> list[str]:
    """The ratios past their goal (the ``peers`` section's), one line each."""
    return [f"{sec_name}: {g['row']} {g['measure']} ratio {g['ratio']:.2f}x > goal {g['goal']:.2f}x"
            for sec_name, sec in result.get("sections", {}).items() if isinstance(sec, dict)
            for g in sec.get("goals", []) if not g["met"]]
