"""Gradient checkpointing for the UNet that does not recompute the prompt's keys and values.

Checkpointing recomputes each block's forward during the backward. A cross-attention's key and value
projections of the prompt (Kolors: 256 tokens of 2048) are frozen and depend on the prompt alone:
their output is the same size at every image size (85 MB a sample in fp16 for Kolors' 70 blocks),
yet at small sizes they are a large share of the work (at 256², 174 of the forward's 559 GFLOP).
So each block with a cross-attention has them computed once, before its checkpoint, without
gradient; while the block runs (its forward, then its recompute) the frozen layers hand back those
outputs. A LoRA on ``to_k`` / ``to_v`` still runs inside the block (only its frozen base is kept),
so the gradients are the same bits as plain checkpointing. The memory plan counts what is kept,
because it enables checkpointing through this module too. (torch's selective checkpointing could
keep them as well, but its dispatch mode costs Python time on every op of every block.)
"""
from __future__ import annotations

import inspect
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from kolors_story.models.prompt_projections import override_forward, restore_forward


def _frozen_prompt_linears(attentions) -> list[torch.nn.Linear]:
    """The frozen linears of these cross-attentions' keys and values (peft's base layer when an
    adapter wraps them); empty when something in them trains."""
    linears = []
    for attn in attentions:
        for proj in (attn.to_k, attn.to_v):
            linear = getattr(proj, "base_layer", proj)
            if not isinstance(linear, torch.nn.Linear) or any(p.requires_grad for p in linear.parameters()):
                return []
            linears.append(linear)
    return linears


_BEFORE = "_forward_before_served"


def _serving(linear: torch.nn.Linear, compute):
    """``linear``'s forward that hands back its served output when called on the very tensor it is for."""
    def forward(x, *args, **kwargs):
        served = linear._served_output
        if served is not None and served[0] is x:
            return served[1]
        return compute(x, *args, **kwargs)
    return forward


def _run_serving(block, linears, prompt, outputs):
    def run(*args):
        for linear, out in zip(linears, outputs):
            linear._served_output = (prompt, out)
        try:
            return block(*args)
        finally:
            for linear in linears:
                linear._served_output = None
    return run


def _checkpoint_block(blocks: dict[int, tuple[int, list]], module, *args):
    index, linears = blocks.get(id(module), (None, []))
    prompt = args[index] if index is not None and index < len(args) else None
    if not isinstance(prompt, torch.Tensor) or prompt.requires_grad:  # a ResNet block, or nothing to keep
        return checkpoint(module.__call__, *args, use_reentrant=False)
    with torch.no_grad():  # frozen layers on a prompt without gradient: autograd needs nothing from them
        outputs = [linear(prompt) for linear in linears]
    return checkpoint(_run_serving(module, linears, prompt, outputs), *args, use_reentrant=False)


def set_gradient_checkpointing(unet, on: bool) -> None:
    """Turn the UNet's gradient checkpointing on (keeping the prompt projections) or off. Call it
    after the adapters are added (before works too: the served layer is then the adapter's base)."""
    for linear in getattr(unet, "_kept_prompt_linears", ()):
        restore_forward(linear, _BEFORE)
        linear.__dict__.pop("_served_output", None)
    unet._kept_prompt_linears = []
    if not on:
        unet.disable_gradient_checkpointing()
        return
    blocks = {}
    for block in unet.modules():  # the parent of a cross-attention: what diffusers checkpoints (BasicTransformerBlock)
        attentions = [m for m in block.children() if getattr(m, "is_cross_attention", False)]
        params = list(inspect.signature(type(block).forward).parameters) if attentions else []
        linears = _frozen_prompt_linears(attentions) if "encoder_hidden_states" in params else []
        if linears:
            blocks[id(block)] = (params.index("encoder_hidden_states") - 1, linears)  # args have no self
            for linear in linears:
                linear._served_output = None
                override_forward(linear, partial(_serving, linear), _BEFORE)
            unet._kept_prompt_linears += linears
    unet.enable_gradient_checkpointing(partial(_checkpoint_block, blocks))
