"""`evaluate.py images=<dir>`: which files are scored, scores.json, the table, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from kolors_story.cli import evaluate_from_config
from kolors_story.evaluate.folder import (
    EvaluationError,
    StoryLengthWarning,
    evaluate_images,
    find_images,
)
from kolors_story.evaluate.scorer import AestheticScorer
from tests.helpers import REPO, compose
from tests.test_scoring import varied_images, write_images


@pytest.fixture(scope="module")
def scorer(tiny_scorer_dir) -> AestheticScorer:
    return AestheticScorer.from_pretrained(tiny_scorer_dir, batch_size=4)


def story_folder(folder: Path, panel: bool = True) -> Path:
    """A generate-run-like folder: 1.png..8.png (mixed formats), panel.png, a json and a hidden temp file."""
    write_images(folder)
    if panel:
        Image.new("RGB", (128, 256), "white").save(folder / "panel.png")
    (folder / "manifest.json").write_text("{}")
    Image.new("RGB", (8, 8)).save(folder / ".1.png.tmp.png")  # an interrupted atomic write: skipped
    return folder


def _run(args, cwd):
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *args], cwd=cwd, capture_output=True,
                          text=True, env=dict(os.environ), timeout=600)


# ---------------------------------------------------------------------------- which files


def test_numbered_images_in_numeric_order_and_others_ignored(tmp_path):
    for name in ["10.png", "2.jpg", "1.png", "panel.png", "9.webp", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    images, ignored = find_images(tmp_path)
    assert [p.name for p in images] == ["1.png", "2.jpg", "9.webp", "10.png"]
    assert [p.name for p in ignored] == ["panel.png"]


def test_unnumbered_images_in_alphabetical_order(tmp_path):
    for name in ["b.png", "C.jpg", "a.jpeg", "readme.md"]:
        (tmp_path / name).write_bytes(b"")
    images, ignored = find_images(tmp_path)
    assert [p.name for p in images] == ["a.jpeg", "b.png", "C.jpg"] and ignored == []


# ---------------------------------------------------------------------------- results


def test_evaluate_images_scores_the_story(tmp_path, scorer):
    folder = story_folder(tmp_path / "run")
    r = evaluate_images(folder, scorer, threshold=6.0)
    assert r["images"] == [name for name, _ in varied_images()]  # 1.png .. 8.jpg, panel.png left out
    assert r["ignored"] == ["panel.png"]
    assert r["n_images"] == 8 and r["story_complete"] and r["warnings"] == []
    expected = scorer.score([Image.open(folder / n) for n in r["images"]])
    assert r["scores"] == pytest.approx(expected, abs=1e-6)
    assert r["mean"] == pytest.approx(sum(expected) / 8) and r["min"] == pytest.approx(min(expected))
    assert r["passed"] is False  # a random predictor scores ~0, far below 6.0
    assert evaluate_images(folder, scorer, threshold=-1.0)["passed"] is True
    assert 0 < r["coherence"] < 1 and 1 <= r["outlier"] <= 8
    assert r["outlier_image"] == r["images"][r["outlier"] - 1]
    assert [row["index"] for row in r["per_image"]] == list(range(1, 9))
    assert r["scorer"]["tiny"] is True and "tiny" in r["note"]


def test_explicit_paths_keep_the_given_order(tmp_path, scorer):
    paths = write_images(tmp_path)
    r = evaluate_images(list(reversed(paths)), scorer)
    assert r["images"] == [p.name for p in reversed(paths)]


def test_fewer_than_eight_images_are_scored_with_a_warning(tmp_path, scorer):
    write_images(tmp_path, varied_images()[:3])
    with pytest.warns(StoryLengthWarning, match="needs exactly 8"):
        r = evaluate_images(tmp_path, scorer)
    assert len(r["scores"]) == 3 and r["story_complete"] is False and "needs exactly 8" in r["warnings"][0]
    write_images(tmp_path / "one", varied_images()[:1])
    with pytest.warns(StoryLengthWarning):
        r = evaluate_images(tmp_path / "one", scorer)
    assert len(r["scores"]) == 1 and r["coherence"] is None and r["outlier"] is None


# ---------------------------------------------------------------------------- bad input


def test_missing_folder_and_file_instead_of_folder(tmp_path, scorer):
    with pytest.raises(EvaluationError, match="no such folder") as err:
        evaluate_images(tmp_path / "nope", scorer)
    assert str(tmp_path / "nope") in str(err.value)
    (tmp_path / "1.png").write_bytes(b"")
    with pytest.raises(EvaluationError, match="is a file"):
        evaluate_images(tmp_path / "1.png", scorer)


def test_empty_folder_points_to_subfolders_with_images(tmp_path, scorer):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(EvaluationError, match="no image files"):
        evaluate_images(tmp_path, scorer)
    write_images(tmp_path / "checkpoints" / "step-000050", varied_images()[:2])
    with pytest.raises(EvaluationError, match="step-000050"):
        evaluate_images(tmp_path, scorer)


def test_unreadable_images_are_all_named(tmp_path, scorer):
    paths = write_images(tmp_path)
    paths[2].write_bytes(b"this is not a jpeg")
    data = paths[5].read_bytes()
    paths[5].write_bytes(data[: len(data) // 2])  # truncated PNG
    with pytest.raises(EvaluationError) as err:
        evaluate_images(tmp_path, scorer)
    msg = str(err.value)
    assert "2 unreadable image(s)" in msg and str(paths[2]) in msg and str(paths[5]) in msg
    with pytest.raises(EvaluationError, match="not found"):
        evaluate_images([tmp_path / "missing.png"], scorer)


# ---------------------------------------------------------------------------- the config-driven job


def test_evaluate_from_config_writes_scores_json_beside_the_images(tmp_path, tiny_scorer_dir, capsys):
    folder = story_folder(tmp_path / "run")
    (folder / "scores.json").write_text('{"old": true}')  # replaced, atomically
    result = evaluate_from_config(compose("evaluate", ["model=tiny", f"images={folder}", "scorer.batch_size=8"]))
    saved = json.loads((folder / "scores.json").read_text())
    assert saved["scores"] == pytest.approx(result["scores"]) and len(saved["scores"]) == 8
    assert "old" not in saved and saved["threshold"] == 6.0 and saved["passed"] is False
    assert not [p for p in folder.iterdir() if p.name.startswith(".scores.json")]  # no temp file left
    out = capsys.readouterr().out
    assert "8.jpg" in out and "FAIL" in out and "most out-of-style" in out and "panel.png" in out

    other = tmp_path / "elsewhere"
    evaluate_from_config(compose("evaluate", ["model=tiny", f"images={folder}", f"output_dir={other}"]))
    assert len(json.loads((other / "scores.json").read_text())["scores"]) == 8


def test_evaluate_from_config_needs_images():
    with pytest.raises(EvaluationError, match="Nothing to evaluate"):
        evaluate_from_config(compose("evaluate", ["model=tiny"]))


def test_folder_errors_come_before_loading_the_scorer(tmp_path):
    # model=kolors: the real weights are absent, yet the folder problem is what gets reported
    with pytest.raises(EvaluationError, match="no image files"):
        evaluate_from_config(compose("evaluate", [f"images={tmp_path}", f"scorer.path={tmp_path / 'absent'}"]))


@pytest.mark.slow
def test_cli_tiny_end_to_end(tmp_path, tiny_scorer_dir):
    folder = story_folder(tmp_path / "story")
    out = _run(["model=tiny", f"images={folder}", f"hydra.run.dir={tmp_path / 'hydra'}"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    saved = json.loads((folder / "scores.json").read_text())
    assert len(saved["scores"]) == 8 and saved["images"][0] == "1.png" and saved["ignored"] == ["panel.png"]
    assert isinstance(saved["coherence"], float) and "mean" in out.stdout and "Wrote" in out.stdout


def test_cli_bad_input_exits_non_zero_with_a_message(tmp_path):
    missing = tmp_path / "no-such-story"
    out = _run([f"images={missing}", f"hydra.run.dir={tmp_path / 'hydra'}"], cwd=tmp_path)
    assert out.returncode != 0
    assert "error:" in out.stderr and str(missing) in out.stderr and "Traceback" not in out.stderr
    # a folder of images but no real weights: the download command is named
    folder = story_folder(tmp_path / "story")
    out = _run([f"images={folder}", f"scorer.path={tmp_path / 'weights'}", f"hydra.run.dir={tmp_path / 'h2'}"],
               cwd=tmp_path)
    assert out.returncode != 0 and "python -m kolors_story.download scorer" in out.stderr
    assert not (folder / "scores.json").exists()
