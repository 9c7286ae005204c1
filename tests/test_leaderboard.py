"""Leaderboard over a sweep folder, from the jobs' own files (no W&B server)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from kolors_story.evaluate.leaderboard import build_leaderboard, write_leaderboard


def _job(sweep: Path, name: str, overrides: list[str], checkpoints: list[dict], status="finished", error=None):
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"lora": {"rank": int(overrides[0].split("=")[1])}}))
    lines = [{"type": "train", "step": 1, "epoch": 0, "loss": 0.5, "lr": 1e-4, "time": 0.1}]
    for c in checkpoints:
        d = f"checkpoints/step-{c['step']:06d}"
        lines.append({"type": "checkpoint", "dir": d, "panel": f"{d}/panel.png", "epoch": 0, **c})
    if status:
        lines.append({"type": "status", "status": status, "error": error, "step": 2})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return run


def _ck(step, mean, coherence=0.5, mn=None, passed=None):
    return {"step": step, "mean": mean, "min": mean - 0.5 if mn is None else mn, "coherence": coherence,
            "passed": mean >= 6.0 if passed is None else passed, "scores": [mean] * 8}


def test_ranks_passing_checkpoints_by_mean_then_coherence(tmp_path):
    _job(tmp_path, "0_lora.rank=4", ["lora.rank=4"], [_ck(10, 5.9), _ck(20, 6.2, coherence=0.4)])
    _job(tmp_path, "1_lora.rank=16", ["lora.rank=16"], [_ck(10, 6.2, coherence=0.8), _ck(20, 7.5, passed=False)])
    _job(tmp_path, "2_lora.rank=32", ["lora.rank=32"], [], status="failed", error="RuntimeError: NaN loss at step 3")
    rows = build_leaderboard(tmp_path)
    top = rows[0]
    # 7.5 does not pass the gate (flag says so) -> the passing 6.2 with the better coherence wins
    assert (top.run.name, top.step, top.mean, top.coherence) == ("1_lora.rank=16", 10, 6.2, 0.8)
    assert (rows[1].run.name, rows[1].step) == ("0_lora.rank=4", 20)
    failed = [r for r in rows if r.status == "failed"]
    assert len(failed) == 1 and "NaN" in failed[0].error and failed[0].mean is None
    assert rows[-1].status == "failed"  # unscored rows sink to the bottom


def test_without_gate_the_highest_mean_wins(tmp_path):
    _job(tmp_path, "0_lora.rank=4", ["lora.rank=4"], [_ck(10, 6.2)])
    _job(tmp_path, "1_lora.rank=16", ["lora.rank=16"], [_ck(10, 7.5, passed=False)])
    assert build_leaderboard(tmp_path, require_pass=False)[0].mean == 7.5
    assert build_leaderboard(tmp_path, objective="coherence")[0].run.name == "0_lora.rank=4"
    with pytest.raises(ValueError, match="objective"):
        build_leaderboard(tmp_path, objective="loss")


def test_story_objective_ranks_by_coherence_alignment_and_copies(tmp_path):
    # rank 4: the higher mean, but its panels are copies (coherence 1.0, copy-paste 1.0);
    # rank 16: a little lower mean, varied and on-prompt. Same gate for both.
    _job(tmp_path, "0_lora.rank=4", ["lora.rank=4"],
         [{**_ck(10, 6.6, coherence=1.0), "clip_t": 0.20, "copy_paste": 1.0}])
    _job(tmp_path, "1_lora.rank=16", ["lora.rank=16"],
         [{**_ck(10, 6.3, coherence=0.85), "clip_t": 0.30, "copy_paste": 0.0}])
    assert build_leaderboard(tmp_path)[0].run.name == "0_lora.rank=4"  # by mean
    rows = build_leaderboard(tmp_path, objective="story")
    assert rows[0].run.name == "1_lora.rank=16"
    assert rows[0].story_objective == pytest.approx(6.3 + 2 * 0.85 + 2 * 0.30)
    assert rows[1].story_objective == pytest.approx(6.6 + 2 * 1.0 + 2 * 0.20 - 5 * 1.0)
    result = write_leaderboard(tmp_path, objective="story")
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert best["run"].endswith("1_lora.rank=16") and best["ranked_by"]["objective"] == "story"
    assert best["ranked_by"]["story"]["copy_paste_weight"] == 5.0 and best["copy_paste"] == 0.0
    header = (tmp_path / "leaderboard.csv").read_text().splitlines()[0].split(",")
    assert {"clip_t", "copy_paste", "story_objective"} <= set(header)
    assert result["best"].clip_t == 0.30
    # the story gate has the floor: a weakest image under it sinks the varied run
    from kolors_story.evaluate.objective import Objective

    floor = build_leaderboard(tmp_path, objective="story", story=Objective(min_floor=6.0))
    assert floor[0].run.name == "0_lora.rank=4"  # min 6.1 >= 6.0; the other's min is 5.8


def test_ema_weights_rank_beside_the_raw_ones_and_render_from_best_yaml(tmp_path):
    from kolors_story.config.saved import resolve_checkpoint

    ema = {"files": {}, "scores": [6.4] * 8, "mean": 6.4, "min": 6.0, "passed": True, "coherence": 0.7,
           "val_loss": 0.12}
    run = _job(tmp_path, "0_lora.rank=4", ["lora.rank=4"], [{**_ck(10, 6.2), "val_loss": 0.13, "ema": ema}])
    rows = build_leaderboard(tmp_path)
    assert [(r.checkpoint, r.mean, r.val_loss) for r in rows] == [
        ("checkpoints/step-000010:ema", 6.4, 0.12), ("checkpoints/step-000010", 6.2, 0.13)]
    folder = run / "checkpoints" / "step-000010"
    folder.mkdir(parents=True)
    for name in ("lora.safetensors", "lora_ema.safetensors"):
        (folder / name).write_bytes(b"x")
    write_leaderboard(tmp_path)
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert best["checkpoint"] == "checkpoints/step-000010:ema" and best["val_loss"] == 0.12
    assert resolve_checkpoint(tmp_path / "best.yaml").lora.name == "lora_ema.safetensors"
    assert resolve_checkpoint(run, "step-000010").lora.name == "lora.safetensors"
    assert resolve_checkpoint(run, "step-000010:ema").lora.name == "lora_ema.safetensors"


def test_writes_csv_markdown_and_best(tmp_path):
    _job(tmp_path, "0_lora.rank=4", ["lora.rank=4"], [_ck(10, 6.1)])
    _job(tmp_path, "1_lora.rank=16", ["lora.rank=16"], [_ck(10, 6.3)])
    (tmp_path / "2_lora.rank=8" / ".hydra").mkdir(parents=True)  # died before writing metrics
    (tmp_path / "2_lora.rank=8" / ".hydra" / "config.yaml").write_text("{}")
    out = write_leaderboard(tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "leaderboard.csv")))
    assert [r["run"] for r in rows] == ["1_lora.rank=16", "0_lora.rank=4", "2_lora.rank=8"]
    assert rows[2]["status"] == "failed" and "died before" in rows[2]["error"]
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert best["run"].endswith("1_lora.rank=16") and best["checkpoint"] == "checkpoints/step-000010"
    assert best["config"] == {"lora": {"rank": 16}} and best["mean"] == 6.3
    md = (tmp_path / "leaderboard.md").read_text()
    assert "1_lora.rank=16/checkpoints/step-000010/panel.png" in md
    assert out["best"].mean == 6.3


def test_torn_metrics_line_is_skipped(tmp_path):
    run = _job(tmp_path, "0_lora.rank=4", ["lora.rank=4"], [_ck(10, 6.1)], status=None)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"type": "checkpoint", "step": 20, "mea')
    rows = build_leaderboard(tmp_path)
    assert len(rows) == 1 and rows[0].step == 10 and rows[0].status == "unknown"


def test_bad_sweep_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_leaderboard(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no job folders"):
        build_leaderboard(tmp_path)


def test_evaluate_sweep_cli_writes_leaderboard_and_wandb_table(tmp_path):
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    sweep = tmp_path / "sweep"
    _job(sweep, "0_lora.rank=4", ["lora.rank=4"], [_ck(10, 6.1)])
    _job(sweep, "1_lora.rank=16", ["lora.rank=16"], [_ck(10, 6.4)])
    out = subprocess.run([sys.executable, "evaluate.py", f"sweep={sweep}", f"hydra.run.dir={tmp_path / 'ev'}"],
                         cwd=REPO, capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "1_lora.rank=16" in out.stdout and "best.yaml" in out.stdout
    assert (sweep / "leaderboard.csv").exists() and (sweep / "best.yaml").exists()
    runs = list(sweep.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1, "the leaderboard is mirrored as one offline W&B run"
    bad = subprocess.run([sys.executable, "evaluate.py", f"sweep={tmp_path / 'nope'}", f"hydra.run.dir={tmp_path / 'ev2'}"],
                         cwd=REPO, capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
