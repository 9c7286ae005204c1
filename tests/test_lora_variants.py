"""Adapter types (``lora.type``: lora, dora, loha, lokr; ``lora.conv_rank``: LoCon) on the tiny UNet:
every written file reads back (project reader) to the in-memory adapter's output, the formats that
cannot hold a type are skipped with a reason, and the kohya/LyCORIS file follows ComfyUI's key and
weight rules (written here from ComfyUI's public ``comfy/lora.py`` and ``comfy/weight_adapter/``).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from kolors_story.errors import SettingsError
from kolors_story.lora import (
    FILE_NAMES,
    add_lora,
    load_lora_into_pipeline,
    read_lora,
    save_lora,
)
from kolors_story.lora.reader import _load_tensors

TOL = 1e-5  # same module, same float32 maths: only summation order may differ
EFFECT = 1e-2  # each adapter moves the UNet output by more than this
# (type, conv_rank, rank): rank 4 gives LoKr two full Kronecker factors on the tiny 64-wide layers
# (its scale is baked on export), rank 2 a low-rank second factor.
CASES = [("dora", None, 4), ("loha", None, 4), ("lokr", None, 4), ("lokr", None, 2),
         ("lora", 4, 4), ("dora", 2, 4), ("loha", 2, 4), ("lokr", 2, 2)]
WRITTEN = {"lora": {"diffusers", "kohya", "diffsynth"}, "dora": {"diffusers", "kohya"}, "loha": {"kohya"},
           "lokr": {"kohya"}}


def case_id(case) -> str:
    kind, conv, rank = case
    return f"{kind}-r{rank}" + (f"-conv{conv}" if conv else "")


@pytest.fixture(scope="module")
def base_unet():
    from diffusers import UNet2DConditionModel

    from kolors_story.tiny.architectures import tiny_unet_config

    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_unet_config()).eval()


def fresh(base_unet):
    return copy.deepcopy(base_unet)


def with_adapter(base_unet, kind, conv, rank, seed=3):
    """The tiny UNet with a trained-looking adapter: peft starts it at zero, so every weight is moved."""
    unet = fresh(base_unet)
    add_lora(unet, rank=rank, alpha=2.0, type=kind, conv_rank=conv, conv_alpha=1.0 if conv else None)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return unet


def unet_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    c = unet.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    with torch.no_grad():
        return unet(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]),
                    encoder_hidden_states=torch.randn(1, 7, c.cross_attention_dim, generator=g),
                    added_cond_kwargs={"text_embeds": torch.randn(1, pooled, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}).sample


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_written_file_reads_back_to_the_in_memory_adapter(base_unet, tmp_path, case):
    kind, conv, rank = case
    unet = with_adapter(base_unet, kind, conv, rank)
    expected, base = unet_output(unet), unet_output(base_unet)
    assert float((expected - base).abs().max()) > EFFECT
    files = save_lora(unet, tmp_path, {"dataset_hash": "d1"})
    written = WRITTEN[kind] - ({"diffsynth"} if conv else set())
    assert set(files) == written and all(files[f].is_file() for f in written)
    assert set(files.skipped) == {"diffusers", "kohya", "diffsynth"} - written
    assert not any((tmp_path / FILE_NAMES[fmt]).exists() for fmt in files.skipped)  # never written wrong
    for fmt, path in files.items():
        lf = read_lora(path)
        assert (lf.type, lf.rank, lf.metadata["dataset_hash"]) == (kind, rank, "d1"), fmt
        assert lf.info["skipped"] == files.skipped
        if conv:  # the convolutions carry their own rank/alpha
            assert set(lf.rank_pattern.values()) == ({conv} if conv != rank else set())
            assert any(m.endswith("conv1") for m in lf.modules)
        other = fresh(base_unet)
        load_lora_into_pipeline(SimpleNamespace(unet=other), path)
        assert float((unet_output(other) - expected).abs().max()) < TOL, fmt


# ----------------------------------------------------------------------- ComfyUI's rules, restated


def comfy_key_map(unet) -> dict[str, str]:
    """comfy/lora.py model_lora_keys_unet: ``lora_unet_`` + the diffusers weight path without
    ``.weight``, dots as underscores (via comfy.utils.unet_to_diffusers) -> that UNet weight."""
    return {"lora_unet_" + n[: -len(".weight")].replace(".", "_"): n[: -len(".weight")]
            for n in unet.state_dict() if n.endswith(".weight")}


def comfy_load(lora: dict, key_map: dict) -> tuple[dict, set]:
    """comfy/lora.py load_lora with the LoRA/LoHa/LoKr adapters' ``load``: module -> patch, keys read."""
    patches, loaded = {}, set()
    for x, module in key_map.items():
        alpha = lora[f"{x}.alpha"].item() if f"{x}.alpha" in lora else None
        dora = lora.get(f"{x}.dora_scale")
        names = [n for n in ("lora_up.weight", "lora_down.weight", "lora_mid.weight", "hada_w1_a", "hada_w1_b",
                             "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w2", "lokr_w1_a",
                             "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2") if f"{x}.{n}" in lora]
        if not names:
            continue
        loaded |= {f"{x}.{n}" for n in names} | ({f"{x}.alpha"} if alpha is not None else set())
        loaded |= {f"{x}.dora_scale"} if dora is not None else set()
        patches[module] = ({n: lora[f"{x}.{n}"] for n in names}, alpha, dora)
    return patches, loaded


def comfy_weight(weight: torch.Tensor, patch) -> torch.Tensor:
    """calculate_weight of comfy/weight_adapter/{lora,loha,lokr}.py at strength 1. DoRA: LyCORIS'
    output-axis decomposition (norm of the merged weight per output row). ComfyUI's own output-axis
    branch takes that norm of the base weight instead (weight_decompose in base.py), so its DoRA
    differs from LyCORIS/peft by the factor ||W|| / ||W + dW|| per row; see the README."""
    t, alpha, dora = patch
    w = weight.double()
    if "lora_up.weight" in t:
        up, down = t["lora_up.weight"].double(), t["lora_down.weight"].double()
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        diff = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    elif "hada_w1_a" in t:
        scale = alpha / t["hada_w1_b"].shape[0] if alpha is not None else 1.0
        m1 = t["hada_w1_a"].double() @ t["hada_w1_b"].double()
        m2 = t["hada_w2_a"].double() @ t["hada_w2_b"].double()
        diff = (m1 * m2).reshape(w.shape)
    else:
        dim = None
        w1 = t.get("lokr_w1")
        if w1 is None:
            dim, w1 = t["lokr_w1_b"].shape[0], t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t.get("lokr_w2")
        if w2 is None:
            dim, w2 = t["lokr_w2_b"].shape[0], t["lokr_w2_a"] @ t["lokr_w2_b"]
        w1, w2 = w1.double(), w2.double()
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        diff = torch.kron(w1, w2).reshape(w.shape)
    merged = w + scale * diff
    if dora is not None:
        assert dora.shape[0] == w.shape[0]  # ComfyUI reads the axis from shape[0]: the output axis
        norm = merged.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1))
        merged = merged * dora.double() / norm
    return merged


def peft_merged(unet) -> dict[str, torch.Tensor]:
    """Each adapted module's weight with the adapter merged by peft itself."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged_unet = copy.deepcopy(unet)
    out = {}
    for name, module in merged_unet.named_modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=["default"])
            out[name] = module.get_base_layer().weight.detach().double()
    return out


@pytest.mark.parametrize("case", [("lora", None, 4), *CASES], ids=case_id)
def test_kohya_file_loads_in_comfyui_by_its_key_and_weight_rules(base_unet, tmp_path, case):
    kind, conv, rank = case
    unet = with_adapter(base_unet, kind, conv, rank)
    path = save_lora(unet, tmp_path)["kohya"]
    lora, _ = _load_tensors(path)
    patches, loaded = comfy_load(lora, comfy_key_map(base_unet))
    assert loaded == set(lora), sorted(set(lora) - loaded)[:5]  # ComfyUI would log these as "not loaded"
    expected = peft_merged(unet)
    assert set(patches) == set(expected)
    base = base_unet.state_dict()
    for module, patch in patches.items():
        got = comfy_weight(base[module + ".weight"], patch)
        assert float((got - expected[module]).abs().max()) < TOL, module
    assert any(float((expected[m] - base[m + ".weight"].double()).abs().max()) > EFFECT for m in expected)


def test_diffusers_own_loader_reads_dora_and_locon_files(base_unet, tmp_path):
    """diffusers' load_lora_weights (no kolors_story code) rebuilds DoRA and the conv ranks from our file."""
    from diffusers.loaders.peft import PeftAdapterMixin  # noqa: F401 - the UNet's load_lora_adapter

    for kind, conv in (("dora", None), ("lora", 2)):
        unet = with_adapter(base_unet, kind, conv, 4)
        path = save_lora(unet, tmp_path / kind)["diffusers"]
        other = fresh(base_unet)
        other.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="unet", adapter_name="theirs")
        assert float((unet_output(other) - unet_output(unet)).abs().max()) < TOL, kind


def test_bad_adapter_settings_name_the_key(base_unet):
    with pytest.raises(SettingsError, match=r"lora.type='boft'"):
        add_lora(fresh(base_unet), rank=4, alpha=4, type="boft")
    with pytest.raises(SettingsError, match=r"lora.dropout=0.1 applies to lora/dora only"):
        add_lora(fresh(base_unet), rank=4, alpha=4, type="loha", dropout=0.1)
    with pytest.raises(SettingsError, match=r"lora.conv_rank=-2"):
        add_lora(fresh(base_unet), rank=4, alpha=4, conv_rank=-2)


def test_trainable_parameters_are_exactly_the_adapter(base_unet):
    for kind, names in (("dora", {"lora_A", "lora_B", "lora_magnitude_vector"}),
                        ("loha", {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
                        ("lokr", {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b"})):  # conv rank 2: w2 low-rank
        unet = add_lora(fresh(base_unet), rank=4, alpha=4, type=kind, conv_rank=2)
        trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
        assert {part for n in trainable for part in n.split(".") if part in names} == names, kind
        assert all(any(part in names for part in n.split(".")) and "default" in n.split(".") for n in trainable)
        assert any(".conv1." in n for n in trainable) and not any("conv_in" in n for n in trainable)
