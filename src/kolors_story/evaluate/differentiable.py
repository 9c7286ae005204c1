"""The competition's aesthetic score as a differentiable function of the pixels (for reward
refinement, ``train.py reward=aesthetic``).

Same weights as :class:`~kolors_story.evaluate.scorer.AestheticScorer` (the predictor folder), same
computation, but in torch end to end: ``CLIPProcessor``'s preprocessing (shortest side to 224 with
a bicubic antialiased resize, centre crop 224, CLIP mean/std) on float tensors, and the predictor's
forward without its in-place normalisation (``image_embeds /= norm`` under ``no_grad`` in the
package). The predictor stays in eval mode (its head has dropout) whatever mode the caller is in.
The package resizes 8-bit images with PIL; here the resize runs on floats
(``torch.nn.functional.interpolate(..., antialias=True)``, PIL's bicubic kernel) and is then rounded
to 1/255 as PIL's output is, with the gradient passed straight through the rounding;
tests/test_reward.py bounds what difference is left.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kolors_story.models.architectures import CLIP_MEAN, CLIP_STD


class DifferentiableAestheticScore:
    """``score(images)``: images ``[B, 3, H, W]`` in [0, 1] -> scores ``[B]``, with gradients to the images."""

    def __init__(self, predictor, image_size: int = 224):
        self.predictor = predictor.eval().requires_grad_(False)
        self.image_size = int(image_size)
        self.mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    @classmethod
    def from_scorer(cls, scorer) -> "DifferentiableAestheticScore":
        """From a loaded :class:`AestheticScorer` (same weights, its processor's crop size)."""
        crop = scorer.processor.image_processor.crop_size
        return cls(scorer.predictor, int(crop["height"] if isinstance(crop, dict) else crop))

    def to(self, device) -> "DifferentiableAestheticScore":
        self.predictor.to(device)
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """CLIPProcessor's resize (shortest side), centre crop and normalisation, on float tensors."""
        h, w = images.shape[-2:]
        n = self.image_size  # as transformers' get_resize_output_image_size: short side n, long side truncated
        size = (int(n * h / w), n) if h > w else (n, int(n * w / h))
        x = F.interpolate(images.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
        # PIL resizes 8-bit images: round to 1/255 and clip like it, with the gradient passed straight through
        x = x + ((x * 255).round().clamp(0, 255) / 255 - x).detach()
        top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        x = x[..., top : top + self.image_size, left : left + self.image_size]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.predictor.eval()
        p = self.predictor
        x = self.preprocess(images).to(p.dtype)
        pooled = p.vision_model(pixel_values=x).pooler_output
        embeds = p.visual_projection(pooled)
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        return p.layers(embeds).squeeze(-1).float()
