"""A tiny random captioner of each family's own class and processor (``dataset.captioner_tiny``):
the Qwen2-VL layout and chat format at 32-d, so the data stage's captioning runs on a CPU."""

from __future__ import annotations

from pathlib import Path

from kolors_story.models.captioner import family
from kolors_story.tiny.folders import build_stamped_folder

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
