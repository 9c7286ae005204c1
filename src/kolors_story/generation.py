"""Render a story: encode the 8 prompts once, denoise the scenes in batches, save images + panel.

The `generate.py` job (``run_generate``) adds to that: stacked LoRAs, a choice of sampler, the
two-stage hires refine (``KolorsImg2ImgPipeline`` on the same components), best-of-N by aesthetic
score, PNG metadata, ``prompts.csv``, ``manifest.json`` (enough to regenerate every image), a
submission bundle (``submit.team``), regeneration of a training checkpoint (``run``/``checkpoint``)
and exact reproduction of a previous result (``reproduce``, see ``kolors_story.reproduce``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

from kolors_story.io import file_sha256
from kolors_story.io import atomic_save_image, atomic_write_json, atomic_write_text
from kolors_story.panel import save_panel
from kolors_story.story import Scene, scenes_from_config

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "kolors-story-manifest/1"
TINY_NOTE = "tiny random model: not a real result"
UPSCALERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
# Keys a user may override with `run=...`/`reproduce=...` without them being replaced by the
# recorded settings: where things live and what runs them, never what is rendered.
LOCATION_KEYS = ("model.path", "model.vae_path", "model.device", "scorer.path", "scorer.device", "output_dir",
                 "memory", "memory.*")


def is_location_key(key: str) -> bool:
    """Where the weights are, which device, how memory is managed (memory modes change pixels by at
    most fp rounding, which a reproduction reports): never what is rendered."""
    return key in LOCATION_KEYS or key.startswith("memory.")


# --------------------------------------------------------------------------------------------
# Prompt encoding and the original batched renderer (the trainer calls these two directly)
# --------------------------------------------------------------------------------------------


def run_device(pipe) -> torch.device:
    """Where latents and embeddings go: the UNet's device, or the pipeline's execution device when
    offload hooks move the UNet on use (it may sit on the CPU or the meta device in between)."""
    device = pipe.unet.device
    if device.type == "meta" or hasattr(pipe.unet, "_hf_hook"):
        return torch.device(pipe._execution_device)
    return device


@torch.no_grad()
def encode_scenes(pipe, scenes: list[Scene], device=None) -> dict[str, torch.Tensor]:
    """Prompt + negative embeddings of every scene, computed with the pipeline's own encode_prompt."""
    device = device or run_device(pipe)
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompt=[s.prompt for s in scenes],
        negative_prompt=[s.negative for s in scenes],
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
    )
    return {
        "prompt_embeds": embeds,
        "negative_prompt_embeds": neg,
        "pooled_prompt_embeds": pooled,
        "negative_pooled_prompt_embeds": neg_pooled,
    }


def render_scenes(pipe, scenes: list[Scene], embeds: dict[str, torch.Tensor], *, steps: int, cfg: float,
                  height: int, width: int, batch_size: int = 8, progress: bool = False) -> list[Image.Image]:
    """Denoise the scenes ``batch_size`` at a time; each scene draws its noise from its own seed,
    so the images do not depend on how scenes are batched."""
    settings = SamplerSettings(steps=int(steps), cfg=float(cfg), height=int(height), width=int(width),
                               batch_size=int(batch_size))
    jobs = [Job(pos, s.seed) for pos, s in enumerate(scenes)]
    return render_jobs(pipe, jobs, embeds, settings, labels=[s.index for s in scenes], progress=progress)


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HiresSettings:
    """Two-stage generation: stage 1 at the sampler size, pixel upscale by ``scale``, img2img refine."""

    scale: float = 1.5
    strength: float = 0.35
    steps: int = 30
    cfg: float | None = None
    upscaler: str = "lanczos"

    def validate(self) -> None:
        if self.upscaler not in UPSCALERS:
            raise ValueError(f"sampler.hires.upscaler={self.upscaler!r}; use one of {', '.join(UPSCALERS)}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"sampler.hires.strength={self.strength} must be in (0, 1]")
        if int(self.steps * self.strength) < 1:
            raise ValueError(
                f"sampler.hires.steps={self.steps} x sampler.hires.strength={self.strength} runs no refine step "
                f"(diffusers runs int(steps x strength) steps); raise one of them"
            )
        if self.scale <= 0:
            raise ValueError(f"sampler.hires.scale={self.scale} must be > 0")


@dataclass(frozen=True)
class SamplerSettings:
    scheduler: str = "euler"
    scheduler_kwargs: dict = field(default_factory=dict)
    steps: int = 50
    cfg: float = 4.0
    height: int = 1024
    width: int = 1024
    batch_size: int = 8
    hires: HiresSettings | None = None
    best_of: int = 1
    seed_stride: int = 1000

    @classmethod
    def from_config(cls, s) -> "SamplerSettings":
        from omegaconf import OmegaConf

        def get(key, default=None):
            return s.get(key, default) if hasattr(s, "get") else getattr(s, key, default)

        hires_cfg = get("hires") or {}
        hires = None
        if hires_cfg and hires_cfg.get("enabled", False):
            hires = HiresSettings(
                scale=float(hires_cfg.get("scale", 1.5)),
                strength=float(hires_cfg.get("strength", 0.35)),
                steps=int(hires_cfg.get("steps", 30)),
                cfg=None if hires_cfg.get("cfg") is None else float(hires_cfg.get("cfg")),
                upscaler=str(hires_cfg.get("upscaler", "lanczos")).lower(),
            )
            hires.validate()
        best = get("best_of") or {}
        n = int(best.get("n", 1)) if hasattr(best, "get") else int(best)
        if n < 1:
            raise ValueError(f"sampler.best_of.n={n} must be >= 1")
        kwargs = get("scheduler_kwargs") or {}
        if not isinstance(kwargs, dict):
            kwargs = OmegaConf.to_container(kwargs, resolve=True)
        from kolors_story.schedulers import check_scheduler_name

        settings = cls(
            scheduler=check_scheduler_name(str(get("scheduler", "euler"))),
            scheduler_kwargs=dict(kwargs),
            steps=int(get("steps", 50)),
            cfg=float(get("cfg", 4.0)),
            height=int(get("height", 1024)),
            width=int(get("width", 1024)),
            batch_size=max(1, int(get("batch_size", 8))),
            hires=hires,
            best_of=n,
            seed_stride=int(best.get("seed_stride", 1000)) if hasattr(best, "get") else 1000,
        )
        if settings.steps < 1:
            raise ValueError(f"sampler.steps={settings.steps} must be >= 1")
        return settings


def size_multiple(pipe) -> int:
    """Image sizes must divide into whole latents at the UNet's deepest level."""
    return int(pipe.vae_scale_factor) * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def hires_size(pipe, settings: SamplerSettings) -> tuple[int, int]:
    m = size_multiple(pipe)
    scale = settings.hires.scale if settings.hires else 1.0
    return (max(m, int(round(settings.height * scale / m)) * m), max(m, int(round(settings.width * scale / m)) * m))


def check_size(pipe, settings: SamplerSettings) -> None:
    m = size_multiple(pipe)
    for key in ("height", "width"):
        value = getattr(settings, key)
        if value < m or value % m:
            raise ValueError(f"sampler.{key}={value} must be a positive multiple of {m} for this model")


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One image to render: which scene's embeddings, which seed, which best-of candidate."""

    scene: int  # position in the scenes/embeds list (0-based)
    seed: int
    candidate: int = 0


def _initial_noise(pipe, seed: int, height: int, width: int) -> tuple[torch.Tensor, torch.Generator]:
    """Stage-1 latents from the scene's own CPU generator; the generator then keeps feeding this
    scene's later random draws (ancestral steps, the img2img noise), so batching never mixes seeds."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    shape = (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    return torch.randn(shape, generator=g, dtype=torch.float32), g


def _img2img_class():
    from diffusers import KolorsImg2ImgPipeline

    class StoryImg2ImgPipeline(KolorsImg2ImgPipeline):
        """``KolorsImg2ImgPipeline`` that accepts precomputed embeddings.

        diffusers 0.39's ``__call__`` forwards prompt_embeds/negative_prompt_embeds to
        ``encode_prompt`` but drops the pooled ones, so with the text encoder released it fails on
        ``None.shape`` (diffusers issue #13612). The pooled embeddings are carried over here.
        """

        _pooled = None

        def __call__(self, *args, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, **kwargs):
            self._pooled = (pooled_prompt_embeds, negative_pooled_prompt_embeds)
            try:
                return super().__call__(*args, pooled_prompt_embeds=pooled_prompt_embeds,
                                        negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, **kwargs)
            finally:
                self._pooled = None

        def encode_prompt(self, *args, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, **kwargs):
            if pooled_prompt_embeds is None and self._pooled is not None:
                pooled_prompt_embeds, negative_pooled_prompt_embeds = self._pooled
            return super().encode_prompt(*args, pooled_prompt_embeds=pooled_prompt_embeds,
                                         negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, **kwargs)

    return StoryImg2ImgPipeline


def img2img_pipeline(pipe):
    """A ``KolorsImg2ImgPipeline`` sharing every weight of ``pipe`` (nothing is loaded again).

    It gets its own scheduler object of the same kind and config, so the two pipelines never
    share step state.
    """
    refiner = _img2img_class()(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config),
        force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", False)),
    )
    refiner.set_progress_bar_config(disable=True)
    return refiner


def _step_callback(bar):
    def callback(_pipe, _i, _t, kwargs):
        if bar is not None:
            bar.update(1)
        return kwargs

    return callback


@torch.no_grad()
def render_jobs(pipe, jobs: list[Job], embeds: dict[str, torch.Tensor], settings: SamplerSettings, *,
                labels: list | None = None, keep: list[bool] | None = None, refiner=None,
                progress: bool = True) -> list[Image.Image | None]:
    """Render ``jobs`` ``settings.batch_size`` at a time (stage 1, then the hires refine if set).

    ``keep[i] = False`` marks a job whose image is not needed; batches with no kept job are
    skipped (their slot is None). Batches that are rendered always hold the same jobs as the
    original run, so a reproduction sees the same batch composition.
    """
    device = run_device(pipe)
    hires = settings.hires
    if hires is not None and refiner is None:
        refiner = img2img_pipeline(pipe)
    final_h, final_w = hires_size(pipe, settings) if hires else (settings.height, settings.width)
    stage2_steps = int(hires.steps * hires.strength) if hires else 0
    per_image_steps = settings.steps + stage2_steps
    batches = [jobs[i : i + settings.batch_size] for i in range(0, len(jobs), settings.batch_size)]
    todo = [b for n, b in enumerate(batches) if keep is None or any(keep[n * settings.batch_size : n * settings.batch_size + len(b)])]
    scene_bar = tqdm(total=sum(len(b) for b in todo), desc="scenes", unit="img", disable=not progress, position=0)
    out: list[Image.Image | None] = []
    try:
        for n, batch in enumerate(batches):
            first = n * settings.batch_size
            if keep is not None and not any(keep[first : first + len(batch)]):
                out.extend([None] * len(batch))
                continue
            names = [str(labels[first + i]) if labels else str(first + i + 1) for i in range(len(batch))]
            step_bar = tqdm(total=per_image_steps, desc=f"scene {','.join(names)}", unit="step", leave=False,
                            disable=not progress, position=1)
            noise, gens = zip(*(_initial_noise(pipe, j.seed, settings.height, settings.width) for j in batch))
            latents = torch.cat(noise).to(device=device, dtype=pipe.unet.dtype)
            idx = torch.tensor([j.scene for j in batch], dtype=torch.long)
            e = {k: v[idx.to(v.device)] for k, v in embeds.items()}
            images = pipe(
                prompt_embeds=e["prompt_embeds"],
                pooled_prompt_embeds=e["pooled_prompt_embeds"],
                negative_prompt_embeds=e["negative_prompt_embeds"],
                negative_pooled_prompt_embeds=e["negative_pooled_prompt_embeds"],
                num_inference_steps=settings.steps,
                guidance_scale=settings.cfg,
                height=settings.height,
                width=settings.width,
                latents=latents,
                generator=list(gens),
                callback_on_step_end=_step_callback(step_bar),
            ).images
            if hires is not None:
                upscaled = [im.resize((final_w, final_h), UPSCALERS[hires.upscaler]) for im in images]
                images = refiner(
                    image=upscaled,
                    strength=hires.strength,
                    prompt_embeds=e["prompt_embeds"],
                    pooled_prompt_embeds=e["pooled_prompt_embeds"],
                    negative_prompt_embeds=e["negative_prompt_embeds"],
                    negative_pooled_prompt_embeds=e["negative_pooled_prompt_embeds"],
                    num_inference_steps=hires.steps,
                    guidance_scale=settings.cfg if hires.cfg is None else hires.cfg,
                    height=final_h,
                    width=final_w,
                    generator=list(gens),
                    callback_on_step_end=_step_callback(step_bar),
                ).images
            step_bar.close()
            out.extend(images)
            scene_bar.update(len(batch))
    finally:
        scene_bar.close()
    return out


@dataclass
class StoryRender:
    """What one story render produced, with the record of how."""

    images: list[Image.Image]
    seeds: list[int]  # seed of the kept image of each scene
    candidates: list[list[dict]] | None = None  # best-of: per scene [{candidate, seed, score}]
    chosen: list[int] | None = None  # best-of: kept candidate index per scene
    scores: list[float] | None = None  # aesthetic score of each kept image, when computed
    size: tuple[int, int] = (0, 0)  # final (height, width)
    seconds: float = 0.0


def generate_story(pipe, scenes: list[Scene], embeds: dict[str, torch.Tensor], settings: SamplerSettings, *,
                   scorer=None, choices: list[int] | None = None, progress: bool = True) -> StoryRender:
    """Render every scene; with ``settings.best_of > 1`` render N candidates per scene and keep the
    best-scoring one (or the recorded ``choices``, when reproducing: then no scorer is needed)."""
    t0 = time.perf_counter()
    check_size(pipe, settings)
    n = settings.best_of
    jobs = [Job(pos, s.seed + k * settings.seed_stride, k) for k in range(n) for pos, s in enumerate(scenes)]
    labels = [f"{scenes[j.scene].index}" + (f"/{j.candidate + 1}" if n > 1 else "") for j in jobs]
    keep = None
    if n > 1 and choices is not None:
        if len(choices) != len(scenes) or any(not 0 <= int(c) < n for c in choices):
            raise ValueError(f"recorded best-of choices {choices} do not fit {len(scenes)} scenes x {n} candidates")
        keep = [int(choices[j.scene]) == j.candidate for j in jobs]
    elif n > 1 and scorer is None:
        raise ValueError("sampler.best_of.n > 1 needs the aesthetic scorer (scorer group) to pick the best candidate")
    rendered = render_jobs(pipe, jobs, embeds, settings, labels=labels, keep=keep, progress=progress)
    size = hires_size(pipe, settings) if settings.hires else (settings.height, settings.width)
    if n == 1:
        return StoryRender(images=list(rendered), seeds=[s.seed for s in scenes], size=size,
                           seconds=time.perf_counter() - t0)
    by_scene: list[list[tuple[Job, Image.Image | None]]] = [[] for _ in scenes]
    for job, image in zip(jobs, rendered):
        by_scene[job.scene].append((job, image))
    if choices is None:
        scores = scorer.score(list(rendered))
        score_of = {id(job): float(sc) for job, sc in zip(jobs, scores)}
        chosen = [max(range(n), key=lambda k, c=cands: (score_of[id(c[k][0])], -k)) for cands in by_scene]
    else:
        score_of, chosen = {}, [int(c) for c in choices]
    candidates = [
        [{"candidate": j.candidate, "seed": j.seed, "score": score_of.get(id(j))} for j, _ in cands] for cands in by_scene
    ]
    images = [cands[k][1] for cands, k in zip(by_scene, chosen)]
    scores = [score_of[id(cands[k][0])] for cands, k in zip(by_scene, chosen)] if score_of else None
    return StoryRender(images=images, seeds=[cands[k][0].seed for cands, k in zip(by_scene, chosen)],
                       candidates=candidates, chosen=chosen, scores=scores, size=size,
                       seconds=time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------




def png_metadata(fields: dict[str, Any]) -> PngInfo:
    """Text chunks, one per field plus all of them as JSON in ``parameters``; non-Latin text
    (Chinese prompts) goes into iTXt chunks. No timestamps: same settings -> same bytes."""
    info = PngInfo()
    for key, value in fields.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
        info.add_text(key, text)
    info.add_text("parameters", json.dumps(fields, ensure_ascii=False, sort_keys=True))
    return info


def read_png_metadata(path: str | Path) -> dict:
    """The ``parameters`` JSON written by :func:`png_metadata`."""
    with Image.open(path) as im:
        im.load()
        text = im.text.get("parameters") if hasattr(im, "text") else None
    if text is None:
        raise ValueError(f"{path} has no kolors-story 'parameters' PNG text chunk")
    return json.loads(text)


def _short(text: str, limit: int = 36) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def write_prompts_csv(path: Path, scenes: list[Scene], seeds: list[int]) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["scene", "description", "prompt", "negative", "seed"])
    for s, seed in zip(scenes, seeds):
        writer.writerow([s.index, s.description, s.prompt, s.negative, seed])
    return atomic_write_text(path, buf.getvalue())


def panel_title(title: str, model_name: str, tiny: bool, loras: list[dict] | None = None) -> str:
    text = f"{title} | model={model_name}"
    if loras:
        text += " | LoRA " + ", ".join(f"{Path(lo['path']).name} @ {lo['scale']:g}" for lo in loras)
    if tiny:
        text += f" ({TINY_NOTE})"
    return text


def save_story(images: list[Image.Image], scenes: list[Scene], out_dir: str | Path, title: str | None = None,
               pnginfo: list[PngInfo] | None = None) -> dict:
    """Write 1.png..N.png and panel.png; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, (scene, image) in enumerate(zip(scenes, images)):
        extra = {"pnginfo": pnginfo[n]} if pnginfo else {}
        paths.append(atomic_save_image(image, out_dir / f"{scene.index}.png", **extra))
    panel = save_panel(images, out_dir / "panel.png", captions=[_short(s.description) for s in scenes], title=title,
                       ascii_captions=[_short(s.caption_ascii) for s in scenes])
    return {"images": [str(p) for p in paths], "panel": str(panel)}


# --------------------------------------------------------------------------------------------
# Config handling: LoRAs, run/checkpoint, effective config
# --------------------------------------------------------------------------------------------


@dataclass
class LoraSpec:
    path: Path
    scale: float = 1.0
    sha256: str | None = None
    bundle_file: str | None = None  # name inside a submission bundle, when it came from one

    def as_dict(self) -> dict:
        d = {"path": str(self.path), "file": self.path.name, "scale": float(self.scale), "sha256": self.sha256}
        if self.bundle_file:
            d["bundle_file"] = self.bundle_file
        return d


def lora_specs(cfg) -> list[LoraSpec]:
    """``lora`` (one LoRA: path + scale) followed by ``loras`` (a list of {path, scale}), stacked."""
    specs = []
    single = cfg.get("lora") or {}
    if single.get("path"):
        specs.append(LoraSpec(Path(str(single.path)).expanduser(), float(single.get("scale", 1.0))))
    for n, item in enumerate(cfg.get("loras") or []):
        if isinstance(item, str):
            path, scale = item, 1.0
        else:
            if not item.get("path"):
                raise ValueError(f"loras[{n}] has no path: give each entry as {{path: <file>, scale: <float>}}")
            path, scale = item.path, item.get("scale", 1.0)
        specs.append(LoraSpec(Path(str(path)).expanduser(), float(scale)))
    for n, spec in enumerate(specs):
        if not spec.path.is_file():
            raise FileNotFoundError(f"LoRA file {spec.path} (LoRA #{n + 1}) does not exist; check lora.path / loras")
    return specs


def load_loras(pipe, specs: list[LoraSpec]) -> list[LoraSpec]:
    """Load and stack every LoRA (rank/alpha come from each file) and record each file's sha256."""
    if not specs:
        return specs
    from kolors_story.lora import file_sha256, load_lora_into_pipeline

    for n, spec in enumerate(specs):
        load_lora_into_pipeline(pipe, spec.path, scale=spec.scale, adapter_name=f"lora{n + 1}")
        spec.sha256 = file_sha256(spec.path)
    return specs


def task_overrides(cfg) -> list[str]:
    """The user's command-line overrides (Hydra run or a compose() with return_hydra_config)."""
    try:
        if "hydra" in cfg and cfg.hydra.get("overrides") is not None:
            return [str(o) for o in cfg.hydra.overrides.task]
    except Exception:  # noqa: BLE001 - a config without hydra metadata simply has no overrides
        pass
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return [str(o) for o in HydraConfig.get().overrides.task]
    except Exception:  # noqa: BLE001
        pass
    return []


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


@dataclass
class CheckpointRef:
    run: Path
    checkpoint: Path  # the checkpoint folder
    lora: Path
    config: Path  # the run's .hydra/config.yaml
    best: Path | None = None  # the best.yaml it came from

    def as_dict(self) -> dict:
        return {"run": str(self.run), "checkpoint": self.checkpoint.name, "checkpoint_dir": str(self.checkpoint),
                "lora": str(self.lora), "config": str(self.config), "best": str(self.best) if self.best else None}


def _checkpoint_folder(run: Path, name: str) -> Path:
    """A checkpoint named as step-XXXXXX, a number, checkpoints/step-XXXXXX or a path."""
    name = str(name).strip()
    if name.isdigit():
        name = f"step-{int(name):06d}"
    for cand in (Path(name), run / name, run / "checkpoints" / name):
        if cand.is_dir():
            return cand
    found = sorted(p.name for p in (run / "checkpoints").glob("step-*") if p.is_dir()) if (run / "checkpoints").is_dir() else []
    raise FileNotFoundError(
        f"checkpoint {name!r} not found in {run / 'checkpoints'} (have: {', '.join(found) or 'none'}); "
        "use checkpoint=step-XXXXXX, last or best"
    )


def _read_best(path: Path) -> tuple[Path | None, str | None]:
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or not data.get("checkpoint") and not data.get("checkpoint_dir"):
        raise ValueError(f"{path} has no 'checkpoint' key; a best file needs keys run and checkpoint")
    run = Path(str(data["run"])) if data.get("run") else None
    ckpt = data.get("checkpoint_dir") or data.get("checkpoint")
    return run, str(ckpt)


def resolve_checkpoint(run: str | Path | None, checkpoint: str | Path | None = "last") -> CheckpointRef:
    """Find a training run's checkpoint folder and its LoRA.

    ``run`` is a run folder (or a ``best.yaml`` / a sweep folder holding one); ``checkpoint`` is
    ``step-XXXXXX``, ``last`` (the name in ``<run>/checkpoints/last``), ``best`` (``best.yaml``
    in the run or its sweep folder) or a path to a best.yaml with keys run and checkpoint.
    """
    best_file = None
    checkpoint = "last" if checkpoint in (None, "") else str(checkpoint)
    run_path = Path(str(run)).expanduser() if run else None
    if run_path is not None and run_path.is_file() and run_path.suffix in (".yaml", ".yml"):
        best_file, run_path = run_path, None
    elif checkpoint.endswith((".yaml", ".yml")):
        best_file = Path(checkpoint).expanduser()
        if not best_file.is_file():
            raise FileNotFoundError(f"checkpoint={checkpoint}: best file {best_file} does not exist")
    elif checkpoint == "best":
        if run_path is None:
            raise ValueError("checkpoint=best needs run=<run folder> (or pass the best.yaml itself as run= or checkpoint=)")
        looked = [run_path / "best.yaml", run_path.parent / "best.yaml"]
        best_file = next((p for p in looked if p.is_file()), None)
        if best_file is None:
            raise FileNotFoundError(
                f"checkpoint=best: no best.yaml at {' or '.join(map(str, looked))}; run "
                "`python evaluate.py sweep=<sweep folder>` to write one, or name the checkpoint (step-XXXXXX, last)"
            )
    if best_file is not None:
        best_run, checkpoint = _read_best(best_file)
        if best_run is not None and (run_path is None or not (run_path / ".hydra").is_dir()):
            run_path = best_run
        if run_path is None:
            raise ValueError(f"{best_file} names no run; add a 'run' key or pass run=<run folder>")
    if run_path is None:
        raise ValueError("run= is empty: give a training run folder")
    if not run_path.is_dir():
        raise FileNotFoundError(f"run={run_path} is not a folder (expected a training run with .hydra/ and checkpoints/)")
    if checkpoint == "last":
        last = run_path / "checkpoints" / "last"
        if last.is_dir():
            folder = last
        elif last.is_file():
            folder = _checkpoint_folder(run_path, last.read_text(encoding="utf-8").strip())
        else:
            raise FileNotFoundError(f"checkpoint=last: {last} does not exist (has the run saved a checkpoint yet?)")
    else:
        folder = _checkpoint_folder(run_path, checkpoint)
    lora = folder / "lora.safetensors"
    if not lora.is_file():
        raise FileNotFoundError(f"checkpoint {folder} has no lora.safetensors")
    config = run_path / ".hydra" / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"run {run_path} has no .hydra/config.yaml (is it a train.py run folder?)")
    return CheckpointRef(run=run_path.resolve(), checkpoint=folder.resolve(), lora=lora.resolve(),
                         config=config.resolve(), best=best_file.resolve() if best_file else None)


def config_from_run(cfg, ref: CheckpointRef):
    """``cfg`` with model/story/sampler taken from the training run's config; the user's own
    command-line choices (``sampler=...`` or ``sampler.steps=...``) still win over the run's."""
    from omegaconf import OmegaConf, open_dict

    run_cfg = OmegaConf.load(ref.config)
    overrides = task_overrides(cfg)
    keys = [_override_key(o) for o in overrides]
    new = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(new):
        for group in ("model", "story", "sampler"):
            if group in keys or group not in run_cfg:
                continue  # group chosen on the command line, or the run has none: keep the composed one
            new[group] = run_cfg[group]
        for key in keys:
            if "." in key and key.split(".", 1)[0] in ("model", "story", "sampler"):
                OmegaConf.update(new, key, OmegaConf.select(cfg, key), force_add=True)
        new.lora = {"path": str(ref.lora), "scale": float(cfg.get("lora", {}).get("scale", 1.0))}
    return new


def effective_config(cfg):
    """The config that will actually be rendered (run/checkpoint resolved), and where it came from."""
    source = None
    if cfg.get("run"):
        if (cfg.get("lora") or {}).get("path"):
            raise ValueError("run= supplies the LoRA (the checkpoint's lora.safetensors): drop lora.path, "
                             "or stack extra LoRAs with loras=[{path: ..., scale: ...}]")
        ref = resolve_checkpoint(cfg.run, cfg.get("checkpoint"))
        cfg = config_from_run(cfg, ref)
        source = ref
    return cfg, source


def plain_config(cfg) -> dict:
    """The resolved config as plain data, without Hydra's own node."""
    from omegaconf import OmegaConf, open_dict

    copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    if "hydra" in copy:
        with open_dict(copy):
            del copy["hydra"]
    if "hydra" in cfg:
        # ${hydra:...} interpolations need the Hydra node; resolve them against the original.
        for key in ("output_dir",):
            if key in copy:
                with open_dict(copy):
                    copy[key] = OmegaConf.select(cfg, key, default=None)
    return OmegaConf.to_container(copy, resolve=True, throw_on_missing=False)


def is_tiny(model_cfg, path: Path) -> bool:
    return bool(model_cfg.get("tiny")) or (Path(path) / "TINY_MODEL.txt").exists()


def _versions() -> dict:
    import importlib.metadata as md

    # CPU float reductions depend on the thread count: reproduce restores it (see reproduce.py).
    out = {"python": platform.python_version(), "torch_threads": torch.get_num_threads()}
    for name in ("kolors-story", "torch", "diffusers", "transformers", "peft"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


# --------------------------------------------------------------------------------------------
# The generate.py job
# --------------------------------------------------------------------------------------------


@dataclass
class GenerationResult:
    out_dir: Path
    manifest: dict
    images: list[Path]
    panel: Path
    render: StoryRender
    scenes: list[Scene]
    loras: list[LoraSpec]
    summary: dict | None = None  # scores summary, when scored
    bundle: Path | None = None


def build_scorer(cfg):
    from kolors_story.scoring import AestheticScorer

    return AestheticScorer.from_config(cfg.scorer)


def _want_scores(cfg) -> bool:
    submit = cfg.get("submit") or {}
    return bool(cfg.get("score", False)) or bool(submit.get("team") and submit.get("score", True))


def generate(cfg, *, out_dir: str | Path | None = None, loras: list[LoraSpec] | None = None,
             choices: list[int] | None = None, source: dict | None = None, overrides: list[str] | None = None,
             progress: bool = True) -> GenerationResult:
    """Render the story of an (effective) generate config and write every output into ``out_dir``.

    ``loras``/``choices`` let a reproduction pass the recorded LoRA files and best-of picks.
    """
    from kolors_story.memory import after_prompt_encoding, apply_memory_modes, execution_device, load_device
    from kolors_story.models import ensure_model, load_pipeline, model_hash
    from kolors_story.schedulers import build_scheduler, describe

    out_dir = Path(out_dir if out_dir is not None else cfg.output_dir)
    settings = SamplerSettings.from_config(cfg.sampler)
    scenes = scenes_from_config(cfg.story, cfg.sampler)
    if loras is None:
        loras = lora_specs(cfg)
    want_scores = _want_scores(cfg)
    scorer = build_scorer(cfg) if (want_scores or (settings.best_of > 1 and choices is None)) else None

    model_path = ensure_model(cfg.model)
    tiny = is_tiny(cfg.model, model_path)
    mhash = model_hash(model_path, cfg.model.get("vae_path"))
    memory_cfg = cfg.get("memory") or {}
    device = str(cfg.model.get("device", "cpu"))
    pipe = load_pipeline(model_path, vae_path=cfg.model.get("vae_path"), dtype=cfg.model.get("dtype", "float32"),
                         device=load_device(device, memory_cfg))
    pipe.scheduler = build_scheduler(settings.scheduler, pipe.scheduler.config, **settings.scheduler_kwargs)
    load_loras(pipe, loras)  # before offload hooks wrap the UNet
    memory_record = apply_memory_modes(pipe, memory_cfg, device=device)
    embeds = encode_scenes(pipe, scenes, device=execution_device(pipe))
    # The 8 prompts are all the text encoder is needed for (memory.release_text_encoder).
    memory_record["text_encoder_released_bytes"] = after_prompt_encoding(pipe, memory_cfg)
    render = generate_story(pipe, scenes, embeds, settings, scorer=scorer, choices=choices, progress=progress)

    summary = None
    if want_scores:
        from kolors_story.scoring import coherence, summarize_scores

        scores, emb = scorer.score_and_embed(render.images)
        render.scores = [float(s) for s in scores]
        summary = summarize_scores(render.scores, threshold=float(cfg.scorer.get("threshold", 6.0)))
        summary.update(coherence(emb))
        if tiny:
            summary["note"] = f"scored by a {TINY_NOTE}" if cfg.scorer.get("tiny") else TINY_NOTE

    lora_records = [lo.as_dict() for lo in loras]
    height, width = render.size
    sampler_record = {
        "scheduler": settings.scheduler,
        "scheduler_class": describe(pipe.scheduler)["class"],
        "steps": settings.steps,
        "cfg": settings.cfg,
        "stage1_size": [settings.height, settings.width],
        "size": [height, width],
        "batch_size": settings.batch_size,
    }
    hires_record = None
    if settings.hires:
        h = settings.hires
        hires_record = {"enabled": True, "stage1_size": [settings.height, settings.width], "final_size": [height, width],
                        "upscaler": h.upscaler, "scale": h.scale, "strength": h.strength, "steps": h.steps,
                        "refine_steps_run": int(h.steps * h.strength),
                        "cfg": settings.cfg if h.cfg is None else h.cfg,
                        "pipeline": "KolorsImg2ImgPipeline (same components)"}
    best_record = None
    if settings.best_of > 1:
        best_record = {"n": settings.best_of, "seed_stride": settings.seed_stride,
                       "selected_by": "aesthetic score" if choices is None else "recorded choice (reproduction)",
                       "chosen": render.chosen}

    infos = []
    for n, scene in enumerate(scenes):
        fields = {
            "prompt": scene.prompt,
            "negative_prompt": scene.negative,
            "scene": scene.index,
            "seed": render.seeds[n],
            "sampler": settings.scheduler,
            "steps": settings.steps,
            "cfg": settings.cfg,
            "size": f"{width}x{height}",
            "model": str(cfg.model.get("name", "")),
            "model_hash": mhash,
            "loras": [{"file": lo["file"], "sha256": lo["sha256"], "scale": lo["scale"]} for lo in lora_records],
        }
        if hires_record:
            fields["hires"] = {k: hires_record[k] for k in ("stage1_size", "upscaler", "strength", "steps", "cfg")}
        if best_record:
            fields["best_of"] = {"n": settings.best_of, "candidate": render.chosen[n]}
        if tiny:
            fields["tiny_model"] = TINY_NOTE
        infos.append(fields)

    title = panel_title(str(cfg.story.get("title", "story")), str(cfg.model.get("name", "")), tiny, lora_records)
    written = save_story(render.images, scenes, out_dir, title=title, pnginfo=[png_metadata(f) for f in infos])
    image_paths = [Path(p) for p in written["images"]]
    write_prompts_csv(out_dir / "prompts.csv", scenes, render.seeds)
    if summary is not None:
        atomic_write_json(out_dir / "scores.json", {**summary, "images": [p.name for p in image_paths]})

    config = plain_config(cfg)
    config["output_dir"] = str(out_dir)
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tiny_model": tiny,
        "note": f"Made with the {TINY_NOTE}" if tiny else None,
        "model": {"name": cfg.model.get("name"), "path": str(cfg.model.path), "path_resolved": str(Path(model_path).resolve()),
                  "vae_path": cfg.model.get("vae_path"), "hash": mhash, "dtype": str(cfg.model.get("dtype")),
                  "device": str(cfg.model.get("device"))},
        "loras": lora_records,
        "scheduler": describe(pipe.scheduler),
        "sampler": sampler_record,
        "hires": hires_record,
        "best_of": best_record,
        "memory": memory_record,
        "story": {"title": cfg.story.get("title"), "language": cfg.story.get("language"),
                  "trigger": cfg.story.get("trigger")},
        "scenes": [
            {**scene.as_dict(), "seed": render.seeds[n], "scene_seed": scene.seed, "image": image_paths[n].name,
             "sha256": file_sha256(image_paths[n]),
             "score": render.scores[n] if render.scores else None,
             **({"candidates": render.candidates[n], "chosen_candidate": render.chosen[n]} if render.candidates else {})}
            for n, scene in enumerate(scenes)
        ],
        "images": {p.name: file_sha256(p) for p in image_paths},
        "panel": Path(written["panel"]).name,
        "scores": summary,
        "source": source,
        "config": config,
        "overrides": overrides if overrides is not None else task_overrides(cfg),
        "versions": _versions(),
        "seconds": round(render.seconds, 3),
    }
    atomic_write_json(out_dir / "manifest.json", manifest)
    return GenerationResult(out_dir=out_dir, manifest=manifest, images=image_paths, panel=Path(written["panel"]),
                            render=render, scenes=scenes, loras=loras, summary=summary)


def generate_story_from_config(cfg) -> dict:
    """The `generate.py` job without reproduce: render (and bundle when ``submit.team`` is set)."""
    eff, ref = effective_config(cfg)
    result = generate(eff, source=ref.as_dict() if ref else None, overrides=task_overrides(cfg))
    submit = cfg.get("submit") or {}
    if submit.get("team"):
        from kolors_story.submission import write_bundle

        result.bundle = write_bundle(result, eff, team=str(submit.team), root=submit.get("dir") or result.out_dir,
                                     overwrite=bool(submit.get("overwrite", False)), source=ref)
        print(f"Submission bundle: {result.bundle}")
    line = f"Wrote {len(result.images)} images, {result.panel.name}, prompts.csv and manifest.json to {result.out_dir}"
    if result.manifest["tiny_model"]:
        line += f" ({TINY_NOTE})"
    print(line)
    if result.summary:
        print(f"Aesthetic mean {result.summary['mean']:.3f} min {result.summary['min']:.3f} "
              f"({'pass' if result.summary['passed'] else 'FAIL'})")
    return {"images": [str(p) for p in result.images], "panel": str(result.panel), "manifest": result.manifest,
            "bundle": str(result.bundle) if result.bundle else None, "out_dir": str(result.out_dir)}


def run_generate(cfg) -> int:
    """Entry of `generate.py`: a reproduction (exit code 1 when any image differs) or a generation."""
    if cfg.get("reproduce"):
        from kolors_story.reproduce import reproduce_from_config

        report = reproduce_from_config(cfg)
        return 0 if report["all_identical"] else 1
    generate_story_from_config(cfg)
    return 0
