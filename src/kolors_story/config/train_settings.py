"""The training groups: ``lora``, ``optim``, ``trainer`` (loss, EMA), ``logger`` and ``reward``.

Every key with its type, default and a one-line comment (see :mod:`kolors_story.config`)."""

# No ``from __future__ import annotations`` here: OmegaConf reads these annotations at runtime.
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import SI


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
    gradient_checkpointing: bool = True  # recompute UNet activations in backward: less memory, more time (docs/performance.md)
    accumulate_grad_batches: int = 1  # optimizer step every N batches
    gradient_clip_val: Optional[float] = None  # clip the gradient norm to this value; null -> no clipping
    batch_size: int = 1  # images per batch (per device)
    num_workers: int = 0  # dataloader worker processes
    max_epochs: Optional[int] = 1  # epochs to train (null -> until max_steps)
    max_steps: int = -1  # stop after this many optimizer steps (-1: no limit)
    steps_per_epoch: Optional[int] = 500  # batches per epoch (DiffSynth's default; images are cycled); null -> one pass over the dataset
    checkpoint_every_n_steps: int = 250  # save LoRA + render the validation story every N optimizer steps (and at the end)
    log_every_n_steps: int = 1  # a metrics.jsonl/W&B train line every N optimizer steps
    keep_last_n: Optional[int] = None  # keep only the last N checkpoints (plus the best one by the leaderboard's objective); null -> all
    save_dtype: str = "float16"  # dtype of the LoRA files (half the size of float32); the resume state stays float32
    save_formats: List[str] = field(default_factory=lambda: ["diffusers", "kohya", "diffsynth"])  # LoRA files at each checkpoint (the last one always has all three)
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
    tensorboard: bool = False  # also write TensorBoard event files into <run>/tensorboard/ (the same scalars + story panels)


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
