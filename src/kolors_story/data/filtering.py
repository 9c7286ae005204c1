"""Run a data-juicer recipe (the ``filter`` group) as a ``dj-process`` subprocess.

Never imported in-process: data-juicer sets PIL's LOAD_TRUNCATED_IMAGES globally and takes over
stdout/loguru. The subprocess is hardened (see ARCHITECTURE.md "Traps"): hub/datasets offline,
pip/uv offline so nothing can be installed at run time, every cache inside the work folder,
``batch_size: 1`` per op (one unreadable file cannot take a whole batch of good ones with it), and
the tracer on so every dropped sample is attributed to the op that dropped it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kolors_story.data.candidates import DataError

# Ops that must not run here: image_deduplicator pulls a torchvision that breaks the environment.
FORBIDDEN_OPS = {"image_deduplicator": "it installs a mismatched torchvision at run time",
                 "ray_image_deduplicator": "it installs a mismatched torchvision at run time"}

_OP_DONE = re.compile(r"OP \[(?P<op>[^\]]+)\] Done in [\d.]+s\. Left (?P<left>\d+) samples")


@dataclass
class OpCount:
    op: str
    kept_in: int
    kept: int

    @property
    def dropped(self) -> int:
        return self.kept_in - self.kept

    def as_dict(self) -> dict:
        return {"op": self.op, "in": self.kept_in, "kept": self.kept, "dropped": self.dropped}


@dataclass
class FilterResult:
    kept: list[dict]  # exported rows ({"id", "text", "image": [path]}), id order
    dropped: dict[int, tuple[str, str]]  # id -> (op, reason)
    ops: list[OpCount]
    export_path: Path
    log_path: Path
    seconds: float
    notes: list[str] = field(default_factory=list)


def recipe_ops(process) -> list[tuple[str, dict]]:
    """``[(op name, args)]`` of a recipe's ``process`` list (each item a one-key mapping)."""
    ops = []
    for i, item in enumerate(process or []):
        if isinstance(item, str):
            ops.append((item, {}))
            continue
        if not isinstance(item, dict) or len(item) != 1:
            raise DataError(f"filter.process[{i}] must be a one-key mapping like `- image_shape_filter: {{...}}` (got {item!r})",
                            step="filter")
        (name, args), = item.items()
        ops.append((str(name), dict(args or {})))
    for name, _ in ops:
        if name in FORBIDDEN_OPS:
            raise DataError(f"filter op {name} is not allowed: {FORBIDDEN_OPS[name]}; remove it from the recipe", step="filter")
    return ops


def dj_command() -> list[str]:
    """The ``dj-process`` console script of this environment (beside the running python first)."""
    exe = Path(sys.executable).parent / "dj-process"
    found = str(exe) if exe.is_file() else shutil.which("dj-process")
    if not found:
        raise DataError("dj-process not found: install py-data-juicer==1.6.1 and ray (`pip install -e .`), "
                        "or skip filtering with filter=none", step="filter")
    if importlib.util.find_spec("ray") is None:
        # data-juicer would try to pip-install ray at run time (and hang offline).
        raise DataError("ray is not installed, and data-juicer would try to install it at run time: "
                        "`pip install ray`, or skip filtering with filter=none", step="filter")
    return [found]


def hardened_env(work_dir: Path, ray: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    home = work_dir / "home"
    if ray:
        env["HOME"] = str(home)  # where Ray looks for ray_bootstrap_config.yaml (see _write_recipe)
    env.update({
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(work_dir / "ds_cache"),
        "CACHE_HOME": str(home),  # data-juicer's own cache root (models, assets)
        "DATA_JUICER_CACHE_HOME": str(home / "data_juicer"),
        "PIP_NO_INDEX": "1",  # an attempted run-time install fails fast instead of downloading
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "UV_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",  # so per-op progress arrives while it runs
        "TQDM_DISABLE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",  # filter.executor=ray: Ray reports usage to the internet otherwise
    })
    return env


EXECUTORS = ("default", "ray")


def check_executor(executor: str) -> None:
    if executor not in EXECUTORS:
        raise DataError(f"filter.executor={executor!r}: use one of {list(EXECUTORS)}", step="filter")


def _write_recipe(rows: list[dict], ops: list[tuple[str, dict]], work_dir: Path, name: str, np_workers: int,
                  executor: str = "default", ray_address: str | None = None) -> Path:
    """input.jsonl + recipe.yaml (every cache inside ``work_dir``, tracer on, batch_size 1 per op;
    ``executor=ray``: data-juicer's Ray executor, on ``ray_address`` or a Ray instance of its own)."""
    input_path = work_dir / "input.jsonl"
    input_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    config = {
        "project_name": f"kolors-story-{name}",
        "dataset_path": str(input_path),
        "export_path": str(work_dir / "output" / "result.jsonl"),
        "work_dir": str(work_dir / "dj_work"),
        "ds_cache_dir": str(work_dir / "ds_cache"),
        "temp_dir": str(work_dir / "tmp"),
        "use_cache": False,
        "np": int(np_workers),
        "text_keys": "text",
        "image_key": "image",
        "image_special_token": "<__dj__image>",
        "open_tracer": True,
        "trace_num": max(1, len(rows)),
        "process": [{op: {**args, "batch_size": args.get("batch_size", 1)}} for op, args in ops],
    }
    if executor == "ray":  # "local": ray.init starts a Ray instance for this dj-process and it ends with it
        config.update(executor_type="ray", ray_address=str(ray_address or "local"))
        # Ray's dashboard asks cloud metadata endpoints (169.254.169.254) which cloud it runs on unless
        # ~/ray_bootstrap_config.yaml exists (even with usage stats off): give it one in a private HOME.
        home = work_dir / "home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "ray_bootstrap_config.yaml").write_text("# kolors-story: no cluster config, no cloud probing\n{}\n")
    (work_dir / "tmp").mkdir()
    recipe_path = work_dir / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return recipe_path


# dj-process runs under this watchdog, in a process group of its own: the watchdog holds the read
# end of a pipe whose write end only the parent has. However the parent ends (exception, SIGTERM,
# kill -9), the kernel closes that end; the watchdog reads EOF and kills the whole group, workers too.
_WATCHDOG = """
import os, signal, subprocess, sys, threading
child = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL)
def watch():
    while os.read(0, 4096):  # unbuffered: returns b"" at EOF, when the parent is gone (or done)
        pass
    os.killpg(0, signal.SIGKILL)
threading.Thread(target=watch, daemon=True).start()
code = child.wait()
os._exit(code if code >= 0 else 128 - code)  # no interpreter shutdown with the watcher still blocked
"""
PID_FILE = "dj-process.pid"


def stop_stale_run(work_dir: Path) -> str | None:
    """Kill a dj-process an earlier run left behind in ``work_dir`` (its pid file names the process
    group; the group is only killed when it still runs this folder's recipe). Returns a note."""
    try:
        pgid = int((work_dir / PID_FILE).read_text().strip())
        cmdline = Path(f"/proc/{pgid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError):
        return None
    if str(work_dir / "recipe.yaml") not in cmdline:
        return None  # the pid was reused by something else
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        return None
    return f"stopped a dj-process (pid {pgid}) that an earlier, interrupted run left running"


def _run_dj(recipe_path: Path, work_dir: Path, log_path: Path, name: str, n_ops: int, timeout: float | None,
            progress: bool, ray: bool = False) -> tuple[int, list[tuple[str, int]], float, bool]:
    """dj-process (under the watchdog) with its output in ``log_path`` and a bar per finished op:
    (return code, (op, samples left) per op, seconds, killed by the timeout)."""
    from tqdm.auto import tqdm

    cmd = [*dj_command(), "--config", str(recipe_path)]
    start = time.monotonic()
    done: list[tuple[str, int]] = []
    bar = tqdm(total=n_ops, desc=f"data-juicer ({name})", unit="op", dynamic_ncols=True, disable=not progress)
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen([sys.executable, "-c", _WATCHDOG, *cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", env=hardened_env(work_dir, ray),
                                cwd=str(work_dir), start_new_session=True)
        (work_dir / PID_FILE).write_text(f"{proc.pid}\n")
        timer = threading.Timer(timeout, _kill, (proc,)) if timeout else None
        if timer:
            timer.start()
        try:
            for line in proc.stdout:
                log.write(line)
                m = _OP_DONE.search(line)
                if m:
                    done.append((m["op"], int(m["left"])))
                    bar.update(1)
                    bar.set_postfix(left=int(m["left"]), refresh=False)
            rc = proc.wait()
        finally:
            if timer:
                timer.cancel()
            if proc.poll() is None:  # Ctrl-C or an error while reading: don't leave it running
                _kill(proc)
                proc.wait()
            proc.stdin.close()
            (work_dir / PID_FILE).unlink(missing_ok=True)
            bar.close()
    seconds = time.monotonic() - start
    return rc, done, seconds, bool(timer and seconds >= timeout)


def _kill(proc: subprocess.Popen) -> None:
    """Kill dj-process and any workers it started (they share the watchdog's process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        proc.kill()


def _traced_drops(ops: list[tuple[str, dict]], work_dir: Path, kept_ids: set[int]) -> dict[int, tuple[str, str]]:
    """id -> (op, reason) from the tracer's per-op files (filters trace every dropped sample)."""
    dropped: dict[int, tuple[str, str]] = {}
    trace_dir = next((p for p in (work_dir / "dj_work").rglob("trace") if p.is_dir()), None)
    for op, _ in ops:
        path = trace_dir / f"sample_trace-{op}.jsonl" if trace_dir else None
        if not path or not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            sample = json.loads(line)
            if "id" not in sample or int(sample["id"]) in dropped or int(sample["id"]) in kept_ids:
                continue  # mapper traces have no id; an id seen twice belongs to the first op
            stats = sample.get("__dj__stats__") or {}
            shown = ", ".join(f"{k}={_short(v)}" for k, v in stats.items())
            dropped[int(sample["id"])] = (op, f"dropped by {op}" + (f" ({shown})" if shown else ""))
    return dropped


def _op_counts(ops, done, dropped, n_in: int, notes: list[str]) -> list[OpCount]:
    """Samples in/kept per op: from dj-process's log lines, else from the traces."""
    counts: list[OpCount] = []
    if len(done) == len(ops):
        for (op, _), (_, left) in zip(ops, done):
            counts.append(OpCount(op, n_in, left))
            n_in = left
        return counts
    for op, _ in ops:  # log format changed: count from the traces instead
        n_drop = sum(1 for o, _ in dropped.values() if o == op)
        counts.append(OpCount(op, n_in, n_in - n_drop))
        n_in -= n_drop
    notes.append("per-op counts come from the traces (dj-process log lines not recognised)")
    return counts


def _read_export(export_path: Path) -> list[dict]:
    """The exported rows: one JSON-lines file (default executor) or a folder of parts (Ray's)."""
    parts = sorted(p for p in export_path.iterdir() if p.is_file()) if export_path.is_dir() else [export_path]
    return [json.loads(line) for part in parts for line in part.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_recipe(rows: list[dict], process, work_dir: str | Path, *, name: str = "recipe", np_workers: int = 1,
               timeout: float | None = None, progress: bool = True, executor: str = "default",
               ray_address: str | None = None) -> FilterResult:
    """Filter ``rows`` ({"id": int, "text": str, "image": [absolute path]}) with the recipe's ops.

    Everything goes under ``work_dir`` (input.jsonl, recipe.yaml, output/result.jsonl, dj_work/ with
    traces and logs, dj-process.log). Raises DataError when dj-process fails or does not finish.
    ``executor``: default (data-juicer's own, ``np_workers`` processes) or ray (its Ray executor).
    """
    check_executor(executor)
    ops = recipe_ops(process)
    work_dir = Path(work_dir).resolve()
    stale = stop_stale_run(work_dir)
    if work_dir.exists():
        shutil.rmtree(work_dir)  # stale exports/traces would be mistaken for this run's
    work_dir.mkdir(parents=True)
    export_path, log_path = work_dir / "output" / "result.jsonl", work_dir / "dj-process.log"
    recipe_path = _write_recipe(rows, ops, work_dir, name, np_workers, executor, ray_address)
    rc, done, seconds, timed_out = _run_dj(recipe_path, work_dir, log_path, name, len(ops), timeout, progress,
                                           executor == "ray")
    if rc != 0 or not export_path.exists():
        tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(True)[-25:])
        why = (f"was killed after the {timeout:.0f} s timeout (filter.timeout)" if timed_out
               else f"exited with code {rc}" if rc != 0 else "wrote no export file")
        raise DataError(f"data-juicer recipe {name!r} failed: dj-process {why}. Full log: {log_path}\n--- last lines ---\n{tail}",
                        step="filter")
    kept = _read_export(export_path)
    kept.sort(key=lambda r: int(r["id"]))
    kept_ids = {int(r["id"]) for r in kept}
    dropped = _traced_drops(ops, work_dir, kept_ids)
    notes = [stale] if stale else []
    for row in rows:
        rid = int(row["id"])
        if rid not in kept_ids and rid not in dropped:
            dropped[rid] = ("data-juicer", f"dropped by data-juicer without a trace (an op error? see {log_path})")
            if not any("without a trace" in n for n in notes):
                notes.append("some samples were dropped without a trace: check the dj-process log for op errors")
    counts = _op_counts(ops, done, dropped, len(rows), [] if executor == "ray" else notes)
    return FilterResult(kept, dropped, counts, export_path, log_path, seconds, notes)


def _short(value) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
