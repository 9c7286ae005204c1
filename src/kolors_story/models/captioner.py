"""Vision-language captioners for the data stage (``dataset.captioner``): which families, where
their weights live and loading them (transformers' own classes, no remote code). The tiny random
one of the same class for the tests is built by ``kolors_story.tiny``.

Qwen-VL is the family: native in transformers, trained on Chinese and English (Kolors' two
languages; ChatGLM3 reads both), instruction-following, so one prompt asks for one descriptive
sentence in the chosen language. ``qwen2_vl`` (Qwen2-VL-2B-Instruct, 2.2 B parameters, 4.4 GB in
bf16) is the small one, ``qwen2_5_vl`` (Qwen2.5-VL-7B-Instruct, 8.3 B, 16.6 GB in bf16, still
within a 24 GB card) the strong one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kolors_story.errors import MissingFileError, SettingsError

_MROPE = {"type": "mrope", "mrope_section": [16, 24, 24]}
_QWEN_TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                    vision_end_token_id=151653)
# The released configs' sizes (parameter counts checked on the meta device: 2,208,985,600 and 8,292,166,656).
REAL_QWEN2_VL_2B = dict(
    text_config=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                     num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                     rope_theta=1000000.0, rope_scaling=_MROPE, tie_word_embeddings=True, rms_norm_eps=1e-6),
    vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, in_channels=3, hidden_act="quick_gelu"),
    tie_word_embeddings=True, **_QWEN_TOKENS)
REAL_QWEN2_5_VL_7B = dict(
    text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                     rope_theta=1000000.0, rope_scaling=_MROPE, tie_word_embeddings=False, rms_norm_eps=1e-6),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], in_chans=3, hidden_act="silu"),
    tie_word_embeddings=False, **_QWEN_TOKENS)


@dataclass(frozen=True)
class CaptionerFamily:
    name: str  # dataset.captioner
    download: str  # python -m kolors_story.download <this>
    subdir: str  # default folder under models/
    config_class: str
    model_class: str
    real_config: dict


FAMILIES = {
    "qwen2_vl": CaptionerFamily("qwen2_vl", "captioner", "Qwen2-VL-2B-Instruct", "Qwen2VLConfig",
                                "Qwen2VLForConditionalGeneration", REAL_QWEN2_VL_2B),
    "qwen2_5_vl": CaptionerFamily("qwen2_5_vl", "captioner_large", "Qwen2.5-VL-7B-Instruct", "Qwen2_5_VLConfig",
                                  "Qwen2_5_VLForConditionalGeneration", REAL_QWEN2_5_VL_7B),
}
CAPTIONER_CHOICES = ("none", *FAMILIES)
# Images are shown to the captioner at most this size (1024 x 1024 -> 1,369 image tokens): enough to
# describe a picture, and it bounds the vision tower's memory (Qwen's own default allows 12.8 MP).
CAPTION_MAX_SIDE = 1024


def family(name: str) -> CaptionerFamily:
    if name not in FAMILIES:
        raise SettingsError(f"dataset.captioner={name!r}: use one of {list(CAPTIONER_CHOICES)}")
    return FAMILIES[name]


def captioner_path(name: str, path: str | None) -> Path:
    """``dataset.captioner_path``, or ``models/<the family's folder>`` when it is null."""
    return Path(str(path) if path else f"models/{family(name).subdir}").expanduser()


def check_captioner_folder(name: str, path: Path) -> Path:
    """The folder holds a model of this family (config.json, weights, processor), else a clear error."""
    fam = family(name)
    missing = [f for f in ("config.json", "preprocessor_config.json") if not (path / f).is_file()]
    if not missing and not any(path.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise MissingFileError(
            f"dataset.captioner={name}: {path} lacks {missing}. Fetch the weights with "
            f"`python -m kolors_story.download {fam.download}` (ModelScope, into models/{fam.subdir}) or set "
            "dataset.captioner_path to a folder that has them")
    return path


def load_captioner(name: str, path: Path, device: str, dtype: str):
    """(model, processor) from the folder with transformers' own classes, offline, in eval mode."""
    import torch
    import transformers
    from transformers import AutoProcessor

    check_captioner_folder(name, path)
    torch_dtype = {"auto": torch.bfloat16 if str(device).startswith("cuda") else torch.float32,
                   "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(str(dtype))
    if torch_dtype is None:
        raise SettingsError(f"dataset.captioner_dtype={dtype!r}: use auto, bfloat16, float16 or float32")
    model_class = getattr(transformers, family(name).model_class)
    model = model_class.from_pretrained(str(path), dtype=torch_dtype, local_files_only=True).to(device).eval()
    processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    processor.tokenizer.padding_side = "left"  # batched generation continues every prompt at its end
    image_processor = processor.image_processor
    cap = min(int(getattr(image_processor, "max_pixels", None) or CAPTION_MAX_SIDE**2), CAPTION_MAX_SIDE**2)
    image_processor.max_pixels = cap
    if isinstance(getattr(image_processor, "size", None), dict) and "longest_edge" in image_processor.size:
        image_processor.size = {**image_processor.size, "longest_edge": cap}
    return model, processor


def meta_captioner(name: str):
    """The real-size model on the meta device (no memory), for the memory plan."""
    import torch
    import transformers

    fam = family(name)
    config = getattr(transformers, fam.config_class)(**fam.real_config)
    with torch.device("meta"):
        return getattr(transformers, fam.model_class)(config)
