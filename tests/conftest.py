"""Shared fixtures: an offline, CPU-only environment and one tiny Kolors per test session."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

# MKL picks matmul kernels by memory layout; fixing the code path makes CPU results bit-exact
# across otherwise-equal computations (e.g. a LoRA at scale 0 vs no LoRA).
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")
# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads of
# parallel test subprocesses (DDP, sweeps) slow each other down many times over.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

pytest_plugins = ["tests.train_fixtures"]  # tiny_batches, story
import torch  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def offline_env(tmp_path_factory):
    """No network, W&B offline into a temp dir, the tiny model cache in a temp dir."""
    root = tmp_path_factory.mktemp("env")
    env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(root / "wandb"),
        "WANDB_DATA_DIR": str(root / "wandb-data"),
        "WANDB_CACHE_DIR": str(root / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(root / "wandb-config"),
        "WANDB_SILENT": "true",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "KOLORS_STORY_CACHE": os.environ.get("KOLORS_STORY_TEST_CACHE", str(root / "cache")),
        # model=tiny's defaults are the pre-trained model and the paper-taste scorer (the demo); the
        # code-path tests run on the random ones (tests/test_learning.py uses the pre-trained model)
        "KOLORS_STORY_TINY_WEIGHTS": "random",
        "KOLORS_STORY_TINY_TASTE": "none",
    }
    for key in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # Tiny models: one thread beats two (threading overhead; and CI may share its 2 cores).
    torch.set_num_threads(1)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_model_dir(offline_env) -> Path:
    """The tiny Kolors in the Kwai-Kolors/Kolors layout, where `model=tiny` looks for it."""
    from kolors_story.tiny.kolors import ensure_tiny_model

    return ensure_tiny_model(Path(offline_env["KOLORS_STORY_CACHE"]) / "tiny-kolors-random-seed0", seed=0, layout="kolors")


@pytest.fixture(scope="session")
def tiny_diffusers_dir(offline_env) -> Path:
    """The same tiny Kolors in the Kolors-diffusers layout (model_index.json, tokenizer/, fp16 files)."""
    from kolors_story.tiny.kolors import ensure_tiny_model

    return ensure_tiny_model(Path(offline_env["KOLORS_STORY_CACHE"]) / "tiny-kolors-diffusers", seed=0, layout="diffusers")


@pytest.fixture(scope="session")
def tiny_scorer_dir(offline_env) -> Path:
    """The tiny aesthetic predictor where `model=tiny` looks for it (real weights' folder layout)."""
    from kolors_story.tiny.scorer import ensure_tiny_scorer

    return ensure_tiny_scorer(Path(offline_env["KOLORS_STORY_CACHE"]) / "tiny-aesthetics-none-seed0", seed=0)


@pytest.fixture()
def tiny_pipe(tiny_model_dir):
    """A fresh tiny pipeline (fp32, CPU) per test: tests may add LoRAs to it."""
    from kolors_story.models.loading import load_pipeline

    return load_pipeline(tiny_model_dir)


@pytest.fixture
def offline_guard(monkeypatch):
    """Record every subprocess and refuse every non-loopback connection in this process."""
    spawned, connects = [], []
    real_popen, real_connect = subprocess.Popen.__init__, socket.socket.connect

    def popen(self, args, *a, **kw):
        spawned.append(args)
        return real_popen(self, args, *a, **kw)

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            connects.append(address)
            raise OSError("network blocked by the test")
        return real_connect(sock, address)

    monkeypatch.setattr(subprocess.Popen, "__init__", popen)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return spawned, connects
