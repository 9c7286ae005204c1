"""The ``model`` and ``scorer`` groups: which weights, where, in which dtype, and how a story is judged.

Every key with its type, default and a one-line comment (see :mod:`kolors_story.config`)."""

# No ``from __future__ import annotations`` here: OmegaConf reads these annotations at runtime.
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import II


@dataclass
class TinyModelSpec:
    weights: str = "pretrained"  # pretrained: UNet + VAE trained on drawn scenes (shipped, sha256-checked); random: plumbing only
    seed: int = 0  # seed of the random weights: same seed -> same model, bit for bit (pretrained: 0 only)
    layout: str = "kolors"  # release layout it is saved in: kolors (Kwai-Kolors/Kolors) or diffusers (Kolors-diffusers)


@dataclass
class ModelSettings:
    name: str = "kolors"  # shown in outputs, manifests and W&B
    path: str = "models/kolors/Kolors"  # folder in either layout: Kwai-Kolors/Kolors (tokenizer in text_encoder/) or Kolors-diffusers
    vae_path: Optional[str] = "models/sdxl-vae-fp16-fix"  # separate fp16-fix VAE (folder or .safetensors); null -> the release's own vae/
    dtype: str = "float16"  # dtype the weights are loaded in: float16, bfloat16 or float32
    device: str = "cuda"  # device the pipeline runs on: cuda, cuda:1, cpu
    resolution: int = 1024  # native training/sampling size; sampler and dataset default to it
    text_encoder_quant: str = "none"  # ChatGLM3's weights: none (model.dtype, 12.0 GB fp16), int8 (torchao, CPU+CUDA, 6.2 GB) or nf4 (bitsandbytes, CUDA, 3.5 GB)
    tiny: Optional[TinyModelSpec] = None  # only for model=tiny: the tiny Kolors (pre-trained or random) built into `path`


@dataclass
class TinyScorerSpec:
    seed: int = 0  # seed of the tiny predictor's random weights (a taste fits its head on top)
    taste: Optional[str] = None  # null/none: random scores near 0; brightness: 1 + 8 x mean brightness; paper: 1 + 8 x paper-likeness (light, unsaturated)


@dataclass
class StoryObjectiveSettings:
    """How a story is judged as a whole (evaluate.objective.Objective): the gate first, then
    mean aesthetic + coherence_weight x CLIP-I + alignment_weight x CLIP-T - copy_paste_weight x copy-paste."""

    min_floor: Optional[float] = None  # gate: every panel's aesthetic score at least this too (null: no floor)
    coherence_weight: float = 2.0  # weight of CLIP-I (style/identity kept across panels, 0..1)
    alignment_weight: float = 2.0  # weight of CLIP-T (each panel shows its own prompt, ~0.2-0.35 when it does)
    copy_paste_weight: float = 5.0  # penalty per share of panel pairs that are copies (0..1)


@dataclass
class ScorerSettings:
    path: str = "models/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE"  # the competition's predictor folder (python -m kolors_story.download scorer)
    device: str = II("model.device")  # device the CLIP ViT-L/14 runs on
    batch_size: int = 8  # images per forward pass (scores are identical to one-by-one)
    threshold: float = 6.0  # pass/fail gate on the mean score (competition rule)
    alignment: bool = True  # score each panel against its English prompt with CLIP ViT-L/14 (CLIP-T); needs clip_path
    clip_path: str = "models/clip-vit-large-patch14"  # CLIP with its text tower (python -m kolors_story.download clip)
    duplicate_cosine: float = 0.97  # panels whose CLIP image embeddings are at least this close are copies
    duplicate_pixels: float = 0.02  # ... and so are panels whose 64x64 grey thumbnails differ by at most this (0..1)
    objective: StoryObjectiveSettings = field(default_factory=StoryObjectiveSettings)  # the story objective's weights
    tiny: Optional[TinyScorerSpec] = None  # non-null -> build a tiny predictor (with this taste) into `path` first (model=tiny)
