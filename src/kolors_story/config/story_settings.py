"""The rendering groups: ``story``, ``sampler`` (hires, best-of), ``memory``, ``coherence``, the submission bundle and the leaderboard.

Every key with its type, default and a one-line comment (see :mod:`kolors_story.config`)."""

# No ``from __future__ import annotations`` here: OmegaConf reads these annotations at runtime.
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import II


@dataclass
class StorySettings:
    title: str = "story"  # used in the submission bundle name <Team>-KolorsTraining-<title>
    language: str = "zh"  # which prompt language to render: zh or en (Kolors reads both; zh is its strength)
    trigger: str = ""  # text put in front of every prompt, e.g. the LoRA's trigger words ("二次元，")
    style: Optional[str] = None  # the style's name, shown in the model card (null: the prompts speak for it)
    seeds: Optional[List[int]] = None  # per-scene seeds; null -> sampler.base_seed + scene index
    character: Optional[Any] = None  # the main character as the prompts name it (text or {zh, en}): scenes naming it are coherence's references
    scenes: List[Any] = field(default_factory=list)  # each {description, prompt, negative}, a text or {zh: ..., en: ...}
    file: Optional[str] = None  # your own story: a YAML, JSON or CSV file of scenes (python -m kolors_story.story new <path>)


@dataclass
class HiresSettings:
    enabled: bool = False  # two-stage: generate at height x width, upscale, refine with KolorsImg2ImgPipeline
    scale: float = 1.5  # final size = stage-1 size x scale (rounded to what the UNet accepts)
    upscaler: str = "lanczos"  # pixel upscaling before the refine: lanczos, bicubic, bilinear, nearest
    strength: float = 0.35  # share of the schedule the refine re-noises: 0 keeps the upscale, 1 redraws
    steps: int = 30  # refine schedule length; int(steps x strength) steps actually run
    cfg: Optional[float] = None  # guidance of the refine; null -> sampler.cfg


@dataclass
class BestOfSettings:
    n: int = 1  # candidates per scene (1 = off)
    seed_stride: int = 1000  # candidate k of a scene uses its seed + k x seed_stride (k=0: the scene's own seed)
    select: str = "scene"  # scene: each scene's highest aesthetic score; story: the 8 chosen together (scorer.objective)
    restarts: int = 8  # select=story beyond 100k combinations: random starts of the coordinate ascent


@dataclass
class SamplerSettings:
    scheduler: str = "euler"  # euler (what Kolors ships), euler_karras, euler_a, heun, lms, ddim, dpmpp_2m, dpmpp_2m_karras, dpmpp_2m_sde_karras, unipc
    scheduler_kwargs: Dict[str, Any] = field(default_factory=dict)  # extra scheduler options on top of the model's config, e.g. {timestep_spacing: trailing}
    steps: int = 50  # denoising steps per image
    cfg: float = 4.0  # classifier-free guidance scale (prompt vs negative prompt)
    height: int = II("model.resolution")  # image height in pixels (multiple of 8 x the UNet's downsampling)
    width: int = II("model.resolution")  # image width in pixels
    base_seed: int = 0  # seed of scene i is base_seed + i when no per-scene list is given
    seeds: Optional[List[int]] = II("story.seeds")  # per-scene seed list (the story's own by default); null -> base_seed + index
    batch_size: int = 8  # scenes denoised together; lower it when GPU memory is short (generate.py on a CPU: 4 unless set)
    hires: HiresSettings = field(default_factory=HiresSettings)  # the two-stage hires refine
    best_of: BestOfSettings = field(default_factory=BestOfSettings)  # best-of-N candidates per scene


@dataclass
class MemorySettings:
    auto: bool = False  # choose batch size, VAE slicing/tiling, text-encoder release, offload (training: gradient checkpointing, cache batch) to fit the GPU
    budget_gb: Optional[float] = None  # GPU memory to plan for; null -> the GPU's own (set it to plan for a GPU you don't have)
    offload: str = "none"  # none | model (one whole model on the GPU at a time) | sequential (layer by layer: least VRAM, slowest)
    offload_device: Optional[str] = None  # device to offload to; null -> model.device (skipped with a warning when there is no GPU)
    vae_tiling: bool = False  # VAE in overlapping tiles above its native 1024² (hires 2048²); a no-op when the image fits one tile
    vae_slicing: bool = False  # VAE decodes a batch one image at a time: peak VAE memory of a single image (generate.py on a CPU: on unless set)
    release_text_encoder: bool = False  # drop ChatGLM3 (12.0 GB fp16) once the story's prompts are encoded (generate.py on a CPU: on unless set)
    allow_quantized_text_encoder: bool = False  # memory=auto may quantize ChatGLM3 (int8, then nf4) before offloading; off: its quality on the real weights is unmeasured
    attention: str = "sdpa"  # sdpa (torch scaled_dot_product_attention) | eager (plain matmul+softmax) | sliced (attention slicing)
    attention_slice_size: Any = "auto"  # with attention=sliced: auto (half the heads at a time), max (one head) or a number of heads
    keep_prompt_projections: bool = True  # the prompt's cross-attention keys/values computed once a render batch, not every step: same images, a third less work per step at 256², 3 % at 1024², for 85 MB per prompt (fp16; CFG: 2 per scene); off with compile
    channels_last: bool = False  # UNet and VAE convolutions in channels-last memory layout (usually faster on recent GPUs)
    compile: bool = False  # torch.compile the UNet: a long first call (minutes on a CPU), faster afterwards on a GPU
    compile_mode: str = "default"  # torch.compile mode: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs
    compile_backend: str = "inductor"  # torch.compile backend: inductor (real speedup) or eager/aot_eager (only checks tracing)

    def keeps_prompt_projections(self) -> bool:
        """Kept prompt projections, where they apply: a compiled UNet computes them in its graph
        (serving them would make it guard on which tensor is the prompt and recompile)."""
        return bool(self.keep_prompt_projections) and not self.compile


@dataclass
class SharingSettings:
    enabled: bool = False  # consistent self-attention: scenes also attend to the reference scenes' tokens (two passes)
    strength: float = 1.0  # how much of the shared attention replaces each reading scene's own (0 = off: byte-identical)
    reference_scenes: Optional[List[int]] = None  # 1-based scenes the others read; null -> the first scene naming story.character (else scene 1)
    blocks: List[str] = field(default_factory=lambda: ["up_blocks"])  # UNet blocks whose self-attention shares (name prefixes)
    start: float = 0.0  # share from this point of the denoising (0 = pure noise) ...
    end: float = 0.5  # ... up to this one (1 = the last step); the reference pass records only this window
    token_ratio: float = 0.5  # share of each reference's tokens the others see per layer (a fixed random subset)
    seed: int = 0  # seed of those token subsets
    record_device: str = "cpu"  # where the reference tokens wait between the passes: cpu, or device (the model's: faster, GPU memory)

    def used(self) -> bool:
        """On, with a strength that changes anything (strength 0 renders exactly as off)."""
        return bool(self.enabled) and float(self.strength) > 0


@dataclass
class TinyIPAdapterSpec:
    seed: int = 0  # seed of the tiny IP-Adapter's weights when weights=random
    weights: str = "random"  # random, or pretrained: trained on the pre-trained tiny Kolors (shipped; seed 0)


@dataclass
class ReferenceSettings:
    image: Optional[str] = None  # a character sheet: scenes are conditioned on it through Kolors-IP-Adapter-Plus
    scene: Optional[int] = None  # or: render this scene (1-based) first, then condition the others on it
    scale: float = 0.5  # IP-Adapter strength for every scene (0 = off: byte-identical)
    scales: Optional[List[float]] = None  # per scene instead (0 where the character is absent); null -> `scale` everywhere
    path: str = "models/Kolors-IP-Adapter-Plus"  # ip_adapter_plus_general.safetensors + image_encoder/ (python -m kolors_story.download ip_adapter)
    weight_name: str = "ip_adapter_plus_general.safetensors"  # the adapter file inside `path`
    tiny: Optional[TinyIPAdapterSpec] = None  # non-null -> build a tiny IP-Adapter-Plus (model=tiny) into `path` first

    def used(self) -> bool:
        """A reference is configured and some scene uses it (all strengths 0 render exactly as unset)."""
        scales = list(self.scales) if self.scales is not None else [self.scale]
        return (self.image is not None or self.scene is not None) and any(float(v) > 0 for v in scales)


@dataclass
class CoherenceSettings:
    """Keeping the characters the same across the 8 panels (generate.coherence)."""

    sharing: SharingSettings = field(default_factory=SharingSettings)  # consistent self-attention across scenes
    reference: ReferenceSettings = field(default_factory=ReferenceSettings)  # a reference image through IP-Adapter-Plus


@dataclass
class SubmitSettings:
    team: Optional[str] = None  # your team name; set it to write the bundle <team>-KolorsTraining-<story.title>/
    dir: Optional[str] = None  # where the bundle folder goes; null -> output_dir
    score: bool = True  # put aesthetic scores (per image, mean, min, coherence) in the bundle and model card
    overwrite: bool = False  # replace an existing bundle folder of the same name


@dataclass
class LeaderboardSettings:
    objective: str = "mean"  # mean, min, coherence, or story (the story objective of scorer.objective, gate first)
    require_pass: bool = True  # checkpoints passing the gate (mean >= scorer.threshold) rank first
    top: int = 10  # rows printed
