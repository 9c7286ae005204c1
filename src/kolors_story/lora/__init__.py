"""LoRA: the adapter on the UNet (``adapter``) and its types (``variants``: LoRA, DoRA, LoHa, LoKr,
LoCon), its files in three formats (``files``, read back by ``reader``) and the key spaces they use
(``keys``: peft, diffusers, kohya/ComfyUI, DiffSynth-Studio).

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
from kolors_story.lora.files import (
    FILE_NAMES,
    LoraFile,
    checkpoint_lora_file,
    save_lora,
)
from kolors_story.lora.keys import LoraFormatError
from kolors_story.lora.reader import read_lora
from kolors_story.lora.variants import LORA_TYPES

__all__ = [
    "DEFAULT_TARGETS", "FILE_NAMES", "LORA_TYPES", "checkpoint_lora_file", "LoraFile", "LoraFormatError", "add_lora", "add_lora_from_settings",
    "load_lora_into_pipeline", "lora_scales", "read_lora", "save_lora", "set_lora_scales",
]
