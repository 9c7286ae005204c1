"""The GPU check's models, meter and shared context: Kolors' components built directly on the device with random
weights from architecture dicts (real size on a GPU, the bench size on the CPU), which of them are
on the device at each stage, and the peak-memory meter (CUDA's allocator statistics on a GPU; on
the CPU the resident weights plus ``PeakTensorMemory``'s count of the stage's live tensors).

Nothing is downloaded or read from a model folder: the weights are drawn on the device, so a
6 B-parameter text encoder is ready in seconds. Values do not matter for memory and time, only that
they stay finite in fp16 (the rules of ``models.random_init.init_parameters``, drawn on the device).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kolors_story import tiny
from kolors_story.accounting import PeakTensorMemory
from kolors_story.plan import count
from kolors_story.plan.stages import Sizes

LARGE = ("text_encoder", "unet", "vae")  # loaded in model.dtype; the scorer and CLIP stay float32


@dataclass(frozen=True)
class Scale:
    """The models and run lengths of one mode: ``real`` (Kolors on a GPU) or ``bench`` (CPU, tests)."""

    name: str
    unet: dict
    text_encoder: dict
    vae: dict
    predictor: dict
    clip: dict
    resolution: int
    dtype: str  # model.dtype of the UNet, VAE and text encoder
    precision: str  # trainer.precision of the training steps
    steps: int  # denoising steps of the story
    warmup: int  # training steps before the measured ones
    measured: int  # training steps measured (the median is reported)
    reward_resolution: int
    reward_steps: int
    cache_images: int = 16

    def sizes(self) -> Sizes:
        """What the memory plan counts: the same dicts the models are built from."""
        return Sizes(count.key(self.unet), count.key(self.vae), count.key(self.text_encoder),
                     count.key(self.predictor), self.dtype, count.key(self.clip))


def _scorer_config(config: dict) -> dict:
    return {k: v for k, v in config.items()
            if not k.startswith("_") and k not in ("transformers_version", "architectures", "model_type")}


def _clip_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if k in ("projection_dim", "logit_scale_init_value", "text_config",
                                                     "vision_config")}


def real_scale() -> Scale:
    """Kolors at 1024² in fp16 with the fp16-fix VAE (``model=kolors``), the real ViT-L/14 scorer and CLIP."""
    from kolors_story.models import architectures as real

    return Scale("real", real.KOLORS_UNET_CONFIG, real.KOLORS_TEXT_ENCODER_CONFIG,
                 {**real.SDXL_VAE_CONFIG, "force_upcast": False}, _scorer_config(real.REAL_PREDICTOR_CONFIG),
                 _clip_config(real.REAL_CLIP_CONFIG), resolution=1024, dtype="float16", precision="16-mixed",
                 steps=20, warmup=2, measured=5, reward_resolution=512, reward_steps=20)


def bench_scale() -> Scale:
    """The bench-size Kolors (tiny scorer and CLIP: the bench has none) in fp32, short runs: the
    CPU mode, the same code in seconds."""
    return Scale("bench", tiny.architecture("unet", "bench"), tiny.architecture("text_encoder", "bench"),
                 tiny.architecture("vae", "bench"), _scorer_config(tiny.architecture("predictor")),
                 _clip_config(tiny.architecture("clip")), resolution=tiny.resolution("bench"), dtype="float32",
                 precision="32-true", steps=1, warmup=1, measured=2, reward_resolution=64, reward_steps=4,
                 cache_images=8)


# ----------------------------------------------------------------------------------- models


def init_on_device(model: torch.nn.Module, seed: int, std: float, fan_in_scaled: bool = True) -> None:
    """``random_init.init_parameters``' rules drawn where the weights are: norm weights 1 (ChatGLM
    leaves them uninitialised), biases 0, the rest N(0, std) (capped at 1/sqrt(fan_in))."""
    p0 = next(model.parameters())
    g = torch.Generator(device=p0.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.normal_(0.0, min(std, fan_in**-0.5) if fan_in_scaled else std, generator=g)


def _maker(kind: str, config: dict) -> Callable[[], torch.nn.Module]:
    if kind == "unet":
        from diffusers import UNet2DConditionModel

        return lambda: UNet2DConditionModel(**config)
    if kind == "vae":
        from diffusers import AutoencoderKL

        return lambda: AutoencoderKL(**config)
    if kind == "text_encoder":
        from diffusers.pipelines.kolors import ChatGLMModel
        from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

        from kolors_story.models.loading import as_prompt_encoder

        # real tensors, not skip_init's; without the LM head, as the project loads ChatGLM3
        return lambda: as_prompt_encoder(ChatGLMModel(ChatGLMConfig(**config), empty_init=False))
    if kind == "predictor":
        from aesthetics_predictor import AestheticsPredictorV2Linear
        from transformers import CLIPVisionConfig

        return lambda: AestheticsPredictorV2Linear(CLIPVisionConfig(**config))
    from transformers import CLIPConfig, CLIPModel

    return lambda: CLIPModel(CLIPConfig(**config))


def build(kind: str, scale: Scale, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """``kind`` (unet, vae, text_encoder, predictor, clip) of ``scale``, built on ``device`` in its dtype."""
    from kolors_story.models.loading import to_dtype

    dtype = to_dtype(scale.dtype) if kind in LARGE else torch.float32
    model = count.build_on(str(device), _maker(kind, getattr(scale, kind)), dtype)
    # the text encoder as random_init.build_components draws it (0.02, not fan-in scaled); the rest capped
    init_on_device(model, seed, std=0.02 if kind == "text_encoder" else 0.05, fan_in_scaled=kind != "text_encoder")
    return model.eval().requires_grad_(False)


def free_device_cache(device: torch.device) -> None:
    """Give what was freed back to the card (its reserved memory is then the next stage's own); on
    the CPU there is nothing to give back (and a full garbage collection costs half a second)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _tensor_bytes(objects) -> int:
    """Bytes of these modules (parameters, buffers, gradients) and optimizers: each storage counted once,
    and of a storage only what its tensors cover (a view into a mapped checkpoint file, as a
    quantized encoder's embedding table on the CPU is, holds that table, not the whole file)."""
    spans: dict[int, list[tuple[int, int]]] = {}

    def add(t):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        if hasattr(type(t), "__tensor_flatten__"):  # a quantized weight (torchao): its codes and scales
            for name in t.__tensor_flatten__()[0]:
                add(getattr(t, name))
            return
        if t.numel():
            start = t.storage_offset() * t.element_size()
            extent = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True)) + 1
            spans.setdefault(t.untyped_storage().data_ptr(), []).append((start, start + extent * t.element_size()))

    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                add(p)
                add(p.grad)
            for b in obj.buffers():
                add(b)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for t in state.values():
                    add(t)
    return sum(_union_length(ranges) for ranges in spans.values())


def _union_length(ranges: list[tuple[int, int]]) -> int:
    total, reach = 0, 0
    for start, end in sorted(ranges):
        start = max(start, reach)
        if end > start:
            total, reach = total + end - start, end
    return total


@dataclass
class Workbench:
    """The components of one check run and which are on the device: a stage places exactly what its
    plan stage has resident; the others wait in host memory (on the CPU: nothing moves)."""

    scale: Scale
    device: torch.device
    models: dict = field(default_factory=dict)
    on_device: set = field(default_factory=set)
    state: list = field(default_factory=list)  # resident training state (the optimizer), counted on the CPU
    _tokenizer: object = None

    def get(self, kind: str) -> torch.nn.Module:
        if kind not in self.models:
            self.models[kind] = build(kind, self.scale, self.device)
            self.on_device.add(kind)
        return self.models[kind]

    def place(self, *kinds: str) -> None:
        for kind, model in self.models.items():
            if (kind in kinds) != (kind in self.on_device):
                model.to(self.device if kind in kinds else "cpu")
        for kind in kinds:
            self.get(kind)
        self.on_device = set(kinds)
        free_device_cache(self.device)

    def drop(self, *kinds: str) -> None:
        for kind in kinds:
            self.models.pop(kind, None)
            self.on_device.discard(kind)
        free_device_cache(self.device)

    def sync(self) -> None:
        """Read back where each model is (after offload hooks moved them)."""
        self.on_device = {k for k, m in self.models.items() if next(m.parameters()).device == self.device}

    def resident_bytes(self) -> int:
        return _tensor_bytes([self.models[k] for k in self.on_device] + list(self.state))

    def pipeline(self, text_encoder: bool = True, unet: bool = True):
        """A ``KolorsPipeline`` of these components (built on first use), as ``models.loading`` assembles it."""
        from diffusers import EulerDiscreteScheduler, KolorsPipeline
        from diffusers.pipelines.kolors import ChatGLMTokenizer

        from kolors_story.models.architectures import KOLORS_SCHEDULER_CONFIG
        from kolors_story.models.random_init import chatglm_tokenizer_dir

        scheduler = EulerDiscreteScheduler.from_config({k: v for k, v in KOLORS_SCHEDULER_CONFIG.items()
                                                        if not k.startswith("_")})
        if self._tokenizer is None:  # the real ChatGLM3 tokenizer, read once
            self._tokenizer = ChatGLMTokenizer.from_pretrained(str(chatglm_tokenizer_dir()))
        pipe = KolorsPipeline(vae=self.get("vae") if unet else None,
                              text_encoder=self.get("text_encoder") if text_encoder else None,
                              tokenizer=self._tokenizer,
                              unet=self.get("unet") if unet else None, scheduler=scheduler,
                              force_zeros_for_empty_prompt=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe


# ------------------------------------------------------------------------------------ meter


@dataclass
class Reading:
    """One stage's measurement: peak bytes on the device (allocated; reserved on CUDA), what was
    resident when it started, and seconds."""

    peak: int = 0
    reserved: int | None = None
    resident: int = 0
    seconds: float = 0.0
    step_seconds: list = field(default_factory=list)  # training: each measured step

    @property
    def time(self) -> float:
        return statistics.median(self.step_seconds) if self.step_seconds else self.seconds


class Meter:
    """Peaks and times of the phases of a block of work (``switch`` closes one phase and opens the
    next; phases may alternate, e.g. denoise / decode per batch: each keeps its maximum and total)."""

    def __init__(self, device: torch.device, resident_bytes: Callable[[], int]):
        self.cuda = device.type == "cuda"
        self.device = device
        self.resident_bytes = resident_bytes
        self.readings: dict[str, Reading] = {}
        self._counter: PeakTensorMemory | None = None
        self._phase: str | None = None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _open(self, phase: str) -> None:
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._counter.peak = self._counter.current  # tensors still alive from the phase before count
            self._base = self.resident_bytes()
        self._phase, self._t0 = phase, time.perf_counter()

    def _close(self) -> None:
        self.sync()
        seconds = time.perf_counter() - self._t0
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            reserved = torch.cuda.max_memory_reserved(self.device)
        else:
            peak, reserved = self._base + self._counter.peak, None
        r = self.readings.setdefault(self._phase, Reading(resident=self._base))
        r.peak, r.seconds = max(r.peak, peak), r.seconds + seconds
        if reserved is not None:
            r.reserved = max(r.reserved or 0, reserved)

    def switch(self, phase: str) -> None:
        self._close()
        self._open(phase)

    @contextmanager
    def phases(self, first: str) -> Iterator[Meter]:
        free_device_cache(self.device)  # each stage's reserved memory is its own
        self.readings = {}
        with PeakTensorMemory() if not self.cuda else _nothing() as counter:
            self._counter = counter
            self._open(first)
            try:
                yield self
            finally:
                self._close()
                self._counter = None


@contextmanager
def _nothing():
    yield None


# ------------------------------------------------------------------------------------ check


@dataclass
class Check:
    """What the measurements (``gpu_stages``, ``gpu_training``) share: the models, the meter, the
    scale, scratch space and the training step."""

    wb: Workbench
    meter: Meter
    scale: Scale
    workdir: Path
    log: Callable[[str], None] = print
    problems: dict = field(default_factory=dict)  # group -> what went wrong while measuring (OOM retries)
    stepper: object = None  # the training step, kept between the training groups (same LoRA)
    current: str = ""  # the group being measured

    @property
    def device(self) -> torch.device:
        return self.wb.device
