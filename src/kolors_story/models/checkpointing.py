"""Gradient checkpointing for the UNet that keeps the cross-attention's prompt projections.

Checkpointing recomputes each block's forward during the backward. The keys and values a
cross-attention makes from the prompt (Kolors: 256 tokens of 2048) are the same size at every image
size, yet at small ones they are a large share of the work: at 256² they are 174 of the UNet
forward's 559 GFLOP. So they are kept instead of recomputed, with torch's selective checkpointing:
inside each cross-attention's ``to_k`` / ``to_v`` the matmuls over the prompt's features are saved,
everything else is recomputed as before. Gradients are bit-identical to plain checkpointing; the
cost is those projections' outputs (Kolors fp16: 85 MB per sample), which the memory plan counts
because it enables checkpointing through this module too.
"""
from __future__ import annotations

import threading
from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

# The width of the prompt features the projection being run reads (0: none runs), per thread: on a
# GPU the backward, and so the recompute, runs in autograd's device thread.
_projection = threading.local()
_MATMULS = {torch.ops.aten.mm.default: 0, torch.ops.aten.addmm.default: 1}  # op -> which argument is the input


def _keep_prompt_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    # Only products over the prompt's features (the base layer; a LoRA's down-projection): a LoRA's
    # up-projection has the rank as its inner dimension and is cheaper to redo than to hold.
    width = getattr(_projection, "width", 0)
    index = _MATMULS.get(op)
    if width and index is not None and args[index].shape[-1] == width:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _checkpoint_block(keeps: set[int], module, *args):
    if id(module) not in keeps:  # a ResNet block: nothing to keep, and no dispatch overhead
        return checkpoint(module.__call__, *args, use_reentrant=False)
    return checkpoint(module.__call__, *args, use_reentrant=False,
                      context_fn=partial(create_selective_checkpoint_contexts, _keep_prompt_matmuls))


def _prompt_projections(unet) -> list[torch.nn.Module]:
    """Each cross-attention's key and value projections (diffusers' ``Attention``)."""
    return [getattr(m, name) for m in unet.modules() if getattr(m, "is_cross_attention", False)
            for name in ("to_k", "to_v")]


def _enter(module, args) -> None:
    _projection.width = int(args[0].shape[-1])


def _leave(module, args, output) -> None:
    _projection.width = 0


def set_gradient_checkpointing(unet, on: bool) -> None:
    """Turn the UNet's gradient checkpointing on (keeping the prompt projections) or off.
    Call it after the adapters are added, so the hooks sit on the layers that run."""
    for handle in getattr(unet, "_prompt_projection_hooks", ()):
        handle.remove()
    unet._prompt_projection_hooks = []
    if not on:
        unet.disable_gradient_checkpointing()
        return
    projections = _prompt_projections(unet)
    for p in projections:
        unet._prompt_projection_hooks += [p.register_forward_pre_hook(_enter), p.register_forward_hook(_leave)]
    inside = {id(p) for p in projections}
    keeps = {id(block) for block in unet.modules() if any(id(m) in inside for m in block.modules())}
    unet.enable_gradient_checkpointing(partial(_checkpoint_block, keeps))
