"""The competition's aesthetic score, batched, plus a story-coherence score from the same forward.

The competition scores each image with simple-aesthetics-predictor's ``AestheticsPredictorV2Linear``
(a CLIP ViT-L/14 vision tower + an MLP head) and the ``CLIPProcessor`` stored beside its weights
(``aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE``), one image at a time
(see ``seeds/competition-readme-en.md``). :class:`AestheticScorer` loads the same two objects
through the same ``from_pretrained`` calls and runs them over batches; since the processor works
per image and the network has no cross-sample interaction, the numbers equal the one-by-one loop
(``tests/test_scoring.py`` checks this against the seeds' loop written out verbatim).

The predictor's forward divides the CLIP image embedding by its norm *in place* and returns that
normalised embedding as ``hidden_states``: :meth:`AestheticScorer.embed` takes it from there, so
the coherence score costs no second forward pass.

Without the real weights, :func:`ensure_tiny_scorer` builds a tiny randomly initialised predictor
of the same classes, saved in the same folder layout (config.json, model.safetensors,
preprocessor_config.json, tokenizer files) and loaded through the same code. Its scores are
near 0 and meaningless: it only exercises the code paths.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch/transformers are imported on use: a bad path is reported in a second
    import torch

DOWNLOAD_COMMAND = "python -m kolors_story.download scorer"
REAL_FOLDER_NAME = "aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE"

# Bump when the tiny predictor below changes, so cached copies are rebuilt.
TINY_SCORER_VERSION = 1
TINY_STAMP = "TINY_SCORER.json"

# The real predictor's config.json: OpenAI CLIP ViT-L/14's vision tower (what
# AestheticsPredictorV2Linear subclasses) with a 768-d projection feeding the MLP head.
REAL_PREDICTOR_CONFIG = {
    "architectures": ["AestheticsPredictorV2Linear"],
    "model_type": "clip_vision_model",
    "attention_dropout": 0.0,
    "hidden_act": "quick_gelu",
    "hidden_size": 1024,
    "image_size": 224,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "num_attention_heads": 16,
    "num_channels": 3,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 768,
}

# OpenAI CLIP ViT-L/14 preprocessing (openai/clip-vit-large-patch14's preprocessor_config.json):
# shortest edge -> 224 (bicubic), center crop 224x224, scale to [0, 1], normalise with CLIP's stats.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
REAL_PREPROCESSOR_SETTINGS = {
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "resample": 3,  # PIL.Image.BICUBIC
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD,
}

# Tiny vision tower: same input size/patching as the real one (so the real preprocessing applies
# unchanged), but 32-d and 2 layers: ~0.2 M parameters, a few ms per image on a CPU.
TINY_PREDICTOR_OVERRIDES = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": 16,
}

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


class ScorerError(RuntimeError):
    """The scorer cannot be loaded or run; the message names the path/key and what to do."""


# ---------------------------------------------------------------------------- tiny predictor


def clip_tokenizer_dir() -> Path:
    """OpenAI CLIP ViT-L/14's tokenizer files, shipped inside the diffsynth wheel.

    ``CLIPProcessor.from_pretrained`` insists on a tokenizer even though scoring only uses the
    image half. diffsynth (a project dependency) carries openai/clip-vit-large-patch14's exact
    vocab.json/merges.txt for its Stable Diffusion loader, so the tiny folder gets the real
    tokenizer, offline, instead of an invented vocabulary.
    """
    import importlib.util

    spec = importlib.util.find_spec("diffsynth")  # located, not imported: importing diffsynth is slow
    root = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else Path("?")
    folder = root / "tokenizer_configs" / "stable_diffusion" / "tokenizer"
    if not (folder / "vocab.json").exists() or not (folder / "merges.txt").exists():
        raise ScorerError(
            f"The CLIP tokenizer files are not at {folder}; reinstall diffsynth==1.1.9 (pip install -e .)"
        )
    return folder


def tiny_predictor_config() -> dict:
    cfg = dict(REAL_PREDICTOR_CONFIG)
    cfg.update(TINY_PREDICTOR_OVERRIDES)
    return cfg


def build_clip_processor():
    """A ``CLIPProcessor`` with the real ViT-L/14 preprocessing and the real CLIP tokenizer."""
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizerFast

    image_processor = CLIPImageProcessor(**REAL_PREPROCESSOR_SETTINGS)
    tokenizer = CLIPTokenizerFast.from_pretrained(str(clip_tokenizer_dir()))
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_tiny_predictor(seed: int = 0):
    """A randomly initialised ``AestheticsPredictorV2Linear`` (tiny CLIP), deterministic for ``seed``."""
    import torch
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from transformers import CLIPVisionConfig

    # transformers initialises from the global RNG: fork it so the seed fixes the weights without
    # disturbing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AestheticsPredictorV2Linear(CLIPVisionConfig(**tiny_predictor_config()))
    return model.eval()


def ensure_tiny_scorer(folder: str | Path, seed: int = 0) -> Path:
    """Build the tiny predictor into ``folder`` (real folder layout) unless it is already there.

    Built in a temp folder beside the target and renamed into place, so an interrupted or
    concurrent build never leaves a half-written predictor that later loads.
    """
    folder = Path(folder).expanduser()
    want = {"version": TINY_SCORER_VERSION, "seed": int(seed)}
    if _stamp_matches(folder, want):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        build_tiny_predictor(seed).save_pretrained(tmp)
        build_clip_processor().save_pretrained(tmp)
        (tmp / "TINY_SCORER.txt").write_text(
            f"Tiny randomly initialised aesthetic predictor (kolors-story tiny scorer v{TINY_SCORER_VERSION}). "
            "Same classes and folder layout as aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE, "
            "but its scores are meaningless (near 0): it only exercises the code paths.\n"
        )
        (tmp / TINY_STAMP).write_text(json.dumps(want))
        if folder.exists() and not _stamp_matches(folder, want):
            shutil.rmtree(folder)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not _stamp_matches(folder, want):  # another process finished first: keep its copy
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _stamp_matches(folder: Path, want: dict) -> bool:
    try:
        return json.loads((folder / TINY_STAMP).read_text()) == want
    except (OSError, json.JSONDecodeError):
        return False


def is_tiny_scorer(folder: str | Path) -> bool:
    return (Path(folder) / TINY_STAMP).exists()


# ---------------------------------------------------------------------------- loading


def check_scorer_folder(path: str | Path) -> Path:
    """The predictor folder, or a :class:`ScorerError` naming what is missing and how to get it."""
    path = Path(str(path)).expanduser()
    hint = (
        f"Download the competition's predictor with `{DOWNLOAD_COMMAND}` (it writes "
        f"models/{REAL_FOLDER_NAME}), or set scorer.path=<folder holding it>; "
        "model=tiny uses a tiny random predictor instead (plumbing only)."
    )
    if not path.is_dir():
        raise ScorerError(f"Aesthetic predictor not found: {path} does not exist. {hint}")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        missing.append("weights (model.safetensors or pytorch_model.bin)")
    if not (path / "preprocessor_config.json").is_file():
        missing.append("preprocessor_config.json")
    if missing:
        raise ScorerError(f"Aesthetic predictor folder {path} is incomplete: missing {', '.join(missing)}. {hint}")
    return path


def _check_device(device: str) -> torch.device:
    import torch

    try:
        dev = torch.device(str(device))
    except RuntimeError as exc:
        raise ScorerError(f"scorer.device={device!r} is not a torch device ({exc}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ScorerError(f"scorer.device={device!r} but CUDA is not available here; run with scorer.device=cpu")
    return dev


class AestheticScorer:
    """``AestheticsPredictorV2Linear`` + ``CLIPProcessor`` from one folder, scoring in batches."""

    def __init__(self, predictor, processor, device="cpu", batch_size: int = 8, path: str | Path | None = None):
        if int(batch_size) < 1:
            raise ScorerError(f"scorer.batch_size={batch_size!r}: use a positive number of images per forward pass")
        import torch

        self.predictor = predictor
        self.processor = processor
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.path = Path(path) if path is not None else None
        self.tiny = bool(self.path is not None and is_tiny_scorer(self.path))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", batch_size: int = 8) -> "AestheticScorer":
        """Load exactly as the competition does: both classes' ``from_pretrained`` on one folder.

        The predictor stays in float32 (the competition's dtype). The image processor is pinned to
        the slow PIL ``CLIPImageProcessor`` (``use_fast=False``): that is what the competition's
        transformers used, and the torchvision-based fast one resizes slightly differently.
        """
        path = check_scorer_folder(path)
        dev = _check_device(device)
        from aesthetics_predictor import AestheticsPredictorV2Linear
        from transformers import CLIPProcessor

        try:
            predictor = AestheticsPredictorV2Linear.from_pretrained(str(path))
            processor = CLIPProcessor.from_pretrained(str(path), use_fast=False)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ScorerError(
                f"Could not load the aesthetic predictor from {path}: {type(exc).__name__}: {exc}\n"
                f"Re-download it with `{DOWNLOAD_COMMAND}` if the files are damaged."
            ) from exc
        predictor.eval().to(dev)
        return cls(predictor, processor, device=dev, batch_size=batch_size, path=path)

    @classmethod
    def from_config(cls, scorer_cfg) -> "AestheticScorer":
        """From a ``scorer`` config group (conf/scorer/aesthetic.yaml); builds the tiny one first if asked."""
        get = scorer_cfg.get if hasattr(scorer_cfg, "get") else lambda k, d=None: getattr(scorer_cfg, k, d)
        if get("path") in (None, ""):
            raise ScorerError(f"scorer.path is not set; point it at the predictor folder or run `{DOWNLOAD_COMMAND}`")
        path = Path(str(get("path"))).expanduser()
        tiny = get("tiny")
        if tiny:
            seed = tiny.get("seed", 0) if hasattr(tiny, "get") else 0
            ensure_tiny_scorer(path, seed=int(seed))
        return cls.from_pretrained(path, device=str(get("device", "cpu")), batch_size=int(get("batch_size", 8)))

    # ------------------------------------------------------------------ scoring

    def _batches(self, images: list, progress: bool):
        from tqdm.auto import tqdm

        bar = tqdm(total=len(images), desc="aesthetic score", unit="img", disable=not progress, leave=False)
        try:
            for start in range(0, len(images), self.batch_size):
                chunk = images[start : start + self.batch_size]
                yield chunk
                bar.update(len(chunk))
        finally:
            bar.close()

    def score_and_embed(self, images: list, progress: bool = False) -> tuple[list[float], torch.Tensor]:
        """Aesthetic score per image and the predictor's L2-normalised CLIP embeddings ``[N, E]`` (CPU, fp32).

        Images are handed to the processor untouched (as the competition's loop does with
        ``Image.open``): RGB conversion, resize and crop happen inside ``CLIPProcessor``.
        """
        import torch

        images = list(images)
        if not images:
            raise ScorerError("No images to score")
        scores: list[float] = []
        embeds: list[torch.Tensor] = []
        for chunk in self._batches(images, progress):
            inputs = self.processor(images=chunk, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            with torch.no_grad():  # as the competition's loop (the predictor also normalises in place)
                out = self.predictor(**inputs)
            # logits [B, 1]; ``tolist`` turns float32 into the same Python floats as the seeds' loop.
            scores.extend(row[0] for row in out.logits.tolist())
            embeds.append(out.hidden_states.float().cpu())  # normalised in place by the predictor
        return scores, torch.cat(embeds)

    def score(self, images: list, progress: bool = False) -> list[float]:
        """The competition's aesthetic score of each image (batched, equal to the one-by-one loop)."""
        return self.score_and_embed(images, progress)[0]

    def embed(self, images: list, progress: bool = False) -> torch.Tensor:
        """The predictor's own CLIP image embeddings, L2-normalised, ``[N, E]``."""
        return self.score_and_embed(images, progress)[1]


# ---------------------------------------------------------------------------- summaries


def summarize_scores(scores: list[float], threshold: float = 6.0) -> dict:
    """Mean/min/max of the scores and the competition gate: ``passed`` = mean >= threshold."""
    scores = [float(s) for s in scores]
    if not scores:
        raise ValueError("summarize_scores needs at least one score")
    mean = sum(scores) / len(scores)
    return {
        "scores": scores,
        "mean": mean,
        "min": min(scores),
        "max": max(scores),
        "threshold": float(threshold),
        "passed": bool(mean >= float(threshold)),
    }


def coherence(embeddings: torch.Tensor) -> dict:
    """Style consistency of a story: mean pairwise cosine similarity of the images' embeddings.

    Returns ``coherence`` (mean over all pairs i < j), ``outlier`` (1-based index of the image
    whose mean similarity to the others is lowest: the most out-of-style scene) and
    ``similarity_to_others`` (that mean, per image). Needs at least 2 images.
    """
    import torch

    e = torch.as_tensor(embeddings).detach().to("cpu", torch.float64)
    if e.dim() != 2 or e.shape[0] < 2:
        raise ValueError(f"coherence needs embeddings [N>=2, E], got shape {tuple(e.shape)}")
    e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = e @ e.T
    n = e.shape[0]
    off = sim.sum() - sim.diagonal().sum()
    to_others = (sim.sum(dim=1) - sim.diagonal()) / (n - 1)
    return {
        "coherence": float(off / (n * (n - 1))),
        "outlier": int(torch.argmin(to_others)) + 1,
        "similarity_to_others": [float(v) for v in to_others],
    }
