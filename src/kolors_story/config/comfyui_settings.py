"""The ``comfyui`` group: whether a story is also written as a ComfyUI workflow (``workflow_api.json``,
``workflow.json`` and the graph in each PNG's text), and the file names that workflow loads.

Every key with its type, default and a one-line comment (see :mod:`kolors_story.config`). The
defaults are the names ``python -m kolors_story.download`` and the submission bundle write, except
the text encoder: ComfyUI-Kolors-MZ loads ChatGLM3 as one safetensors file (docs/comfyui.md)."""

# No ``from __future__ import annotations`` here: OmegaConf reads these annotations at runtime.
from dataclasses import dataclass


@dataclass
class ComfyUISettings:
    enabled: bool = False  # write workflow_api.json + workflow.json beside the images and the graph into each PNG (a submission bundle always does)
    unet: str = "diffusion_pytorch_model.fp16.safetensors"  # Kolors UNet in ComfyUI/models/unet/ (the release's unet/ file), for MZ_KolorsUNETLoaderV2
    text_encoder: str = "chatglm3-fp16.safetensors"  # ChatGLM3 as one safetensors file in ComfyUI/models/LLM/, for MZ_ChatGLM3Loader (8bit/4bit in the name quantizes)
    vae: str = "sdxl.vae.safetensors"  # the fp16-fix VAE in ComfyUI/models/vae/ (models/sdxl-vae-fp16-fix/sdxl.vae.safetensors), for VAELoader
    lora: str = "lora_kohya.safetensors"  # the LoRA in ComfyUI/models/loras/ (kohya keys); stacked LoRAs are lora<n>-<this>, as the bundle names them


def allow_boolean_group_choices() -> None:
    """Let ``comfyui=true`` pick ``conf/comfyui/true.yaml``. Hydra's override grammar reads ``true`` and
    ``false`` as booleans and refuses a boolean as a config group's choice; this turns the boolean back
    into the option's name, for config groups only (``validate=true`` stays a boolean). Idempotent."""
    from hydra._internal import defaults_list

    original = defaults_list.Overrides.__init__
    if getattr(original, "boolean_group_choices", False):
        return

    def init(self, repo, overrides_list) -> None:
        for override in overrides_list:
            if isinstance(override._value, bool) and repo.group_exists(override.key_or_group):
                override._value = str(override._value).lower()
        original(self, repo, overrides_list)

    init.boolean_group_choices = True
    defaults_list.Overrides.__init__ = init
