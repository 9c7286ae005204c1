"""The prompt's projections in the UNet, computed once and served again.

A cross-attention's key and value projections (``to_k`` / ``to_v``) of the prompt depend on the
prompt alone, as does Kolors' projection of ChatGLM3's 4096-wide states to the UNet's 2048
(``encoder_hid_proj``). Their output is the same size at every image size (for Kolors' 70
cross-attentions 85 MB a prompt in fp16), yet at small sizes they are a large share of a UNet
forward (at 256², 174 of its 559 GFLOP; at 1024², 3 %). Two places compute them again and again:

- a denoising loop, once a step, on the same prompt tensor: :func:`keep_across_steps` makes these
  layers keep their last output while :func:`kept_across_steps` is active (one render batch), and
  hand it back when called on the very same tensor, unchanged, without gradient;
- gradient checkpointing, in the recompute: ``models.checkpointing`` serves the frozen base layers.

Both replace the layer's ``forward`` on the instance, over whatever was there (an accelerate hook's
forward is kept and restored).
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

KEPT_LAYERS = "_kept_across_steps"  # attribute of the UNet: the layers keep_across_steps wrapped
_BEFORE = "_forward_before_keeping"


def override_forward(layer: torch.nn.Module, make: Callable[[Callable], Callable], slot: str) -> None:
    """Replace ``layer``'s forward with ``make(current forward)``; what was on the instance before
    (e.g. an accelerate hook's forward) waits in the attribute ``slot`` (one per kind of override)."""
    setattr(layer, slot, layer.__dict__.get("forward"))
    layer.forward = make(layer.forward)


def restore_forward(layer: torch.nn.Module, slot: str) -> None:
    """Undo :func:`override_forward`: the forward on the instance before it (or the class's)."""
    before = layer.__dict__.pop(slot, None)
    layer.__dict__.pop("forward", None)
    if before is not None:
        layer.forward = before


def prompt_layers(unet) -> list[torch.nn.Module]:
    """The layers whose output depends on the prompt alone: Kolors' text projection (when it is a
    Linear: with an IP-Adapter diffusers moves it to ``text_encoder_hid_proj``) and every
    cross-attention's ``to_k`` / ``to_v`` (a LoRA on them included: fixed during a render)."""
    text = [getattr(unet, name, None) for name in ("text_encoder_hid_proj", "encoder_hid_proj")]
    layers = [m for m in text if isinstance(m, torch.nn.Linear)]
    attentions = [m for m in unet.modules() if getattr(m, "is_cross_attention", False)]  # diffusers' Attention
    return layers + [proj for attn in attentions for proj in (attn.to_k, attn.to_v)]


def _version(x: torch.Tensor):
    return None if x.is_inference() else x._version  # inference tensors have no version counter


def _keeping(layer: torch.nn.Module, compute: Callable) -> Callable:
    def forward(x, *args, **kwargs):
        kept = layer._kept_output  # None outside kept_across_steps
        if kept is None or args or kwargs or torch.is_grad_enabled() or not isinstance(x, torch.Tensor):
            return compute(x, *args, **kwargs)
        if kept and kept[0] is x and kept[1] == _version(x):
            return kept[2]
        out = compute(x)
        layer._kept_output = (x, _version(x), out)  # the latest prompt only: a new one replaces it
        return out
    return forward


def keep_across_steps(unet, on: bool = True) -> None:
    """Let the UNet's prompt layers keep their output during :func:`kept_across_steps` (``on=False``:
    undo). Install it after LoRAs and an IP-Adapter are loaded, so the kept output includes them."""
    for layer in getattr(unet, KEPT_LAYERS, ()):
        restore_forward(layer, _BEFORE)
        layer.__dict__.pop("_kept_output", None)
    setattr(unet, KEPT_LAYERS, [])
    if not on:
        return
    layers = prompt_layers(unet)
    for layer in layers:
        layer._kept_output = None
        override_forward(layer, lambda compute, layer=layer: _keeping(layer, compute), _BEFORE)
    setattr(unet, KEPT_LAYERS, layers)


@contextmanager
def kept_across_steps(unet):
    """While active (one render batch: its denoising steps, its hires refine), the prompt layers
    that :func:`keep_across_steps` installed serve their output again for the same prompt tensor.
    Outside it they compute as usual and hold nothing: weights or LoRA scales may change between
    renders (training validation), and the kept tensors would cost memory while the VAE decodes."""
    layers = getattr(unet, KEPT_LAYERS, ())
    for layer in layers:
        layer._kept_output = ()
    try:
        yield
    finally:
        for layer in layers:
            layer._kept_output = None


def drop_kept(unet) -> None:
    """Let go of what is kept (the last denoising step is done; the VAE decodes next)."""
    for layer in getattr(unet, KEPT_LAYERS, ()):
        if layer._kept_output is not None:
            layer._kept_output = ()
