"""The stages a run goes through and what each needs on the device: the weights resident at that
moment (which models are loaded, offloaded or released) plus the counted work of the stage.

Residency follows the code as it runs: generation loads text encoder, UNet and VAE together
(``memory.offload=none``) and may drop the text encoder after the prompts
(``memory.release_text_encoder``); model offload keeps one model on the device at a time,
sequential offload one layer. A quantized text encoder (``model.text_encoder_quant``) weighs its
int8/nf4 codes and scales, and holds one dequantized layer while it encodes. Training never loads
the text encoder (the cache did); with validation on, the VAE and the aesthetic predictor stay on
the device next to the UNet and the LoRA's optimizer state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kolors_story import tiny
from kolors_story.config import (
    EvaluateSettings,
    GenerateSettings,
    ModelSettings,
    ScorerSettings,
    TrainSettings,
)
from kolors_story.lora import DEFAULT_TARGETS
from kolors_story.models import architectures as real
from kolors_story.plan import count
from kolors_story.plan.coherence import adapter_bytes, shared_token_bytes
from kolors_story.story import story_scenes

GB = 1e9
# Counted tensor bytes are a floor for what the CUDA caching allocator holds (block rounding,
# fragmentation, kernel workspaces): the work of a stage is planned with this factor on top.
WORK_FACTOR = 1.15


@dataclass
class Stage:
    name: str
    weights: int  # bytes of weights (and optimizer state) on the device during the stage
    work: int  # counted peak bytes of the stage's own tensors
    settings: dict = field(default_factory=dict)  # the knobs that shape this stage

    @property
    def peak(self) -> int:
        return self.weights + int(WORK_FACTOR * self.work)


@dataclass
class Sizes:
    """The configs the plan counts with, and the dtypes the weights are loaded in."""

    unet: str
    vae: str
    text_encoder: str
    scorer: str
    dtype: str
    clip: str | None = None  # CLIP with its text tower, when prompt alignment (CLIP-T) is scored

    @property
    def decode_dtype(self) -> str:
        """The pipeline upcasts a VAE marked ``force_upcast`` to float32 for decoding fp16 latents."""
        return "float32" if self.dtype == "float16" and json.loads(self.vae).get("force_upcast") else self.dtype

    @property
    def size_multiple(self) -> int:
        """Image sizes divide into whole latents at the UNet's deepest level."""
        levels = len(json.loads(self.vae)["block_out_channels"]) + len(json.loads(self.unet)["block_out_channels"]) - 2
        return 2 ** levels

    def weights(self, kind: str, sequential: bool = False, quant: str = "none") -> int:
        """Bytes of one model's weights on the device (``quant``: the text encoder's scheme)."""
        if kind == "clip" and self.clip is None:
            return 0
        if kind == "text_encoder" and quant != "none" and not sequential:
            return count.quantized_text_encoder_bytes(self.text_encoder, self.dtype, quant)
        config, dtype = {"unet": (self.unet, self.dtype), "vae": (self.vae, self.dtype),
                         "text_encoder": (self.text_encoder, self.dtype), "scorer": (self.scorer, "float32"),
                         "clip": (self.clip, "float32")}[kind]
        if sequential:
            return count.largest_module_bytes(kind, config, dtype)
        return count.param_bytes(kind, config, dtype)

    def encode_work(self, prompts: int, quant: str = "none") -> int:
        """ChatGLM3's counted work on ``prompts``; a quantized one also holds a dequantized layer."""
        work = count.text_encode(self.text_encoder, prompts, self.dtype)
        return work + (count.dequantized_layer_bytes(self.text_encoder, self.dtype) if quant != "none" else 0)


def _read(folder: Path, name: str) -> dict | None:
    try:
        return json.loads((folder / name / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def planning_sizes(model: ModelSettings, scorer: ScorerSettings) -> Sizes:
    """The model folder's own config files when they are there (stand-ins are built first);
    otherwise the real Kolors release's: a plan needs no weights."""

    tiny.provide_model(model)
    tiny.provide_scorer(scorer)
    if scorer.alignment:
        tiny.provide_clip(scorer)
    root = Path(str(model.path)).expanduser()
    vae_root = Path(str(model.vae_path)).expanduser() if model.vae_path else None
    unet = _read(root, "unet") or real.KOLORS_UNET_CONFIG
    vae = (_read(vae_root.parent, vae_root.name) if vae_root and vae_root.is_dir() else None) or _read(root, "vae")
    if vae is None and vae_root is not None:  # the sdxl-vae-fp16-fix, not downloaded yet: it decodes in fp16
        vae = {**real.SDXL_VAE_CONFIG, "force_upcast": False}
    text = _read(root, "text_encoder") or real.KOLORS_TEXT_ENCODER_CONFIG
    scorer_cfg = _read(Path(str(scorer.path)).expanduser().parent, Path(str(scorer.path)).name)
    scorer_cfg = scorer_cfg or real.REAL_PREDICTOR_CONFIG
    scorer_cfg = {k: v for k, v in scorer_cfg.items() if not k.startswith("_") and k not in ("transformers_version",)}
    clip = None
    if scorer.alignment:
        clip = _read(Path(str(scorer.clip_path)).expanduser().parent, Path(str(scorer.clip_path)).name)
        clip = clip or real.REAL_CLIP_CONFIG
        clip = {k: v for k, v in clip.items() if k in ("projection_dim", "logit_scale_init_value", "text_config",
                                                       "vision_config")}
    return Sizes(count.key(unet), count.key(vae or real.SDXL_VAE_CONFIG), count.key(text), count.key(scorer_cfg),
                 str(model.dtype), count.key(clip) if clip else None)


def _lora_bytes(paths) -> int:
    return sum(Path(p).stat().st_size for p in paths if Path(p).is_file())


# --------------------------------------------------------------------------------- generation


def generate_stages(sizes: Sizes, job: GenerateSettings, lora_files=()) -> list[Stage]:
    """Encode prompts, denoise, decode (then the hires refine and scoring when they run)."""
    s, m = job.sampler, job.memory
    n_scenes = len(story_scenes(job.story, job.sampler))
    b = min(s.batch_size, n_scenes * s.best_of.n)
    cfg_batch = 2 * b if s.cfg > 1 else b
    seq = m.offload == "sequential"
    final_scores = job.score or bool(job.submit.team and job.submit.score)
    scoring = final_scores or s.best_of.n > 1
    aligning = final_scores or (s.best_of.n > 1 and s.best_of.select == "story")  # CLIP-T (generate.checks)
    scorer_here = scoring and str(job.scorer.device).split(":")[0] == str(job.model.device).split(":")[0]
    scorer_w = (sizes.weights("scorer") + sizes.weights("clip") * aligning) if scorer_here else 0
    unet_config = json.loads(sizes.unet)
    unet_w = sizes.weights("unet", seq) + _lora_bytes(lora_files) + adapter_bytes(job.coherence, unet_config, sizes.dtype)
    shared = _shared_tokens(sizes, job, unet_config)
    shared_here = shared if job.coherence.sharing.record_device == "device" else 0

    quant = job.model.text_encoder_quant

    def resident(active: str, te_gone: bool) -> int:
        if m.offload == "none":
            te = 0 if te_gone else sizes.weights("text_encoder", quant=quant)
            return te + unet_w + sizes.weights("vae") + scorer_w
        return {"encode": sizes.weights("text_encoder", seq, quant), "unet": unet_w, "vae": sizes.weights("vae", seq),
                "score": 0}[active] + scorer_w

    gone = m.release_text_encoder
    knobs = {"offload": m.offload, "release_text_encoder": gone, **_quant_knob(quant)}
    upcast = sizes.weights("vae", seq) * (sizes.decode_dtype != sizes.dtype)  # the float32 copy for decoding
    stages = [
        Stage("encode prompts", resident("encode", False), sizes.encode_work(n_scenes, quant),
              {**knobs, "prompts": n_scenes}),
        Stage("denoise", resident("unet", gone) + shared_here,
              count.unet_call(sizes.unet, cfg_batch, s.height, s.width, sizes.dtype, m.attention,
                              keep=m.keeps_prompt_projections()),
              {**knobs, "batch_size": b, **_keep_knob(m), **_shared_knob(job, shared)}),
        Stage("decode", resident("vae", gone) + upcast, count.vae_decode(sizes.vae, b, s.height, s.width, sizes.decode_dtype,
                                                                m.vae_slicing, m.vae_tiling),
              {**knobs, "batch_size": b, "vae_slicing": m.vae_slicing, "vae_tiling": m.vae_tiling}),
    ]
    if s.hires.enabled:
        mult = sizes.size_multiple
        fh, fw = (max(mult, int(round(v * s.hires.scale / mult)) * mult) for v in (s.height, s.width))
        work = max(count.vae_encode(sizes.vae, b, fh, fw, sizes.dtype),
                   count.unet_call(sizes.unet, cfg_batch, fh, fw, sizes.dtype, m.attention,
                                   keep=m.keeps_prompt_projections()),
                   count.vae_decode(sizes.vae, b, fh, fw, sizes.decode_dtype, m.vae_slicing, m.vae_tiling))
        stages.append(Stage(f"hires refine ({fw}x{fh})", resident("unet", gone) + sizes.weights("vae", seq) + shared_here, work,
                            {**knobs, "batch_size": b, "vae_slicing": m.vae_slicing, "vae_tiling": m.vae_tiling}))
    if scorer_here:
        stages.append(Stage("score", resident("score", gone), count.score_batch(sizes.scorer, job.scorer.batch_size),
                            {"batch_size": job.scorer.batch_size}))
    return stages


def _keep_knob(m) -> dict:
    """Kept prompt projections, in the plan's settings only when off (on is the default)."""
    return {} if m.keeps_prompt_projections() else {"keep_prompt_projections": False}


def _quant_knob(quant: str) -> dict:
    """A quantized text encoder, in the plan's settings (none: not shown, as before it existed)."""
    return {"text_encoder_quant": quant} if quant != "none" else {}


def _shared_tokens(sizes: Sizes, job, unet_config: dict) -> int:
    hires = None
    if job.sampler.hires.enabled:
        mult = sizes.size_multiple
        hires = tuple(max(mult, int(round(v * job.sampler.hires.scale / mult)) * mult)
                      for v in (job.sampler.height, job.sampler.width))
    return shared_token_bytes(job.coherence, unet_config, job.sampler, sizes.dtype, hires)


def _shared_knob(job, shared: int) -> dict:
    """Where the reference tokens of consistent self-attention wait (in the plan's settings)."""
    if not shared:
        return {}
    return {"shared_tokens_gb": round(shared / GB, 2), "shared_tokens_on": job.coherence.sharing.record_device}


# --------------------------------------------------------------------------------- training


def _data_stages(sizes: Sizes, job: TrainSettings) -> list[Stage]:
    """The data stage's models, each alone on the device and released before the cache."""
    stages = []
    if job.dataset.captioner != "none":
        from kolors_story.models.captioner import CAPTION_MAX_SIDE

        dtype = job.dataset.captioner_dtype if job.dataset.captioner_dtype != "auto" else "bfloat16"
        stages.append(Stage("data: captions", count.captioner_weights(job.dataset.captioner, dtype),
                            count.caption_batch(job.dataset.captioner, job.dataset.captioner_batch_size,
                                                CAPTION_MAX_SIDE, job.dataset.captioner_max_tokens, dtype),
                            {"captioner_batch_size": job.dataset.captioner_batch_size}))
    if job.filter.min_aesthetic is not None:
        stages.append(Stage("data: aesthetic curation", sizes.weights("scorer"),
                            count.score_batch(sizes.scorer, job.scorer.batch_size), {"batch_size": job.scorer.batch_size}))
    return stages


def _cache_stages(sizes: Sizes, job: TrainSettings, h: int, w: int, n_scenes: int) -> list[Stage]:
    cache_b = job.cache.batch_size
    # cache.devices: each process holds its own encoder on its own GPU, so the peak per device is
    # the same; on the CPU the processes' copies add up in RAM
    knobs = {"cache_batch_size": cache_b,
             "cache_devices": job.cache.devices if job.cache.devices is not None else (
                 "trainer.devices" if str(job.model.device).startswith("cuda") else 1)}
    quant = job.model.text_encoder_quant
    return [Stage("cache: prompt embeddings", sizes.weights("text_encoder", quant=quant),
                  sizes.encode_work(max(cache_b, n_scenes), quant), {**knobs, **_quant_knob(quant)}),
            Stage("cache: VAE latents", sizes.weights("vae"), count.vae_encode(sizes.vae, cache_b, h, w, sizes.dtype),
                  knobs)]


def _reward_stage(sizes: Sizes, job: TrainSettings, trained: int, beside: int, adapter: tuple,
                  size: tuple[int, int]) -> Stage:
    """The reward step: UNet (+LoRA) with gradient, VAE decode and the scorer's backward, while the
    diffusion loss's graph (same step, one backward for both) is still held."""
    r, t = job.reward, job.trainer
    grad_steps = int(r.draft_k) if r.method == "draft" else 1
    targets = tuple(job.lora.target_modules)
    work = count.reward_step(sizes.unet, sizes.vae, sizes.scorer, int(r.batch_size), int(r.resolution), sizes.dtype,
                             t.gradient_checkpointing, job.lora.rank, targets, grad_steps, float(r.guidance) > 1, adapter)
    work += count.train_forward_held(sizes.unet, t.batch_size, *size, sizes.dtype, t.gradient_checkpointing,
                                     job.lora.rank, targets, adapter=adapter)
    needed = sizes.weights("vae") + sizes.weights("scorer")  # already in ``beside`` when validation keeps them
    return Stage("reward step", trained + max(needed, beside), work,
                 {"reward_batch_size": int(r.batch_size), "reward_resolution": int(r.resolution)})


def _validation_stages(sizes: Sizes, job: TrainSettings, held: int, n_scenes: int) -> list[Stage]:
    """Each checkpoint's story: denoise, decode, score (``held``: what stays on the device)."""
    s = job.sampler
    b = min(s.batch_size, n_scenes)
    unet_config = json.loads(sizes.unet)
    shared = _shared_tokens(sizes, job, unet_config)
    # the IP-Adapter is loaded for the render only
    held += adapter_bytes(job.coherence, unet_config, sizes.dtype)
    held += shared if job.coherence.sharing.record_device == "device" else 0
    return [
        Stage("validation: denoise", held, count.unet_call(sizes.unet, 2 * b if s.cfg > 1 else b, s.height,
                                                           s.width, sizes.dtype),
              {"validation_batch_size": b, **_shared_knob(job, shared)}),
        Stage("validation: decode", held, count.vae_decode(sizes.vae, b, s.height, s.width, sizes.decode_dtype,
                                                           job.memory.vae_slicing, job.memory.vae_tiling),
              {"validation_batch_size": b, "vae_slicing": job.memory.vae_slicing}),
        Stage("validation: score", held, count.score_batch(sizes.scorer, job.scorer.batch_size),
              {"batch_size": job.scorer.batch_size}),
    ]


def _character_stages(sizes: Sizes, job: TrainSettings) -> list[Stage]:
    """``character=auto`` (train.character), before the style LoRA, each piece alone on the device:
    the phrasings' prompts, then per round the candidates (the validation renders' shape), their
    embedding and the entity LoRA's step (its rank, the attention projections)."""
    c, s, quant = job.character, job.sampler, job.model.text_encoder_quant
    if not c.enabled:
        return []
    b = min(s.batch_size, c.candidates)
    lora = count.lora_params(sizes.unet, c.rank, DEFAULT_TARGETS)
    render = sizes.weights("unet") + 2 * lora + sizes.weights("vae")  # the previous round's LoRA, in fp16
    knobs = {"candidates": c.candidates, "validation_batch_size": b}
    vae_work = max(count.vae_decode(sizes.vae, b, s.height, s.width, sizes.decode_dtype, job.memory.vae_slicing,
                                    job.memory.vae_tiling), count.vae_encode(sizes.vae, b, s.height, s.width, sizes.dtype))
    return [
        Stage("character: prompt embeddings", sizes.weights("text_encoder", quant=quant),
              sizes.encode_work(len(c.phrasings), quant), {"phrasings": len(c.phrasings), **_quant_knob(quant)}),
        Stage("character: denoise", render, count.unet_call(sizes.unet, 2 * b if s.cfg > 1 else b, s.height, s.width,
                                                            sizes.dtype), knobs),
        Stage("character: decode + latents", render, vae_work, knobs),
        Stage("character: embed", render + sizes.weights("scorer"), count.score_batch(sizes.scorer, job.scorer.batch_size),
              {"batch_size": job.scorer.batch_size}),
        Stage("character: LoRA step", sizes.weights("unet") + 16 * lora,  # fp32 weights + grads + AdamW's moments
              count.train_step(sizes.unet, c.batch_size, s.height, s.width, sizes.dtype,
                               job.trainer.gradient_checkpointing, c.rank, DEFAULT_TARGETS),
              {"rank": c.rank, "batch_size": c.batch_size,
               "gradient_checkpointing": job.trainer.gradient_checkpointing}),
    ]


def train_stages(sizes: Sizes, job: TrainSettings) -> list[Stage]:
    """Cache build (text encoder, then VAE), the training step, then each checkpoint's story."""
    t = job.trainer
    res = job.dataset.resolution
    h, w = (int(res), int(res)) if isinstance(res, (int, str)) else (int(res[0]), int(res[1]))
    n_scenes = len(story_scenes(job.story, job.sampler))
    targets = tuple(job.lora.target_modules)
    adapter = (job.lora.type, job.lora.conv_rank)
    lora = count.lora_params(sizes.unet, job.lora.rank, targets, adapter)
    lora_state = (16 + 4 * t.ema.enabled) * lora  # LoRA fp32 weights + grads + AdamW's two moments (+ EMA copy)
    unet_w = sizes.weights("unet")
    beside = (sizes.weights("vae") + sizes.weights("scorer") + sizes.weights("clip")) if job.validate else 0  # stay loaded
    stages = _data_stages(sizes, job) + _cache_stages(sizes, job, h, w, n_scenes) + _character_stages(sizes, job)
    stages.append(Stage("train step", unet_w + lora_state + beside,
                        count.train_step(sizes.unet, t.batch_size, h, w, sizes.dtype, t.gradient_checkpointing,
                                         job.lora.rank, targets, adapter=adapter),
                        {"batch_size": t.batch_size, "gradient_checkpointing": t.gradient_checkpointing}))
    if job.reward.name != "none":
        stages.append(_reward_stage(sizes, job, unet_w + lora_state, beside, adapter, (h, w)))
    if job.validate:  # the optimizer state stays, gradients are freed
        stages += _validation_stages(sizes, job, unet_w + 12 * lora + beside, n_scenes)
    return stages


def evaluate_stages(sizes: Sizes, job: EvaluateSettings) -> list[Stage]:
    return [Stage("score", sizes.weights("scorer") + sizes.weights("clip"), count.score_batch(sizes.scorer, job.scorer.batch_size),
                  {"batch_size": job.scorer.batch_size})]
