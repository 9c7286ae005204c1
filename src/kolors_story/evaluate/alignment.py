"""Prompt alignment (CLIP-T): how well each panel shows its own scene, the cosine between CLIP
ViT-L/14's image embedding of the panel and its text embedding of the scene's English prompt
(CLIP's text tower reads English). Typical values for matching pairs are 0.2-0.35; a panel that
scores below the others shows something else than its prompt says."""

from __future__ import annotations

from pathlib import Path

import torch

from kolors_story import tiny
from kolors_story.config import ScorerSettings
from kolors_story.errors import UserError

CLIP_DOWNLOAD = "python -m kolors_story.download clip"


class AlignmentError(UserError, RuntimeError):
    """CLIP for prompt alignment cannot be loaded; the message says where it was looked for."""


def check_clip_folder(path: str | Path) -> Path:
    path = Path(str(path)).expanduser()
    if not (path / "config.json").is_file() or not any((path / n).is_file() for n in ("model.safetensors",
                                                                                         "pytorch_model.bin")):
        raise AlignmentError(f"CLIP ViT-L/14 (both towers, for prompt alignment) not found in {path}: run "
                             f"`{CLIP_DOWNLOAD}`, set scorer.clip_path=<folder>, or scorer.alignment=false")
    return path


class PromptAligner:
    """``CLIPModel`` + ``CLIPProcessor`` from one folder, batched like the aesthetic scorer."""

    def __init__(self, model, processor, device="cpu", batch_size: int = 8):
        self.model, self.processor = model, processor
        self.device, self.batch_size = torch.device(device), int(batch_size)

    @classmethod
    def from_settings(cls, scorer: ScorerSettings) -> "PromptAligner":
        from transformers import CLIPModel, CLIPProcessor

        path = Path(str(scorer.clip_path)).expanduser()
        tiny.provide_clip(scorer)
        path = check_clip_folder(path)
        model = CLIPModel.from_pretrained(str(path)).eval().to(scorer.device)
        return cls(model, CLIPProcessor.from_pretrained(str(path), use_fast=False), scorer.device, scorer.batch_size)

    @torch.no_grad()
    def alignment(self, images: list, texts: list[str]) -> list[float | None]:
        """Cosine of each image with its own text (None where the text is empty)."""
        out: list[float | None] = []
        for start in range(0, len(images), self.batch_size):
            ims, txt = images[start : start + self.batch_size], texts[start : start + self.batch_size]
            inputs = self.processor(text=[t or "" for t in txt], images=ims, return_tensors="pt", padding=True,
                                    truncation=True, max_length=77)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            text = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            cos = torch.nn.functional.cosine_similarity(img.float(), text.float(), dim=-1).cpu().tolist()
            out += [float(c) if t else None for c, t in zip(cos, txt)]
        return out
