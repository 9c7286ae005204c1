"""Section ``coherence``: what keeping the characters consistent costs at real Kolors size, counted
on the meta device (no weights): the FLOPs of a denoising step of a scene that reads one
reference's shared tokens against a plain step, and, from the memory planner, the IP-Adapter's
weights and the reference tokens recorded per reference scene for a 1024² story.
"""

from __future__ import annotations

import dataclasses

import torch

from kolors_story import tiny
from kolors_story.accounting import FlopCount
from kolors_story.bench.timing import GB, TFLOP, BenchContext
from kolors_story.generate.sharing import install_sharing
from kolors_story.models import architectures as configs
from kolors_story.plan.coherence import adapter_bytes, shared_token_bytes
from kolors_story.plan.count import build_on, unet_inputs


def count_shared_step(unet_config: dict, resolution: int, sharing) -> dict:
    """FLOPs of one UNet call with CFG (2 rows): plain, then reading one recorded reference."""
    from diffusers import UNet2DConditionModel

    unet = build_on("meta", lambda: UNet2DConditionModel(**unet_config), torch.float16).eval()
    x, t, enc, added = unet_inputs(unet, 2, resolution, resolution, 256, torch.float16)

    def call() -> int:
        with torch.no_grad(), FlopCount() as flops:
            unet(x, t, encoder_hidden_states=enc, added_cond_kwargs=added, return_dict=False)
        return flops.total

    plain = call()
    # kept on the (meta) device: shapes only, nothing to copy to the CPU
    state, undo = install_sharing(unet, dataclasses.replace(sharing, record_device="device"), 1100, None)
    try:
        state.begin_batch("record", [0])
        call()  # records the reference's tokens (meta tensors: shapes only)
        state.begin_batch("read", [1], [True])
        shared = call()
    finally:
        undo()
    return {"plain": plain, "reading": shared, "recorded_bytes_per_call": state.bank.nbytes}


def section_coherence(ctx: BenchContext) -> dict:
    from kolors_story.config.compose import compose_settings

    model = "tiny" if ctx.quick else "kolors"
    job = compose_settings("generate", [f"model={model}", "coherence=both"])
    unet_config = tiny.architecture("unet") if ctx.quick else configs.KOLORS_UNET_CONFIG
    resolution = 64 if ctx.quick else 1024
    ctx.log(f"coherence: counting a shared-attention UNet call at {resolution}² on the meta device ...")
    flops = count_shared_step(unet_config, resolution, job.coherence.sharing)
    job.sampler.height = job.sampler.width = resolution
    return {
        "resolution": resolution, "sharing": {k: getattr(job.coherence.sharing, k) for k in
                                              ("blocks", "start", "end", "token_ratio", "strength")},
        "unet_call_tflop": {"plain": flops["plain"] / TFLOP, "reading": flops["reading"] / TFLOP},
        "reading_over_plain": flops["reading"] / flops["plain"],
        "ip_adapter_gb": adapter_bytes(job.coherence, unet_config, "float16") / GB,
        "shared_tokens_gb_per_reference": shared_token_bytes(job.coherence, unet_config, job.sampler, "float16") / GB,
        "steps": job.sampler.steps,
    }
