"""Section ``peers`` (``python -m kolors_story.bench --only peers``): this project against what its
users would otherwise run, on the same full-size random Kolors folder (Kolors' real UNet and VAE,
ChatGLM3 at its real width with 2 of 28 layers, the real tokenizer; fp16 files, run in float32 on
the CPU at 256², LoRA rank 16 on the attention projections, gradient checkpointing, batch 1):

- the LoRA training step: ``train.py stage=train`` (from its latent/embedding cache, built once
  before the timing) vs DiffSynth-Studio 1.1.9's Kolors LoRA trainer (``bench.peers_run diffsynth``),
  the median step after warm-up (the time between consecutive optimizer steps' ends);
- the story of 8 scenes, 4 steps, cfg 4: ``generate.py`` vs diffusers' ``KolorsPipeline`` called once
  per scene with the same prompts, negatives and seeds (the seeds' loop, ``bench.peers_run loop``),
  the whole process; the two stories' images must agree.

Every run is a whole process of its own, A/B alternated (A B B A ...). Memory is the process's peak
anonymous memory (RssAnon sampled every 50 ms: what it allocated, without the file pages of weights
it has mapped, which the kernel can drop), in GiB; peak RSS is kept beside it. The ratios are this
project / the peer; each has a goal (``GOALS``) and the bench exits non-zero when one is missed.
Not in the test suite (about 20 minutes on a 2-core CPU, 16 GB of RAM, 7 GB of disk for the folder).
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kolors_story import tiny
from kolors_story.bench.peers_run import PARTS
from kolors_story.bench.timing import BenchContext, BenchError, compose_settings, proc_status

GIB = 2**30
SIZE = 256
RANK, ALPHA = 16, 4.0
STORY, STORY_STEPS, STORY_CFG = "ink_dream", 4, 4.0
# Training steps: the first (its interval holds the loading), WARMUP_STEPS more and the last (the
# project saves its LoRA there) are not measured.
WARMUP_STEPS, MEASURED_STEPS = 1, 4
TRAIN_STEPS = 1 + WARMUP_STEPS + MEASURED_STEPS + 1
TRAIN_PAIRS, STORY_PAIRS = 2, 1  # A/B pairs of whole processes
IMAGES = 8  # the training set: the demo drawings at 256², captioned with the story's prompts
PIXEL_LEVELS = 2  # the two stories' images agree within this many 8-bit levels
# (time, memory) ratio this project / the peer may reach at most: the lead measured when the section
# was written (training 0.74x / 0.79x, story 0.91x / 1.08x before the CPU generation defaults).
GOALS = {"training step": (0.75, 0.80), "story": (0.90, 0.90)}
SAMPLE_S = 0.05


@dataclass
class ProcessRun:
    """One whole process: wall time, peak anonymous memory and peak RSS, and its exit."""

    seconds: float
    peak_anon_gib: float
    peak_rss_gib: float
    returncode: int
    log: str

    def check(self, what: str) -> None:
        if self.returncode != 0:
            raise BenchError(f"peers: {what} exited with {self.returncode}; its log: {self.log}")


def run_process(cmd: list[str], log: Path, cwd: Path | None = None, env: dict | None = None) -> ProcessRun:
    """Run ``cmd`` to its end, sampling its memory every 50 ms."""
    peaks = {"RssAnon": 0, "VmHWM": 0}
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)

        def sample() -> None:
            while proc.poll() is None:
                for key, value in proc_status(tuple(peaks), proc.pid).items():
                    peaks[key] = max(peaks[key], value)
                time.sleep(SAMPLE_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        returncode = proc.wait()
        sampler.join()
    return ProcessRun(seconds=time.perf_counter() - t0, peak_anon_gib=peaks["RssAnon"] / GIB,
                      peak_rss_gib=peaks["VmHWM"] / GIB, returncode=returncode, log=str(log))


def _env(workdir: Path) -> dict:
    env = dict(os.environ)
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               WANDB_DIR=str(workdir), KOLORS_STORY_CACHE=str(workdir / "cache"))
    return env


def repo_root() -> Path:
    """The checkout holding train.py and generate.py (the bench runs the real entry points)."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "train.py").is_file():
        raise BenchError(f"peers: train.py and generate.py are not in {root}: run the bench from a checkout "
                         "(pip install -e .)")
    return root


def _warm_page_cache(folder: Path) -> None:
    """Read every weight file once, so no process of the comparison pays the first read from disk."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.stat().st_size > 1 << 20:
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass


def write_dataset(folder: Path, captions: list[str]) -> Path:
    """The training images once, for both trainers: ``<n>.png`` + ``<n>.txt`` (this project's folder
    dataset) and ``train/metadata.csv`` (DiffSynth's ``TextImageDataset``) naming the same files."""
    train = folder / "train"
    train.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(IMAGES):
        image, _ = tiny.draw_demo_image(i, SIZE, SIZE)
        name = f"{i:02d}.png"
        image.save(train / name)
        (train / f"{i:02d}.txt").write_text(captions[i % len(captions)], encoding="utf-8")
        rows.append({"file_name": name, "text": captions[i % len(captions)]})
    with open(train / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["file_name", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return train


def _model_overrides(model: Path) -> list[str]:
    return ["model=kolors", f"model.path={model}", "model.vae_path=null", "model.device=cpu", "model.dtype=float32",
            f"model.resolution={SIZE}"]


def train_overrides(model: Path, dataset: Path, work: Path, stage: str, run_dir: Path) -> list[str]:
    """train.py's settings for the comparison: DiffSynth's setup (rank, alpha, size, fp32, checkpointing, batch 1)."""
    steps = TRAIN_STEPS
    return [*_model_overrides(model), "dataset=folder", f"dataset.path={dataset}", "dataset.name=peers", "filter=none",
            f"lora.rank={RANK}", f"lora.alpha={ALPHA}", "trainer.precision=32", "trainer.accelerator=cpu",
            "trainer.gradient_checkpointing=true", "trainer.batch_size=1", f"trainer.max_steps={steps}",
            f"trainer.steps_per_epoch={steps}", "trainer.checkpoint_every_n_steps=100000",
            "trainer.save_formats=[diffusers]", "trainer.progress_bar=false", "validate=false", "before_after=false",
            f"stage={stage}", f"data_dir={work / 'data'}", f"hydra.run.dir={run_dir}"]


def project_train_cmd(overrides: list[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "kolors_story.bench.peers_run", "train", "--out", str(out), *overrides]


def diffsynth_train_cmd(model: Path, dataset: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "kolors_story.bench.peers_run", "diffsynth",
            "--unet", str(model / "unet" / "diffusion_pytorch_model.fp16.safetensors"),
            "--text-encoder", str(model / "text_encoder"),
            "--vae", str(model / "vae" / "diffusion_pytorch_model.fp16.safetensors"),
            "--dataset", str(dataset.parent), "--max-steps", str(TRAIN_STEPS),
            "--rank", str(RANK), "--alpha", str(ALPHA), "--size", str(SIZE), "--out", str(out)]


def project_story_cmd(model: Path, out_dir: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "generate.py", *_model_overrides(model), f"story={STORY}", f"sampler.steps={STORY_STEPS}",
            f"sampler.cfg={STORY_CFG}", f"output_dir={out_dir}", f"hydra.run.dir={run_dir}"]


def loop_story_cmd(model: Path, scenes: Path, out_dir: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "kolors_story.bench.peers_run", "loop", "--model", str(model), "--scenes", str(scenes),
            "--out-dir", str(out_dir), "--steps", str(STORY_STEPS), "--cfg", str(STORY_CFG), "--size", str(SIZE),
            "--out", str(out)]


def _steps(measured: dict) -> dict:
    """A training process's step times after warm-up, their median, and the median seconds of each part."""
    steps = measured_steps(measured["step_ends"])
    kept = measured["step_parts"][1 + WARMUP_STEPS:-1]
    parts = {k: _median([p[k] for p in kept if k in p]) for k in PARTS if any(k in p for p in kept)}
    return {"step_seconds": steps, "step_median": _median(steps), "parts": parts}


def measured_steps(step_ends: list[float]) -> list[float]:
    """Seconds per step after warm-up, from the times the steps ended."""
    intervals = [b - a for a, b in zip(step_ends, step_ends[1:])]
    if len(step_ends) != TRAIN_STEPS:
        raise BenchError(f"peers: {len(step_ends)} training steps ended (expected {TRAIN_STEPS})")
    return intervals[WARMUP_STEPS:-1]


def max_pixel_diff(a_dir: Path, b_dir: Path, n: int) -> int:
    import numpy as np
    from PIL import Image

    worst = 0
    for i in range(1, n + 1):
        a = np.asarray(Image.open(a_dir / f"{i}.png").convert("RGB"), dtype=np.int16)
        b = np.asarray(Image.open(b_dir / f"{i:02d}.png").convert("RGB"), dtype=np.int16)
        worst = max(worst, int(np.abs(a - b).max()))
    return worst


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _row(name: str, peer: str, peer_runs: list[dict], ours: list[dict], time_key: str) -> dict:
    """One table row: medians of each side, the ratios this project / the peer and whether they meet
    their goal."""
    time_goal, memory_goal = GOALS[name]
    t_peer, t_ours = _median([r[time_key] for r in peer_runs]), _median([r[time_key] for r in ours])
    m_peer, m_ours = max(r["peak_anon_gib"] for r in peer_runs), max(r["peak_anon_gib"] for r in ours)
    ratios = {"time": t_ours / t_peer, "memory": m_ours / m_peer}
    return {"name": name, "peer": peer, "peer_seconds": t_peer, "seconds": t_ours, "peer_peak_anon_gib": m_peer,
            "peak_anon_gib": m_ours, "peer_peak_rss_gib": max(r["peak_rss_gib"] for r in peer_runs),
            "peak_rss_gib": max(r["peak_rss_gib"] for r in ours), "ratios": ratios,
            "goals": {"time": time_goal, "memory": memory_goal},
            "met": {"time": ratios["time"] <= time_goal, "memory": ratios["memory"] <= memory_goal},
            "peer_parts": _median_parts(peer_runs), "parts": _median_parts(ours), "peer_runs": peer_runs, "runs": ours}


def _median_parts(runs: list[dict]) -> dict[str, float] | None:
    """Each part's median seconds over the runs (training rows only)."""
    if not all("parts" in r for r in runs):
        return None
    return {k: _median([r["parts"][k] for r in runs if k in r["parts"]]) for k in runs[0]["parts"]}


def _alternated(pairs: int, peer, ours) -> tuple[list[dict], list[dict]]:
    """``peer()`` and ``ours()`` as peer, ours, ours, peer, ... (drifts in load hit both)."""
    peer_runs, our_runs = [], []
    for i in range(pairs):
        order = ((peer, peer_runs), (ours, our_runs)) if i % 2 == 0 else ((ours, our_runs), (peer, peer_runs))
        for fn, out in order:
            out.append(fn(len(peer_runs) + len(our_runs)))
    return peer_runs, our_runs


def compare_training(ctx: BenchContext, model: Path, scenes: list, root: Path, env: dict) -> dict:
    """Training steps on a dataset of the story's scene prompts (one image each)."""
    work = ctx.workdir / "peers-train"
    dataset = write_dataset(work / "dataset", [s.prompt for s in scenes])
    ctx.log("peers: this project's data stage and cache (once, not timed) ...")
    prep = run_process([sys.executable, "train.py", *train_overrides(model, dataset, work, "data", work / "run-data")],
                       work / "data.log", root, env)
    prep.check("train.py stage=data")

    def peer(n: int) -> dict:
        ctx.log("peers: a DiffSynth 1.1.9 training run ...")
        out = work / f"diffsynth-{n}.json"
        run = run_process(diffsynth_train_cmd(model, dataset, out), work / f"diffsynth-{n}.log", root, env)
        run.check("DiffSynth's trainer")
        return {**asdict(run), **_steps(json.loads(out.read_text()))}

    def ours(n: int) -> dict:
        ctx.log("peers: a train.py stage=train run ...")
        out = work / f"train-{n}.json"
        overrides = train_overrides(model, dataset, work, "train", work / f"run-{n}")
        run = run_process(project_train_cmd(overrides, out), work / f"train-{n}.log", root, env)
        run.check("train.py stage=train")
        return {**asdict(run), **_steps(json.loads(out.read_text()))}

    peer_runs, our_runs = _alternated(TRAIN_PAIRS, peer, ours)
    row = _row("training step", "DiffSynth-Studio 1.1.9 Kolors LoRA trainer", peer_runs, our_runs, "step_median")
    row["data_stage"] = asdict(prep)
    return row


def _story_scenes():
    from kolors_story.story import story_scenes

    job = compose_settings("generate", ["model=kolors", f"story={STORY}"])
    return story_scenes(job.story, job.sampler)


def compare_story(ctx: BenchContext, model: Path, scenes: list, root: Path, env: dict) -> dict:
    work = ctx.workdir / "peers-story"
    work.mkdir(parents=True, exist_ok=True)
    scenes_file = work / "scenes.json"
    scenes_file.write_text(json.dumps([{"prompt": s.prompt, "negative": s.negative, "seed": s.seed} for s in scenes],
                                      ensure_ascii=False), encoding="utf-8")
    dirs = {}

    def peer(n: int) -> dict:
        ctx.log("peers: the seeds' loop (KolorsPipeline, one call per scene) ...")
        dirs["peer"] = work / f"loop-{n}"
        run = run_process(loop_story_cmd(model, scenes_file, dirs["peer"], work / f"loop-{n}.json"),
                          work / f"loop-{n}.log", root, env)
        run.check("the KolorsPipeline loop")
        return asdict(run)

    def ours(n: int) -> dict:
        ctx.log("peers: generate.py ...")
        dirs["ours"] = work / f"story-{n}"
        run = run_process(project_story_cmd(model, dirs["ours"], work / f"hydra-{n}"), work / f"story-{n}.log", root, env)
        run.check("generate.py")
        return asdict(run)

    peer_runs, our_runs = _alternated(STORY_PAIRS, peer, ours)
    row = _row("story", "diffusers KolorsPipeline, one call per scene (the seeds' loop)", peer_runs, our_runs, "seconds")
    row["max_pixel_diff"] = max_pixel_diff(dirs["ours"], dirs["peer"], len(scenes))
    if row["max_pixel_diff"] > PIXEL_LEVELS:
        raise BenchError(f"peers: generate.py and the loop drew different stories (up to {row['max_pixel_diff']} "
                         f"levels apart, tolerance {PIXEL_LEVELS}): the comparison would not be of the same work")
    return row


def scene_batches(ctx: BenchContext, model: Path, root: Path, env: dict) -> dict[str, float]:
    """Seconds per scene of a denoising call at scene batch 1, 2, 4, 8 (one process)."""
    ctx.log("peers: seconds per scene of a UNet call at scene batch 1, 2, 4, 8 ...")
    out = ctx.workdir / "scene-batches.json"
    cmd = [sys.executable, "-m", "kolors_story.bench.peers_run", "scene-batches", "--model", str(model),
           "--size", str(SIZE), "--repeats", "1", "--out", str(out)]
    run_process(cmd, ctx.workdir / "scene-batches.log", root, env).check("the scene-batch timing")
    return json.loads(out.read_text())


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def section_peers(ctx: BenchContext) -> dict:
    if ctx.quick:
        raise BenchError("peers runs on the full-size folder only (DiffSynth does not load a tiny Kolors): "
                         "python -m kolors_story.bench --only peers")
    root = repo_root()
    folder = ctx.model_cache / f"peers-kolors-v{tiny.model_version('peers')}"
    if not (folder / "PEERS_MODEL.json").exists():
        ctx.log(f"peers: building the full-size random Kolors folder into {folder} (once, ~7 GB) ...")
    model = tiny.build_model(folder, "peers")
    _warm_page_cache(model)
    env = _env(ctx.workdir)
    scenes = _story_scenes()
    rows = [compare_training(ctx, model, scenes, root, env), compare_story(ctx, model, scenes, root, env)]
    per_scene = scene_batches(ctx, model, root, env)
    goals = [{"row": r["name"], "measure": k, "ratio": r["ratios"][k], "goal": r["goals"][k], "met": r["met"][k]}
             for r in rows for k in ("time", "memory")]
    return {"cpu": _cpu_name(), "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
            "setup": {"size": SIZE, "dtype": "float32", "lora_rank": RANK, "lora_alpha": ALPHA,
                      "gradient_checkpointing": True, "story": STORY, "steps": STORY_STEPS, "cfg": STORY_CFG,
                      "text_encoder_layers": 2, "warmup_steps": WARMUP_STEPS, "measured_steps": MEASURED_STEPS},
            "rows": rows, "goals": goals, "scene_batch_seconds_per_scene": per_scene}
