"""Vision-language captioners for the data stage (``dataset.captioner``): which families, where
their weights live, loading them (transformers' own classes, no remote code), and a tiny random
one of the same class in the real folder layout for the tests.

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


# ---------------------------------------------------------------------------------- tiny


TINY_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
# The Qwen chat format for one user turn of images and text (the released models ship their own).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_TINY_CORPUS = ["a girl reading by the window, ink wash painting, mountains, river, boat, moon, bird, tree, house",
                "Describe this image in one detailed sentence: subject, style, colours and composition.",
                "用一句话详细描述这张图片：主体、风格、色彩和构图。", "水墨画 山 水 船 月 鸟 树 房子 女孩 读书 窗 雨 桥 花"]


def _tiny_processor(name: str):
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        Qwen2TokenizerFast,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_TINY_CORPUS * 8, trainers.BpeTrainer(
        vocab_size=400, special_tokens=TINY_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    processor_class = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}[name]
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)  # a few patches per image
    return getattr(transformers, processor_class)(image_processor=image_processor, tokenizer=tokenizer,
                                                  video_processor=Qwen2VLVideoProcessor(),
                                                  chat_template=TINY_CHAT_TEMPLATE)


def _tiny_config(name: str, tokenizer) -> object:
    import transformers

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in TINY_SPECIAL}
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, tie_word_embeddings=True)
    vision = (dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2) if name == "qwen2_vl" else
              dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, window_size=56,
                   fullatt_block_indexes=[1]))
    vision.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    return getattr(transformers, family(name).config_class)(
        text_config=text, vision_config=vision, tie_word_embeddings=True, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])


def ensure_tiny_captioner(folder: str | Path, name: str = "qwen2_vl", seed: int = 0) -> Path:
    """A random captioner of the family's own class and processor in ``folder`` (the released layout:
    config.json, model.safetensors, tokenizer and processor files), built once. Its weights are drawn
    wide (std 0.5) so that it writes a different string of tokens for each image; a caption from it
    means nothing but goes through every step a real one does."""
    import torch
    import transformers

    from kolors_story.models.random_init import build_stamped_folder

    def write(tmp: Path) -> None:
        processor = _tiny_processor(name)
        config = _tiny_config(name, processor.tokenizer)
        model = getattr(transformers, family(name).model_class)(config).eval()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "norm" not in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    return build_stamped_folder(folder, {"tiny_captioner": name, "seed": seed, "format": 1}, "tiny_captioner.json",
                                write)
