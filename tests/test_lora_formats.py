"""The export formats on the REAL Kolors UNet architecture, built on the meta device (no weights).

The DiffSynth file is checked against what the competition's ``load_lora()`` does with it:
diffsynth 1.1.9's own ``SDXLUNet(is_kolors=True)`` + peft ``inject_adapter_in_model`` +
``load_state_dict(strict=False)`` -- every LoRA key must land (strict=False would silently drop a
wrong name and the organisers would reproduce the base model). Only the LoRA tensors are real
(rank 2), the 2.6 B base parameters stay on the meta device.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kolors_story.lora import add_lora, read_lora, save_lora
from kolors_story.lora.files import (
    CKPT_META_PREFIX,
    COMPETITION_TARGETS,
    DIFFSYNTH_DEFAULT_ALPHA,
)
from kolors_story.models.architectures import KOLORS_UNET_CONFIG

RANK, ALPHA = 2, 8.0


def meta_kolors_unet():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**KOLORS_UNET_CONFIG)


def meta_diffsynth_unet():
    from diffsynth.models.sdxl_unet import SDXLUNet

    with torch.device("meta"):
        return SDXLUNet(is_kolors=True)


def competition_inject(model, rank, alpha):
    """The LoRA half of the competition's load_lora() (baseline walkthrough), before torch.load."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                        target_modules=list(COMPETITION_TARGETS))
    return inject_adapter_in_model(config, model)


def materialise_lora(unet, seed=0):
    """Give the LoRA sub-layers real CPU storage; the base UNet stays on meta."""
    g = torch.Generator().manual_seed(seed)
    for name, module in unet.named_modules():
        if name.endswith((".lora_A.default", ".lora_B.default")):
            module.to_empty(device="cpu")
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * 0.01)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from peft.utils import get_peft_model_state_dict

    unet = meta_kolors_unet()
    add_lora(unet, rank=RANK, alpha=ALPHA)
    materialise_lora(unet)
    peft_shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(unet).items()}
    files = save_lora(unet, tmp_path_factory.mktemp("real_lora"), {"base_model_hash": "kolors"})
    return SimpleNamespace(files=files, peft_shapes=peft_shapes)


def test_real_kolors_lora_covers_every_attention_projection(real):
    # 70 transformer blocks x (attn1 + attn2) x (q, k, v, out) modules, each with lora_A and lora_B.
    assert len(real.peft_shapes) == 70 * 2 * 4 * 2


def test_diffsynth_file_matches_the_competition_loader_exactly(real):
    sd = torch.load(real.files["diffsynth"], map_location="cpu", weights_only=True)
    meta_keys = {k for k in sd if k.startswith(CKPT_META_PREFIX)}
    # rank/alpha recoverable from the file itself, without the user repeating them.
    assert sd[CKPT_META_PREFIX + "rank"].item() == RANK and sd[CKPT_META_PREFIX + "alpha"].item() == ALPHA
    ours = {k: tuple(v.shape) for k, v in sd.items() if k not in meta_keys}

    model = competition_inject(meta_diffsynth_unet(), RANK, ALPHA)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if ".lora_" in k}
    assert set(ours) - set(expected) == set(), "keys the competition's loader would silently drop"
    assert set(expected) - set(ours) == set(), "LoRA modules the competition's loader would leave at init"
    assert ours == expected  # and every shape

    result = model.load_state_dict(sd, strict=False)
    assert [k for k in result.missing_keys if ".lora_" in k] == []
    # The only keys strict=False ignores are our three inline metadata tensors.
    assert set(result.unexpected_keys) == meta_keys


def test_diffsynth_modelmanager_loader_accepts_the_file(real):
    """DiffSynth's own ModelManager.load_lora path (GeneralLoRAFromPeft) recognises the file too."""
    from diffsynth.models.lora import GeneralLoRAFromPeft, SDXLLoRAFromCivitai

    sd = torch.load(real.files["diffsynth"], map_location="cpu", weights_only=True)
    plain = meta_diffsynth_unet()
    assert SDXLLoRAFromCivitai().match(plain, sd) is None
    assert GeneralLoRAFromPeft().match(plain, sd) == ("", "")


def test_diffsynth_trainer_checkpoint_reads_back_on_the_real_architecture(tmp_path, caplog):
    """The key set DiffSynth's trainer writes (its own on_save_checkpoint) maps onto the diffusers UNet."""
    from diffsynth.trainers.text_to_image import LightningModelForT2ILoRA
    from peft.utils import get_peft_model_state_dict

    ds = meta_diffsynth_unet()
    trainer_module = LightningModelForT2ILoRA()
    ds.requires_grad_(False)  # the trainer's freeze_parameters()
    trainer_module.add_lora_to_model(ds, lora_rank=RANK, lora_alpha=4.0, lora_target_modules="to_q,to_k,to_v,to_out")
    trainer_module.pipe = SimpleNamespace(denoising_model=lambda: ds)
    checkpoint = {"epoch": 0, "global_step": 500, "state_dict": {}}
    trainer_module.on_save_checkpoint(checkpoint)
    assert checkpoint and all(".lora_" in k for k in checkpoint)
    path = tmp_path / "epoch=0-step=500.ckpt"
    torch.save({k: torch.zeros(v.shape) for k, v in checkpoint.items()}, path)

    lf = read_lora(path)  # no unet_config: the real Kolors architecture
    unet = meta_kolors_unet()
    add_lora(unet, rank=RANK, alpha=4.0)
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(unet).items()}
    assert {k: tuple(v.shape) for k, v in lf.state_dict.items()} == expected
    assert (lf.format, lf.rank, lf.alpha, lf.alpha_source) == (
        "diffsynth_trainer", RANK, DIFFSYNTH_DEFAULT_ALPHA, "fallback default")
    assert sorted(lf.target_modules) == ["to_k", "to_out.0", "to_q", "to_v"]


def test_kohya_and_diffusers_files_read_by_diffusers_on_the_real_architecture(real):
    """diffusers' own reader turns both files into exactly our peft keys, with our rank and alpha."""
    from diffusers import KolorsPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    def diffusers_read(path):  # offline, diffusers wants folder + weight_name
        return KolorsPipeline.lora_state_dict(str(path.parent), weight_name=path.name, return_lora_metadata=True)

    sd, alphas, _ = diffusers_read(real.files["kohya"])
    peft_sd = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in sd.items()})
    assert {k: tuple(v.shape) for k, v in peft_sd.items()} == real.peft_shapes
    assert set(alphas.values()) == {ALPHA}

    sd, _, meta = diffusers_read(real.files["diffusers"])
    assert {k.removeprefix("unet."): tuple(v.shape) for k, v in sd.items()} == real.peft_shapes
    assert (meta["unet.r"], meta["unet.lora_alpha"]) == (RANK, ALPHA)

    for fmt in ("kohya", "diffsynth", "diffusers"):
        lf = read_lora(real.files[fmt])
        assert {k: tuple(v.shape) for k, v in lf.state_dict.items()} == real.peft_shapes, fmt
        assert (lf.rank, lf.alpha, lf.metadata) == (RANK, ALPHA, {"base_model_hash": "kolors"})
