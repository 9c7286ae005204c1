"""Seeing runs without W&B: a run's report.html, curves.png and progress.png; a sweep's report.html
and grid.png; opened in headless Chromium where it is installed (CI installs it)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from kolors_story.config import GridSettings
from kolors_story.errors import MissingFileError, SettingsError
from kolors_story.evaluate.grid import build_grid, grid_figure
from kolors_story.evaluate.leaderboard import run_leaderboard, write_leaderboard
from kolors_story.evaluate.plots import curves_figure, progress_figure, refresh_run_pictures
from kolors_story.evaluate.run_folder import RunFolder
from kolors_story.evaluate.run_report import write_run_report
from kolors_story.records import RunMetrics
from tests.helpers import REPO, compose, settings

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
RANKS, ALPHAS = ("2", "4"), ("1", "8")
FAILED = ("4", "8")  # the (rank, alpha) job that died before its first checkpoint
STEPS, CHECKPOINTS = 6, (3, 6)


def _image(path: Path, colour, size=(32, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _fake_run(sweep: Path, num: int, rank: str, alpha: str) -> Path:
    """A job folder as `train.py -m` leaves it: .hydra/, metrics.jsonl, per checkpoint 8 scenes + a panel."""
    overrides = ["model=tiny", f"lora.rank={rank}", f"lora.alpha={alpha}"]
    run = sweep / f"{num}_lora.rank={rank},lora.alpha={alpha}"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"lora": {"rank": int(rank), "alpha": int(alpha)},
                                                                "scorer": {"threshold": 6.0}}))
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
        {"hydra": {"runtime": {"choices": {"model": "tiny", "lora": "style", "hydra/launcher": "basic"}}}}))
    seed = int(rank) * 10 + int(alpha)
    lines = [{"type": "train", "step": s, "epoch": 0, "loss": round(1.0 / s + seed / 1000, 6), "lr": 1e-4 * s}
             for s in range(1, STEPS + 1)]
    if (rank, alpha) == FAILED:
        lines = lines[:2] + [{"type": "status", "status": "failed", "error": "RuntimeError: NaN loss", "step": 2}]
    else:
        for k, step in enumerate(CHECKPOINTS):
            d = f"checkpoints/step-{step:06d}"
            mean = round(5.5 + seed / 100 + k * 0.3, 4)
            scores = [round(mean + (i - 3.5) / 10, 4) for i in range(8)]
            for i in range(8):
                _image(run / d / f"{i + 1}.png", (30 * i, 4 * seed, 60 * k))
            _image(run / d / "panel.png", (4 * seed, 90, 60 * k), size=(128, 64))
            lines.insert(step + k, {
                "type": "checkpoint", "step": step, "epoch": 0, "dir": d, "panel": f"{d}/panel.png",
                "images": [f"{d}/{i + 1}.png" for i in range(8)], "scores": scores, "mean": mean, "min": min(scores),
                "passed": mean >= 6.0, "coherence": 0.5 + seed / 1000, "clip_t": 0.2 + k / 10, "copy_paste": 0.0,
                "val_loss": 0.3 - k / 100})
        lines.append({"type": "status", "status": "finished", "error": None, "step": STEPS})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


@pytest.fixture()
def fake_sweep(tmp_path) -> Path:
    sweep = tmp_path / "sweep"
    combos = [(r, a) for r in RANKS for a in ALPHAS]
    for num, (rank, alpha) in enumerate(combos):
        _fake_run(sweep, num, rank, alpha)
    return sweep


def _run(sweep: Path, rank: str = "2", alpha: str = "1") -> Path:
    return next(sweep.glob(f"*_lora.rank={rank},lora.alpha={alpha}"))


def _lines(fig, label: str):
    found = [line for ax in fig.axes for line in ax.get_lines() if line.get_label() == label]
    assert len(found) == 1, f"one line labelled {label!r}, found {len(found)}"
    return found[0]


def test_curves_plot_the_numbers_in_metrics_jsonl(fake_sweep):
    run = _run(fake_sweep)
    raw = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in raw if r["type"] == "train"]
    ckpts = [r for r in raw if r["type"] == "checkpoint"]
    fig = curves_figure(RunMetrics.read(run), gate=6.0)
    for label, lines, key in [("loss", train, "loss"), ("lr (right axis)", train, "lr"), ("val loss", ckpts, "val_loss"),
                              ("mean", ckpts, "mean"), ("min", ckpts, "min"), ("CLIP-I (coherence)", ckpts, "coherence"),
                              ("CLIP-T (prompt alignment)", ckpts, "clip_t"), ("copy-paste", ckpts, "copy_paste")]:
        line = _lines(fig, label)
        assert list(line.get_xdata()) == [r["step"] for r in lines], label
        assert list(line.get_ydata()) == [r[key] for r in lines], label
    assert list(_lines(fig, "gate 6").get_ydata()) == [6.0, 6.0]
    paths = refresh_run_pictures(run)
    assert {p.name for p in paths.values()} == {"curves.png", "progress.png"}
    assert all(Image.open(p).size[0] > 500 for p in paths.values())
    assert not list(run.glob(".*.tmp")), "written atomically: no temp file left"


def test_progress_has_one_row_per_checkpoint_labelled_with_step_and_mean(fake_sweep):
    run = RunFolder.read(_run(fake_sweep))
    fig = progress_figure(run)
    ax = fig.axes[0]  # one sheet: a row of scenes per checkpoint, labelled on the y axis
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert rows == [f"step {c.line.step}\nmean {c.line.mean:.3f}" for c in run.checkpoints]
    assert len(rows) == len(CHECKPOINTS)
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"scene {i}" for i in range(1, 9)]
    scores = [t.get_text() for t in ax.texts]
    assert scores == [f"{x:.3f}" for c in run.checkpoints for x in c.line.scores]
    sheet = ax.get_images()[0].get_array()
    assert sheet.shape[0] == len(CHECKPOINTS) * (128 + 128 // 5), "the sheet's height: one row per checkpoint"


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_grid_has_a_labelled_cell_per_combination_with_the_leaderboard_scores(fake_sweep):
    out = write_leaderboard(fake_sweep)
    board = _csv(fake_sweep / "leaderboard.csv")
    grid = build_grid(out["rows"], GridSettings(x="lora.rank", y="lora.alpha"), fake_sweep)
    fig = grid_figure(grid)
    cells = {ax.get_label(): ax for ax in fig.axes}
    assert set(cells) == {f"{r}|{a}" for r in RANKS for a in ALPHAS}, "one cell per combination"
    for rank in RANKS:
        for alpha in ALPHAS:
            label = cells[f"{rank}|{alpha}"].get_xlabel()
            if (rank, alpha) == FAILED:
                assert label == "failed"
                continue
            best = next(r for r in board if r["run"] == _run(fake_sweep, rank, alpha).name)  # its best-ranked row
            assert label.startswith(f"mean {best['mean']}  min {best['min']}\n{Path(best['checkpoint']).name}")
    assert [ax.get_title() for ax in fig.axes[:2]] == ["lora.rank=2", "lora.rank=4"]
    assert [fig.axes[i].get_ylabel() for i in (0, 2)] == ["lora.alpha=1", "lora.alpha=8"]
    # one scene of the last checkpoint, a single row: the scene's own score under each image; two runs
    # share each alpha (rank was swept too), so a cell shows the better-ranked one and says so
    one = build_grid(out["rows"], GridSettings(x="lora.alpha", scene=3, checkpoint="last"), fake_sweep)
    cell = one.cell("1", None)
    scores = RunMetrics.read(cell.run).checkpoints[-1].scores
    assert cell.image == cell.run / "checkpoints/step-000006/3.png"
    assert cell.label.startswith(f"scene 3: {scores[2]:.3f}") and cell.label.endswith("best of 2 runs")


def test_evaluate_sweep_writes_the_grid_report_and_run_reports(fake_sweep, tmp_path):
    job = settings("evaluate", [f"sweep='{fake_sweep}'", "logger=none", "grid.x=lora.rank", "grid.y=lora.alpha"])
    result = run_leaderboard(job)
    assert result["paths"]["grid"] == fake_sweep / "grid.png" and result["paths"]["report"] == fake_sweep / "report.html"
    html = (fake_sweep / "report.html").read_text()
    for row in _csv(fake_sweep / "leaderboard.csv"):
        assert f">{row['run']}</td>" in html and f">{row['story_objective']}</td>" in html
    assert "grid.png" in html and "loss_curves.png" in html and "Ranked by the highest mean aesthetic score" in html
    for run in fake_sweep.glob("*_lora.rank=*"):
        assert (run / "report.html").is_file() and (run / "curves.png").is_file() and (run / "progress.png").is_file()
    with pytest.raises(SettingsError) as err:
        run_leaderboard(settings("evaluate", [f"sweep='{fake_sweep}'", "logger=none", "grid.x=lora.dropout",
                                              f"output_dir={tmp_path / 'elsewhere'}"]))
    message = str(err.value)
    assert "grid.x=lora.dropout" in message and "lora.alpha, lora.rank" in message and "\n" not in message
    assert not (tmp_path / "elsewhere").exists(), "a bad grid key fails before anything is written"
    with pytest.raises(SettingsError, match="grid.y=lora.rank needs grid.x"):
        run_leaderboard(settings("evaluate", [f"sweep='{fake_sweep}'", "logger=none", "grid.y=lora.rank"]))


def test_a_broken_run_still_gets_a_report_that_says_what_is_missing(fake_sweep):
    run = _run(fake_sweep)
    (run / "checkpoints" / "step-000003" / "panel.png").unlink()
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text[: len(text) - 25])  # killed mid-write: the status line is torn
    html = write_run_report(run).read_text()
    assert "Missing or damaged" in html
    assert "panel" in html and "step-000003/panel.png is missing" in html
    assert "1 unreadable line(s)" in html and "no status line" in html
    assert 'src="checkpoints/step-000006/panel.png"' in html, "what is there is still shown"
    # a job that died before writing metrics: the report says so instead of failing
    (run / "metrics.jsonl").unlink()
    html = write_run_report(run).read_text()
    assert "no metrics.jsonl" in html and (run / "curves.png").is_file()


def test_evaluate_report_command(fake_sweep, tmp_path):
    from kolors_story.cli import evaluate_from_config

    run = _run(fake_sweep, "4", "1")
    out = evaluate_from_config(compose("evaluate", [f"report='{run}'"]))
    assert out["report"] == run / "report.html" and "lora.rank" in out["report"].read_text()
    with pytest.raises(MissingFileError, match="sweep="):
        evaluate_from_config(compose("evaluate", [f"report='{fake_sweep}'"]))


# ---------------------------------------------------------------- a real tiny sweep, in headless Chromium

FAST = ["model=tiny", "dataset=demo", "filter=none", "trainer.max_epochs=1", "trainer.steps_per_epoch=2",
        "trainer.checkpoint_every_n_steps=2", "sampler.steps=2", "trainer.progress_bar=false", "logger=none"]
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1600"]


def _browser(profile: Path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*BROWSER_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def _open(driver, page: Path) -> list:
    """Load ``page`` and wait for its images; returns [src, naturalWidth] of each."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(page.as_uri())
    WebDriverWait(driver, 20).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"))
    return driver.execute_script("return Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth])")


def _not_blank(png: bytes) -> bool:
    import io

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    return pixels.std() > 10 and (pixels < 200).mean() > 0.01  # a blank page: one grey level, std 0


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()), reason="needs chromium + chromium-driver")
def test_reports_of_a_real_tiny_sweep_open_in_a_browser(tmp_path, tiny_model_dir):
    sweep = tmp_path / "sweep"
    env = dict(os.environ)
    for cmd in ([sys.executable, "train.py", "-m", *FAST, f"data_dir={tmp_path / 'data'}", "lora.rank=2,4",
                 f"hydra.sweep.dir={sweep}"],
                [sys.executable, "evaluate.py", f"sweep={sweep}", "grid.x=lora.rank", "model=tiny", "logger=none",
                 f"hydra.run.dir={tmp_path / 'evaluate'}"]):
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-2000:])
    runs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert len(runs) == 2 and (sweep / "grid.png").is_file()
    pages = [sweep / "report.html", *(run / "report.html" for run in runs)]
    driver = _browser(tmp_path / "chromium-profile")
    try:
        for page in pages:
            images = _open(driver, page)
            assert images and all(width > 0 for _, width in images), f"{page}: images that did not load: {images}"
            assert _not_blank(driver.get_screenshot_as_png()), f"{page}: blank screenshot"
            if page.parent == sweep:
                shown = driver.execute_script(
                    "return Array.from(document.querySelectorAll('#leaderboard-table tbody tr'))"
                    ".map(r => Array.from(r.cells).slice(1).map(c => c.textContent))")
                with open(sweep / "leaderboard.csv", newline="") as f:
                    assert shown == list(csv.reader(f))[1:], "the page shows leaderboard.csv as written"
                assert any(src.endswith("grid.png") for src, _ in images)
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)
