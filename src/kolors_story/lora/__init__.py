"""LoRA: the adapter on the UNet (``adapter``), its files in three formats (``files``) and the key
spaces they use (``keys``: peft, diffusers, kohya/ComfyUI, DiffSynth-Studio).

    from kolors_story.lora import read_lora, load_lora_into_pipeline, set_lora_scales
"""

from kolors_story.lora.adapter import (
    DEFAULT_TARGETS,
    add_lora,
    add_lora_from_settings,
    load_lora_into_pipeline,
    lora_scales,
    set_lora_scales,
)
from kolors_story.lora.files import FILE_NAMES, LoraFile, read_lora, save_lora
from kolors_story.lora.keys import LoraFormatError

__all__ = [
    "DEFAULT_TARGETS", "FILE_NAMES", "LoraFile", "LoraFormatError", "add_lora", "add_lora_from_settings",
    "load_lora_into_pipeline", "lora_scales", "read_lora", "save_lora", "set_lora_scales",
]
