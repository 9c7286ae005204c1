"""The competition's aesthetic score, batched, plus the CLIP embeddings coherence is computed from.

The competition scores each image with simple-aesthetics-predictor's ``AestheticsPredictorV2Linear``
(a CLIP ViT-L/14 vision tower + an MLP head) and the ``CLIPProcessor`` stored beside its weights
(``aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE``), one image at a time
(see ``seeds/competition-readme-en.md``). :class:`AestheticScorer` loads the same two objects
through the same ``from_pretrained`` calls and runs them over batches; since the processor works
per image and the network has no cross-sample interaction, the numbers equal the one-by-one loop
(``tests/test_scoring.py`` checks this against the seeds' loop written out verbatim).

The predictor's forward divides the CLIP image embedding by its norm *in place* and returns that
normalised embedding as ``hidden_states``: :meth:`AestheticScorer.score_and_embed` takes it from
there, so the coherence score costs no second forward pass.

Without the real weights, ``model=tiny`` builds a tiny predictor of the same classes in the same
folder layout (``kolors_story.tiny``), loaded through the same code.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kolors_story import tiny
from kolors_story.config import ScorerSettings
from kolors_story.errors import UserError

if TYPE_CHECKING:  # torch/transformers are imported on use: a bad path is reported in a second
    import torch

DOWNLOAD_COMMAND = "python -m kolors_story.download scorer"
REAL_FOLDER_NAME = "aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


class ScorerError(UserError, RuntimeError):
    """The scorer cannot be loaded or run; the message names the path/key and what to do."""


def check_scorer_folder(path: str | Path) -> Path:
    """The predictor folder, or a :class:`ScorerError` naming what is missing and how to get it."""
    path = Path(str(path)).expanduser()
    hint = (
        f"Download the competition's predictor with `{DOWNLOAD_COMMAND}` (it writes "
        f"models/{REAL_FOLDER_NAME}), or set scorer.path=<folder holding it>; "
        "model=tiny builds a tiny predictor of the same class instead."
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
        self.note = tiny.note(self.path) if self.path is not None else None  # a stand-in's note, else None

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
    def from_settings(cls, scorer: ScorerSettings) -> "AestheticScorer":
        """From the ``scorer`` settings group; a stand-in predictor (``model=tiny``) is built into ``path`` first."""
        if scorer.path in (None, ""):
            raise ScorerError(f"scorer.path is not set; point it at the predictor folder or run `{DOWNLOAD_COMMAND}`")
        path = Path(str(scorer.path)).expanduser()
        tiny.provide_scorer(scorer)
        return cls.from_pretrained(path, device=str(scorer.device), batch_size=int(scorer.batch_size))

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
