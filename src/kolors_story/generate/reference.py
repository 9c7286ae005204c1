"""A reference image for the character (``coherence.reference``), through Kolors-IP-Adapter-Plus.

The adapter is loaded with diffusers' own ``load_ip_adapter`` (CLIP ViT-L/14-336 image encoder +
``ip_adapter_plus_general`` weights, the release folder's layout). The reference image is encoded
once; every batch passes those embeddings, and the adapter's strength is set per group of scenes
(``scales``: 0 where the character is absent: those scenes skip the adapter entirely).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from kolors_story import tiny
from kolors_story.config import ReferenceSettings
from kolors_story.errors import SettingsError, UserError
from kolors_story.files import file_sha256
from kolors_story.models.ip_adapter import ENCODER_FOLDER

IP_DOWNLOAD = "python -m kolors_story.download ip_adapter"


class ReferenceError(UserError, RuntimeError):
    """The reference image or the IP-Adapter cannot be used; the message says which file and what to do."""


def scene_scales(ref: ReferenceSettings, scene_count: int) -> list[float]:
    if ref.scales is None:
        return [float(ref.scale)] * scene_count
    if len(ref.scales) != scene_count:
        raise SettingsError(f"coherence.reference.scales has {len(ref.scales)} values for {scene_count} scenes; "
                            "give one per scene (0 where the character is absent) or null")
    return [float(s) for s in ref.scales]


def check_reference(ref: ReferenceSettings, scene_count: int) -> None:
    """Settings and files, before any model is loaded."""
    scales = scene_scales(ref, scene_count)
    if any(s < 0 for s in scales):
        raise SettingsError(f"coherence.reference.scale(s)={scales}: strengths are >= 0 (0 = off for that scene)")
    if ref.scene is not None and not 1 <= int(ref.scene) <= scene_count:
        raise SettingsError(f"coherence.reference.scene={ref.scene}: scenes are 1..{scene_count}")
    if not ref.used():
        return
    if ref.image is not None:
        reference_image(ref.image)
    tiny.check(reference=ref)
    if not tiny.provides(ref):  # a stand-in adapter is built, not downloaded
        adapter_files(ref)


def reference_image(path: str) -> Image.Image:
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise ReferenceError(f"coherence.reference.image={path}: no such file; give a character sheet image "
                             "(png/jpg) or use coherence.reference.scene=<n>")
    try:
        with Image.open(file) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise ReferenceError(f"coherence.reference.image={path} is not a readable image ({exc})") from None


def adapter_files(ref: ReferenceSettings) -> tuple[Path, Path]:
    """The adapter folder and weight file, or an error naming what is missing and the download."""
    folder = Path(str(ref.path)).expanduser()
    weight = folder / ref.weight_name
    missing = [str(p) for p in (weight, folder / ENCODER_FOLDER / "config.json") if not p.is_file()]
    if missing:
        raise ReferenceError(f"Kolors-IP-Adapter-Plus not found: missing {', '.join(missing)}. Run `{IP_DOWNLOAD}` "
                             "or set coherence.reference.path=<folder>; model=tiny builds a tiny one (pre-trained or random)")
    return folder, weight


def load_adapter(pipe, ref: ReferenceSettings, dtype: torch.dtype, device) -> dict:
    """Image encoder + adapter onto ``pipe`` (before any offload hooks); returns what to record."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    if any(type(p).__name__.startswith("Sliced") for p in pipe.unet.attn_processors.values()):
        raise SettingsError("memory.attention=sliced cannot be combined with coherence.reference (the IP-Adapter "
                            "brings its own attention processors): use memory.attention=sdpa")
    tiny.provide_ip_adapter(ref)
    folder, weight = adapter_files(ref)
    encoder = CLIPVisionModelWithProjection.from_pretrained(str(folder / ENCODER_FOLDER), torch_dtype=dtype).to(device)
    size = int(encoder.config.image_size)  # 336: the processor must crop to what the encoder was trained on
    pipe.register_modules(image_encoder=encoder, feature_extractor=CLIPImageProcessor(size=size, crop_size=size))
    if hasattr(pipe.unet, "text_encoder_hid_proj") and pipe.unet.text_encoder_hid_proj is None:
        del pipe.unet.text_encoder_hid_proj  # left by an earlier unload: diffusers would drop Kolors' text projection
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=weight.name, image_encoder_folder=None)
    return {"path": str(folder), "weight": weight.name, "weight_sha256": file_sha256(weight)}


def unload_adapter(pipe) -> None:
    pipe.unload_ip_adapter()


@torch.no_grad()
def image_embeds(pipe, image: Image.Image, device, cfg: bool) -> list[torch.Tensor]:
    """The adapter's input for ``image`` (negative half first when CFG is on), computed once."""
    return pipe.prepare_ip_adapter_image_embeds(image, None, device, 1, cfg)


def image_record(ref: ReferenceSettings) -> dict | None:
    if ref.image is None:
        return None
    file = Path(str(ref.image)).expanduser()
    return {"image": str(file), "name": file.name, "sha256": file_sha256(file)}
