"""Every config key of the project: its type, its default and a one-line comment, in one place.

These dataclasses are registered with Hydra's ConfigStore (:func:`register_configs`) as the
schema of each config group: every option file in ``conf/<group>/`` starts from its schema
(``defaults: [/<group>_schema@_here_]``) and sets only what it changes, so a default lives here
once, and a mistyped value (``trainer.seed=abc``) fails when the config is composed, with Hydra's
message naming the key. The library receives these objects (built from a composed or recorded
config by :func:`kolors_story.configs.to_settings`), never the raw config.

Defaults written ``II("...")`` are interpolations Hydra fills in (``sampler.height`` follows
``model.resolution``); code that builds these objects directly passes real values for them.
"""

# No ``from __future__ import annotations`` here: OmegaConf reads these annotations at runtime.
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import II, MISSING, SI

# ----------------------------------------------------------------------------------- model


@dataclass
class TinyModelSpec:
    weights: str = "pretrained"  # pretrained: UNet + VAE trained on drawn scenes (shipped, sha256-checked); random: plumbing only
    seed: int = 0  # seed of the random weights: same seed -> same model, bit for bit (pretrained: 0 only)
    layout: str = "kolors"  # release layout it is saved in: kolors (Kwai-Kolors/Kolors) or diffusers (Kolors-diffusers)


@dataclass
class ModelSettings:
    name: str = "kolors"  # shown in outputs, manifests and W&B
    path: str = "models/kolors/Kolors"  # folder in either layout: Kwai-Kolors/Kolors (tokenizer in text_encoder/) or Kolors-diffusers
    vae_path: Optional[str] = "models/sdxl-vae-fp16-fix"  # separate fp16-fix VAE (folder or .safetensors); null -> the release's own vae/
    dtype: str = "float16"  # dtype the weights are loaded in: float16, bfloat16 or float32
    device: str = "cuda"  # device the pipeline runs on: cuda, cuda:1, cpu
    resolution: int = 1024  # native training/sampling size; sampler and dataset default to it
    tiny: Optional[TinyModelSpec] = None  # only for model=tiny: the spec of the random model built into `path`


@dataclass
class TinyScorerSpec:
    seed: int = 0  # seed of the tiny random predictor's weights
    taste: Optional[str] = None  # null/none: random scores near 0; brightness: 1 + 8 x mean brightness; paper: 1 + 8 x paper-likeness (light, unsaturated)


@dataclass
class StoryObjectiveSettings:
    """How a story is judged as a whole (evaluate.selection.Objective): the gate first, then
    mean aesthetic + coherence_weight x CLIP-I + alignment_weight x CLIP-T - copy_paste_weight x copy-paste."""

    min_floor: Optional[float] = None  # gate: every panel's aesthetic score at least this too (null: no floor)
    coherence_weight: float = 2.0  # weight of CLIP-I (style/identity kept across panels, 0..1)
    alignment_weight: float = 2.0  # weight of CLIP-T (each panel shows its own prompt, ~0.2-0.35 when it does)
    copy_paste_weight: float = 5.0  # penalty per share of panel pairs that are copies (0..1)


@dataclass
class ScorerSettings:
    path: str = "models/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE"  # the competition's predictor folder (python -m kolors_story.download scorer)
    device: str = II("model.device")  # device the CLIP ViT-L/14 runs on
    batch_size: int = 8  # images per forward pass (scores are identical to one-by-one)
    threshold: float = 6.0  # pass/fail gate on the mean score (competition rule)
    alignment: bool = True  # score each panel against its English prompt with CLIP ViT-L/14 (CLIP-T); needs clip_path
    clip_path: str = "models/clip-vit-large-patch14"  # CLIP with its text tower (python -m kolors_story.download clip)
    duplicate_cosine: float = 0.97  # panels whose CLIP image embeddings are at least this close are copies
    duplicate_pixels: float = 0.02  # ... and so are panels whose 64x64 grey thumbnails differ by at most this (0..1)
    objective: StoryObjectiveSettings = field(default_factory=StoryObjectiveSettings)  # the story objective's weights
    tiny: Optional[TinyScorerSpec] = None  # non-null -> build a tiny random predictor into `path` first (plumbing tests only)


# ------------------------------------------------------------------------------------ data


@dataclass
class DatasetSettings:
    name: str = MISSING  # dataset name: the processed data goes to data/<name>
    source: str = "folder"  # folder | lowres_anime | demo
    path: str = "data/my_style"  # the folder of images (not searched recursively; metadata rows may name sub-folders)
    caption_prefix: str = ""  # fixed text put before every caption (trigger words, e.g. "二次元，")
    default_caption: Optional[str] = None  # caption for images without one (null: a missing caption is reported as a bad file)
    on_bad_file: str = "skip"  # skip: drop bad files and list them in report.json; fail: stop with the list
    max_pixels: Optional[int] = 100_000_000  # decompression-bomb guard: images declaring more pixels are rejected unread
    workers: int = 1  # preflight processes (decode + stage in parallel; same files, reasons and order as 1)
    allow_outside: bool = False  # false: files resolving outside `path` (../x, /abs, links out) are rejected unread
    rebuild: bool = False  # true: redo preflight + filtering even when sources, captions and recipe are unchanged
    resolution: Any = II("model.resolution")  # training size: an int (square) or [height, width]; resized to cover it, then cropped
    crop: str = "center"  # center or random (a random crop is drawn once per image from trainer.seed and cached)
    buckets: Optional[Any] = None  # aspect-ratio buckets: null (every image cropped to resolution), auto (~resolution² pixels, 1:2..2:1, sides x64) or [[h, w], ...]
    caption_dropout: float = 0.0  # share of samples trained with the empty caption (helps CFG; 0.05-0.1 is common); 0 -> off
    shuffle_tags: bool = False  # train on reordered comma-separated tags (caption_prefix and keep_tokens stay first)
    keep_tokens: int = 0  # shuffle_tags: tags after caption_prefix that keep their place
    shuffle_variants: int = 4  # shuffle_tags: tag orders cached per caption (the caption as written is one of them)
    captioner: str = "none"  # write captions with a vision-language model: none, qwen2_vl (Qwen2-VL-2B, small) or qwen2_5_vl (Qwen2.5-VL-7B, strong)
    caption_mode: str = "missing"  # missing (only images without a caption), replace (every caption) or append (after the existing one)
    caption_language: str = "zh"  # zh or en: the language the captioner writes (Kolors reads both)
    captioner_path: Optional[str] = None  # the captioner's folder; null -> models/<its release name> (python -m kolors_story.download captioner)
    captioner_device: str = II("model.device")  # device the captioner runs on (released before the cache is built)
    captioner_dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16 or float32
    captioner_batch_size: int = 4  # images per generate call
    captioner_max_tokens: int = 96  # longest generated caption, in tokens (Kolors reads 256 prompt tokens)
    captioner_tiny: bool = False  # build a tiny random captioner of the same class into captioner_path first (plumbing tests only)


@dataclass
class DemoDatasetSettings(DatasetSettings):
    source: str = "demo"  # drawn by code (kolors_story.data.demo)
    seed: int = 0  # drawing seed: same seed -> same images, bit for bit


@dataclass
class ModelScopeDatasetSettings(DatasetSettings):
    source: str = "lowres_anime"  # the baseline's ModelScope dataset
    repo: str = "AI-ModelScope/lowres_anime"  # ModelScope dataset id, loaded with MsDataset.load
    subset: str = "default"  # MsDataset subset_name
    split: str = "train"  # MsDataset split
    limit: Optional[int] = None  # take only the first N images (null: all)
    caption: Optional[str] = "二次元"  # caption of every image (the baseline's); null: use the dataset's own text column


# dataset.source -> the schema of that source's keys
DATASET_SCHEMAS = {"folder": DatasetSettings, "demo": DemoDatasetSettings, "lowres_anime": ModelScopeDatasetSettings}


@dataclass
class FilterSettings:
    name: str = MISSING  # recipe name, recorded in report.json
    process: List[Any] = field(default_factory=list)  # data-juicer ops, passed to dj-process as they are (batch_size 1 is added per op)
    np: int = 1  # dj-process worker processes (1 is fastest for a few hundred images)
    executor: str = "default"  # default (data-juicer's own executor, np processes) or ray (its Ray executor, for large sets)
    ray_address: Optional[str] = None  # executor=ray: null -> a Ray instance started for the run (and stopped with it); auto or <host:port> -> that cluster
    timeout: Optional[float] = None  # seconds before dj-process is stopped (null: no limit)
    min_aesthetic: Optional[float] = None  # drop images the competition's aesthetic predictor scores below this (e.g. 5.0); null -> off
    dedup: bool = False  # drop near-duplicates (perceptual hash), keeping the best-scored / largest of each group
    dedup_distance: int = 6  # pHash Hamming distance (of 64 bits) at or below which two images are near-duplicates


@dataclass
class CacheSettings:
    batch_size: int = 4  # images / captions per VAE / text-encoder call when building the latent/embedding cache
    devices: Optional[int] = None  # processes building the cache, one GPU each on CUDA (same files as 1); null -> trainer.devices on CUDA, 1 on CPU


# ----------------------------------------------------------------------------------- train


@dataclass
class LoraSettings:
    type: str = "lora"  # lora, dora (LoRA + learned per-row magnitude), loha (Hadamard product) or lokr (Kronecker product)
    rank: int = 16  # LoRA rank r: capacity of the low-rank update
    alpha: float = 4.0  # LoRA alpha: the update is scaled by alpha / rank
    target_modules: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])  # UNet attention projections that get a LoRA
    init: str = "gaussian"  # initialisation of lora_A: gaussian (as DiffSynth/baseline), default or kaiming (peft's)
    dropout: float = 0.0  # dropout on the LoRA input during training (lora/dora only)
    conv_rank: Optional[int] = None  # LoCon: also adapt the ResNet and down/upsampler convolutions with this rank; null -> attention only
    conv_alpha: Optional[float] = None  # alpha of the convolution adapters; null -> lora.alpha


@dataclass
class OptimSettings:
    name: str = "adamw"  # adamw, adamw8bit (bitsandbytes, CUDA), prodigy (set lr=1: it finds its own step) or adafactor
    lr: float = 1.0e-4  # peak learning rate
    weight_decay: float = 0.01  # weight decay on the LoRA weights
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam betas (adamw, adamw8bit, prodigy)
    eps: float = 1.0e-8  # Adam epsilon (adamw, adamw8bit, prodigy)
    schedule: str = "constant"  # constant, cosine, linear, polynomial or cosine_with_restarts (after warmup)
    warmup_steps: int = 0  # linear warmup steps from 0 to lr
    cycles: int = 1  # cosine_with_restarts: number of cosine cycles
    power: float = 1.0  # polynomial: decay power (1 = linear)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # more keyword arguments for the optimiser (e.g. prodigy's d_coef)


@dataclass
class LossSettings:
    type: str = "mse"  # mse (DiffSynth's), huber or smooth_l1 (robust to outlier pixels; both use huber_delta)
    huber_delta: float = 0.1  # huber/smooth_l1: where the loss turns from quadratic to linear
    debiased_estimation: bool = False  # weight each sample by 1/sqrt(SNR(t)) (Yu et al. 2023, kohya's option)
    input_perturbation: float = 0.0  # noise the input with (noise + this x extra noise), target the noise alone (Ning et al. 2023); 0 -> off
    timestep_min: int = 0  # smallest training timestep
    timestep_max: Optional[int] = None  # one past the largest; null -> the schedule's length (1100 for Kolors)
    timestep_distribution: str = "uniform"  # uniform, logit_normal, low (favours small t: detail) or high (large t: layout)
    logit_mean: float = 0.0  # logit_normal: mean of the normal before the sigmoid
    logit_std: float = 1.0  # logit_normal: its standard deviation
    bias_power: float = 2.0  # low/high: how strongly (u^power of a uniform u)


@dataclass
class EmaSettings:
    enabled: bool = False  # keep an exponential moving average of the LoRA weights; checkpoints export it as *_ema.* files
    decay: float = 0.999  # its decay per update (diffusers EMAModel: min(decay, (1+n)/(10+n)) at the n-th update)
    every: int = 1  # update it every N optimizer steps


@dataclass
class TrainerSettings:
    accelerator: str = "auto"  # auto, gpu, cpu
    devices: Any = 1  # number of devices (processes with ddp), a list of ids, or auto
    num_nodes: int = 1  # machines (multi-node ddp/deepspeed)
    strategy: str = "auto"  # auto, ddp, deepspeed_stage_2 ... (Lightning strategy names)
    precision: str = "16-mixed"  # 32, 16-mixed, bf16-mixed; 16-mixed falls back to 32 on a CPU-only machine
    gradient_checkpointing: bool = True  # recompute UNet activations in backward: less memory, ~1/3 more time
    accumulate_grad_batches: int = 1  # optimizer step every N batches
    gradient_clip_val: Optional[float] = None  # clip the gradient norm to this value; null -> no clipping
    batch_size: int = 1  # images per batch (per device)
    num_workers: int = 0  # dataloader worker processes
    max_epochs: Optional[int] = 1  # epochs to train (null -> until max_steps)
    max_steps: int = -1  # stop after this many optimizer steps (-1: no limit)
    steps_per_epoch: Optional[int] = 500  # batches per epoch (DiffSynth's default; images are cycled); null -> one pass over the dataset
    checkpoint_every_n_steps: int = 250  # save LoRA + render the validation story every N optimizer steps (and at the end)
    log_every_n_steps: int = 1  # a metrics.jsonl/W&B train line every N optimizer steps
    min_snr_gamma: Optional[float] = None  # min-SNR-gamma loss weighting (5.0 is the paper's value); null -> plain MSE
    noise_offset: float = 0.0  # offset noise strength (e.g. 0.05: darker darks / brighter brights); 0 -> off
    progress_bar: bool = True  # Lightning's progress bar (steps/epoch counts)
    seed: int = 42  # seed of LoRA init, noise, timesteps, data order and random crops
    validation_split: float = 0.0  # held-out items for the validation loss: a share (<1) or a count (>=1); 0 -> off
    validation_timesteps: List[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])  # where it is scored
    ema: EmaSettings = field(default_factory=EmaSettings)  # exponential moving average of the LoRA weights
    loss: LossSettings = field(default_factory=LossSettings)  # loss type, weighting and timestep sampling


@dataclass
class LoggerSettings:
    project: str = "kolors-story"  # W&B project
    entity: Optional[str] = None  # W&B team/user; null -> your default
    mode: str = SI("${oc.env:WANDB_MODE,offline}")  # online, offline or disabled
    group: Optional[str] = None  # W&B group; multiruns default to the sweep folder name
    name: Optional[str] = None  # run name; null -> built from the overrides
    tags: List[str] = field(default_factory=list)  # extra tags
    dir: Optional[str] = None  # folder W&B writes its run files into; null -> the run folder (<run>/wandb/)


# ------------------------------------------------------------------------ story + sampling


@dataclass
class StorySettings:
    title: str = "story"  # used in the submission bundle name <Team>-KolorsTraining-<title>
    language: str = "zh"  # which prompt language to render: zh or en (Kolors reads both; zh is its strength)
    trigger: str = ""  # text put in front of every prompt, e.g. the LoRA's trigger words ("二次元，")
    style: Optional[str] = None  # the style's name, shown in the model card (null: the prompts speak for it)
    seeds: Optional[List[int]] = None  # per-scene seeds; null -> sampler.base_seed + scene index
    character: Optional[Any] = None  # the main character as the prompts name it (text or {zh, en}): scenes naming it are coherence's references
    scenes: List[Any] = field(default_factory=list)  # each {description, prompt, negative}, a text or {zh: ..., en: ...}


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
    batch_size: int = 8  # scenes denoised together; lower it when GPU memory is short
    hires: HiresSettings = field(default_factory=HiresSettings)  # the two-stage hires refine
    best_of: BestOfSettings = field(default_factory=BestOfSettings)  # best-of-N candidates per scene


@dataclass
class MemorySettings:
    auto: bool = False  # choose batch size, VAE slicing/tiling, text-encoder release, offload (training: gradient checkpointing, cache batch) to fit the GPU
    budget_gb: Optional[float] = None  # GPU memory to plan for; null -> the GPU's own (set it to plan for a GPU you don't have)
    offload: str = "none"  # none | model (one whole model on the GPU at a time) | sequential (layer by layer: least VRAM, slowest)
    offload_device: Optional[str] = None  # device to offload to; null -> model.device (skipped with a warning when there is no GPU)
    vae_tiling: bool = False  # VAE in overlapping tiles above its native 1024² (hires 2048²); a no-op when the image fits one tile
    vae_slicing: bool = False  # VAE decodes a batch one image at a time: peak VAE memory of a single image
    release_text_encoder: bool = False  # drop ChatGLM3 (12.5 GB fp16) once the story's prompts are encoded
    attention: str = "sdpa"  # sdpa (torch scaled_dot_product_attention) | eager (plain matmul+softmax) | sliced (attention slicing)
    attention_slice_size: Any = "auto"  # with attention=sliced: auto (half the heads at a time), max (one head) or a number of heads
    channels_last: bool = False  # UNet and VAE convolutions in channels-last memory layout (usually faster on recent GPUs)
    compile: bool = False  # torch.compile the UNet: a long first call (minutes on a CPU), faster afterwards on a GPU
    compile_mode: str = "default"  # torch.compile mode: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs
    compile_backend: str = "inductor"  # torch.compile backend: inductor (real speedup) or eager/aot_eager (only checks tracing)


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
    seed: int = 0  # seed of the tiny random IP-Adapter's weights
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


# ------------------------------------------------------------------------------ the jobs


@dataclass
class RewardSettings:
    name: str = "none"  # none (plain LoRA training) or aesthetic (refine the LoRA on the competition's aesthetic score)
    method: str = "refl"  # refl (one denoising step with gradient at a late step) or draft (gradient through the last draft_k steps)
    weight: float = 1.0  # w: the reward loss is -w x score; 0 -> exactly the plain LoRA run
    target: Optional[float] = 7.0  # stop pushing a render's score past this (the gradient is cut above it); null -> no cap
    diffusion_weight: float = 1.0  # lambda: the ordinary diffusion loss on the style data beside the reward, so the style survives
    steps: int = 20  # denoising steps of the reward renders (the model's own Euler scheduler)
    refl_steps: List[int] = field(default_factory=lambda: [14, 19])  # refl: the step index (inclusive range) where the gradient step is taken, drawn per step
    draft_k: int = 1  # draft: the last K denoising steps carry the gradient
    guidance: float = 5.0  # CFG scale of the reward renders
    resolution: int = 512  # reward render size in pixels (the scorer sees 224 x 224: 512 saves memory on small GPUs)
    batch_size: int = 1  # prompts per reward step
    held_out: int = 2  # story scenes kept out of the reward, rendered and scored at every checkpoint (early stopping)
    patience: int = 0  # stop after this many checkpoints without a better held-out score; 0 -> never
    init_from: Optional[str] = None  # refine an existing LoRA: a run folder (its last checkpoint) or a LoRA file; null -> a fresh LoRA


@dataclass
class TrainConfig:
    """`python train.py`: conf/train.yaml."""

    model: ModelSettings = MISSING
    scorer: ScorerSettings = MISSING
    dataset: DatasetSettings = MISSING
    filter: FilterSettings = MISSING
    lora: LoraSettings = MISSING
    optim: OptimSettings = MISSING
    trainer: TrainerSettings = MISSING
    story: StorySettings = MISSING
    sampler: SamplerSettings = MISSING
    logger: LoggerSettings = MISSING
    memory: MemorySettings = MISSING
    coherence: CoherenceSettings = MISSING
    reward: RewardSettings = MISSING  # reward refinement on the aesthetic score (reward=aesthetic; none: off)
    stage: str = "all"  # all (data + train), data (prepare + cache only) or train (reuse prepared data)
    resume: Optional[str] = None  # a previous run folder (or one of its checkpoints/step-* folders): continue from its last checkpoint
    validate: bool = True  # render + score the story (sampler group) at every checkpoint
    before_after: bool = True  # when a validated run finishes: the story at LoRA scale 0 and 1 -> before_after.png/.json (2 renders)
    data_dir: str = "data/${dataset.name}"  # processed dataset + report.json + cache for this dataset (shared by runs)
    output_dir: Optional[str] = II("hydra:runtime.output_dir")  # run folder: checkpoints/, metrics.jsonl, panels, W&B files
    cache: CacheSettings = field(default_factory=CacheSettings)  # the latent/embedding cache
    plan_only: bool = False  # print the memory plan, write plan.json, load nothing; exit 0 if it fits, 2 if not


@dataclass
class GenerateConfig:
    """`python generate.py`: conf/generate.yaml."""

    model: ModelSettings = MISSING
    scorer: ScorerSettings = MISSING
    story: StorySettings = MISSING
    sampler: SamplerSettings = MISSING
    memory: MemorySettings = MISSING
    coherence: CoherenceSettings = MISSING
    output_dir: Optional[str] = II("hydra:runtime.output_dir")  # where 1.png..8.png, panel.png, prompts.csv, manifest.json are written
    lora_path: Optional[str] = None  # a LoRA file (any of the three formats or a DiffSynth epoch=..-step=..ckpt); rank/alpha are read from it
    lora_scale: float = 1.0  # strength of lora_path (or of run='s checkpoint): 0 -> the base model's image, 1 -> as trained
    loras: List[Any] = field(default_factory=list)  # more LoRAs stacked after lora_path: [{path: <file>, scale: 1.0}, ...]
    run: Optional[str] = None  # a train.py run folder (or a best.yaml): model/story/sampler from its config, LoRA from `checkpoint`
    checkpoint: str = "last"  # with run=: step-XXXXXX, last, best (best.yaml in the run/sweep folder) or a best.yaml path
    reproduce: Optional[str] = None  # a manifest.json, output folder or bundle: regenerate it and compare pixel by pixel (exit 1 if any differs)
    score: bool = False  # score the images with the aesthetic predictor (scores.json + manifest); bundles always score
    plan_only: bool = False  # print the memory plan, write plan.json, load nothing; exit 0 if it fits, 2 if not
    overwrite: bool = False  # replace a story already in output_dir (refused otherwise); it is replaced as one unit
    submit: SubmitSettings = field(default_factory=SubmitSettings)  # the competition submission bundle


@dataclass
class EvaluateConfig:
    """`python evaluate.py`: conf/evaluate.yaml."""

    model: ModelSettings = MISSING
    scorer: ScorerSettings = MISSING
    logger: LoggerSettings = MISSING
    memory: MemorySettings = MISSING
    images: Optional[str] = None  # folder with the story images (1.png..8.png, or any images) or a generate.py run folder
    output_dir: Optional[str] = None  # folder for scores.json; null -> beside the images (like a checkpoint's scores.json)
    sweep: Optional[str] = None  # a multirun folder (python train.py -m ...): rank its runs x checkpoints
    leaderboard: LeaderboardSettings = field(default_factory=LeaderboardSettings)  # how sweep= ranks checkpoints
    expected_images: int = 8  # the competition's story length; other counts are scored with a warning
    plan_only: bool = False  # print the memory plan, write plan.json, load nothing; exit 0 if it fits, 2 if not


# group -> schema (a group whose options differ in keys picks its schema per option: DATASET_SCHEMAS)
GROUP_SCHEMAS = {
    "model": ModelSettings, "scorer": ScorerSettings, "filter": FilterSettings, "lora": LoraSettings,
    "optim": OptimSettings, "trainer": TrainerSettings, "logger": LoggerSettings, "story": StorySettings,
    "sampler": SamplerSettings, "memory": MemorySettings, "coherence": CoherenceSettings, "reward": RewardSettings,
}
JOB_SCHEMAS = {"train": TrainConfig, "generate": GenerateConfig, "evaluate": EvaluateConfig}


def register_configs() -> None:
    """Put every schema into Hydra's ConfigStore (idempotent): ``<group>_schema`` for the group
    option files, ``<source>_dataset_schema`` per data source, ``<job>_schema`` for the job files."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for group, schema in GROUP_SCHEMAS.items():
        store.store(name=f"{group}_schema", node=schema)
    for source, schema in DATASET_SCHEMAS.items():
        store.store(name=f"{source}_dataset_schema", node=schema)
    for job, schema in JOB_SCHEMAS.items():
        store.store(name=f"{job}_schema", node=schema)
