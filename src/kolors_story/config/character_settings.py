"""The ``character`` group: an automatic entity LoRA of the story's main character, made before the
style LoRA by teaching the model its own most consistent rendering of that character ("The Chosen
One", Avrahami et al., SIGGRAPH 2024; ``train.character``), and its strength where it is stacked.

Every key with its type, default and a one-line comment (see :mod:`kolors_story.config`)."""

# No ``from __future__ import annotations`` here: OmegaConf reads these annotations at runtime.
from dataclasses import dataclass, field
from typing import Any, List, Optional

# Neutral poses and backgrounds the candidates are rendered from ({character} is replaced): the same
# character in a few settings, so that what the chosen renders share is the character, not a scene.
PHRASINGS = [
    {"zh": "{character}，全身，站立，正面，纯白色背景", "en": "{character}, full body, standing, front view, plain white background"},
    {"zh": "{character}，半身像，看向镜头，浅灰色背景", "en": "{character}, upper body portrait, looking at the viewer, light grey background"},
    {"zh": "{character}，全身，侧面，走路，简单背景", "en": "{character}, full body, side view, walking, simple background"},
    {"zh": "{character}，坐着，微笑，浅色纯色背景", "en": "{character}, sitting, smiling, plain light background"},
]


@dataclass
class CharacterSettings:
    enabled: bool = False  # character=auto: before the style LoRA, train a LoRA on the model's own most consistent renders of the character
    prompt: Optional[Any] = None  # the character as the phrasings name it (text or {zh, en}); null -> story.character
    phrasings: List[Any] = field(default_factory=lambda: [dict(p) for p in PHRASINGS])  # prompts the candidates are rendered from (text or {zh, en}); {character} is replaced
    negative: Any = field(default_factory=lambda: {"zh": "丑陋，变形，模糊，多个人物", "en": "ugly, deformed, blurry, several people"})  # negative prompt of the candidate renders
    candidates: int = 64  # renders per round (phrasings in turn, each from its own seed), with the job's sampler group
    min_cluster: int = 8  # the chosen cluster holds at least this many renders (the entity LoRA trains on them)
    cluster: str = "tightest"  # what each round trains on: tightest (the loop) or random (a control: as many renders, picked at random)
    rounds: int = 3  # at most this many rounds of render -> cluster -> train; each renders with the previous round's LoRA
    min_gain: float = 0.0  # stop early when the chosen cluster's similarity improves by no more than this
    steps: int = 500  # entity LoRA optimizer steps per round
    rank: int = 4  # entity LoRA rank (small: one subject)
    alpha: float = 4.0  # entity LoRA alpha
    lr: float = 1.0e-4  # entity LoRA learning rate (AdamW, constant)
    batch_size: int = 1  # entity LoRA images per step
    seed: int = 0  # seed of the candidate renders (round r, render i: seed + (r - 1) x candidates + i) and of the training
    scale: float = 1.0  # the character LoRA's strength, stacked with the style LoRA in validation renders and `generate.py run=` (0: not stacked)
