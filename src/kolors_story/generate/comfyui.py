"""The story as a ComfyUI workflow: the graph that renders a manifest's scenes with the ComfyUI-Kolors-MZ
nodes and ComfyUI core (``MZ_ChatGLM3Loader`` -> ``MZ_ChatGLM3_V2``; ``MZ_KolorsUNETLoaderV2`` ->
``LoraLoaderModelOnly`` ... -> ``KSampler`` -> ``VAEDecode`` -> ``SaveImage``), this project's samplers
as ComfyUI's ``sampler_name`` x ``scheduler``, and what the graph cannot express (its notes).

Built from the typed manifest only, so a story folder, a bundle and a ``reproduce=`` render of either
give the same graph: nothing in it depends on paths, hashes, dates or bundle names. The API format
(``workflow_api.json``, the PNG ``prompt`` chunk) and the UI format (``workflow.json``, the PNG
``workflow`` chunk) are written by :mod:`kolors_story.generate.comfyui_graph`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kolors_story.config import ComfyUISettings
from kolors_story.errors import SettingsError
from kolors_story.files import atomic_write_json
from kolors_story.generate.comfyui_graph import Link, Node, api_workflow, ui_workflow
from kolors_story.records import Manifest, SceneRecord, with_suffix

API_FILE = "workflow_api.json"  # ComfyUI's API format: what its /prompt endpoint runs
UI_FILE = "workflow.json"  # ComfyUI's own format: what its "Load" button and drag-and-drop open

# sampler.scheduler -> ComfyUI KSampler (sampler_name, scheduler): the same update rule and sigma spacing
# family. Kolors' own "leading" timestep spacing has no ComfyUI twin; "normal" is the nearest.
COMFYUI_SAMPLERS: dict[str, tuple[str, str]] = {
    "euler": ("euler", "normal"),
    "euler_karras": ("euler", "karras"),
    "euler_a": ("euler_ancestral", "normal"),
    "heun": ("heun", "normal"),
    "lms": ("lms", "normal"),
    "ddim": ("ddim", "ddim_uniform"),  # ComfyUI's ddim is deterministic DDIM (the Euler step) on DDIM's spacing
    "dpmpp_2m": ("dpmpp_2m", "normal"),
    "dpmpp_2m_karras": ("dpmpp_2m", "karras"),
    "dpmpp_2m_sde_karras": ("dpmpp_2m_sde", "karras"),
    "unipc": ("uni_pc_bh2", "normal"),  # diffusers' UniPC defaults to the bh2 variant; ComfyUI's uni_pc is bh1
}
NEAREST_SAMPLER = ("euler", "normal")  # a sampler missing above: what Kolors ships
# sampler.hires.upscaler (pixels) -> LatentUpscale's upscale_method (latents: ComfyUI has no latent lanczos)
LATENT_UPSCALE = {"lanczos": "bicubic", "bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest-exact"}
NOISE_NOTE = ("ComfyUI draws and schedules its noise its own way, so this graph renders the same story "
              "(prompts, seeds, steps, cfg, sizes, LoRAs) but not the same pixels; "
              "`python generate.py reproduce=<folder>` regenerates the pixels.")
SEED_RANGE = 2 ** 64  # KSampler's seed is 0..2^64-1; torch.manual_seed(-s) is the same generator as 2^64-s


@dataclass
class StoryWorkflow:
    """The graph of a story: ``api`` (workflow_api.json), ``ui`` (workflow.json), the notes inside both
    (what it does not express, how things map) and the warnings among them (printed, in the model card)."""

    nodes: list[Node]
    notes: list[str]
    warnings: list[str] = field(default_factory=list)
    api: dict = field(default_factory=dict)
    ui: dict = field(default_factory=dict)


def comfyui_sampler(scheduler: str, scheduler_kwargs: dict | None = None) -> tuple[str, str, str | None]:
    """(sampler_name, scheduler, warning or None) of this project's ``sampler.scheduler``."""
    name = str(scheduler).lower()
    sampler_name, comfy_scheduler = COMFYUI_SAMPLERS.get(name, NEAREST_SAMPLER)
    warning = None
    if name not in COMFYUI_SAMPLERS:
        warning = (f"sampler.scheduler={scheduler} has no ComfyUI equivalent: the workflow uses the nearest, "
                   f"{sampler_name}/{comfy_scheduler}")
    elif scheduler_kwargs:
        warning = (f"sampler.scheduler_kwargs {dict(scheduler_kwargs)} have no KSampler widget: the workflow uses "
                   f"plain {sampler_name}/{comfy_scheduler}")
    return sampler_name, comfy_scheduler, warning


def check_comfyui(settings: ComfyUISettings) -> None:
    """The file names the workflow loads are usable names (before anything renders)."""
    for key in ("unet", "text_encoder", "vae", "lora"):
        if not str(getattr(settings, key) or "").strip():
            raise SettingsError(f"comfyui.{key} is empty: name the file ComfyUI should load (docs/comfyui.md)")
    if not str(settings.text_encoder).endswith(".safetensors"):
        raise SettingsError(f"comfyui.text_encoder={settings.text_encoder}: MZ_ChatGLM3Loader lists only .safetensors "
                            "files of ComfyUI/models/LLM/; name one, e.g. chatglm3-fp16.safetensors")


def lora_file_names(manifest: Manifest, settings: ComfyUISettings) -> list[str]:
    """The name each stacked LoRA has in ComfyUI/models/loras/: ``comfyui.lora``, ``lora<n>-`` in front when
    there are several (the bundle's names); by default an EMA LoRA's kohya file is ``lora_kohya_ema``."""
    names = []
    for n, rec in enumerate(manifest.loras, 1):
        name = str(settings.lora)
        if name == ComfyUISettings.lora and rec.file.endswith("_ema.safetensors"):
            name = with_suffix(name, "_ema")
        names.append(f"lora{n}-{name}" if len(manifest.loras) > 1 else name)
    return names


class _Graph:
    """Nodes numbered in the order they are added (loaders first, then scene by scene): a
    topological order, so ComfyUI's UI executes them as listed."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []

    def add(self, class_type: str, title: str, column: int, **inputs) -> Link:
        node = Node(id=len(self.nodes) + 1, class_type=class_type, inputs=inputs, title=title, column=column)
        self.nodes.append(node)
        return Link(node.id)


def _loaders(graph: _Graph, manifest: Manifest, settings: ComfyUISettings) -> tuple[Link, Link, Link]:
    """The shared column: text encoder, UNet with its LoRAs stacked in order, VAE."""
    chatglm = graph.add("MZ_ChatGLM3Loader", "ChatGLM3 text encoder", 0, chatglm3_checkpoint=settings.text_encoder)
    model = graph.add("MZ_KolorsUNETLoaderV2", "Kolors UNet", 0, unet_name=settings.unet)
    for n, (rec, name) in enumerate(zip(manifest.loras, lora_file_names(manifest, settings)), 1):
        model = graph.add("LoraLoaderModelOnly", f"LoRA {n}", 0, model=model, lora_name=name,
                          strength_model=float(rec.scale))
    vae = graph.add("VAELoader", "VAE (fp16-fix)", 0, vae_name=settings.vae)
    return chatglm, model, vae


def _scene(graph: _Graph, manifest: Manifest, scene: SceneRecord, loaders: tuple[Link, Link, Link],
           sampler: tuple[str, str]) -> None:
    """One column: the scene's conditioning, sampler(s), decode and save."""
    chatglm, model, vae = loaders
    n, s = scene.index, manifest.sampler
    positive = graph.add("MZ_ChatGLM3_V2", f"Scene {n} positive", n, chatglm3_model=chatglm, text=scene.prompt)
    negative = graph.add("MZ_ChatGLM3_V2", f"Scene {n} negative", n, chatglm3_model=chatglm, text=scene.negative)
    hires = manifest.hires
    height, width = hires.stage1_size if hires else s.size
    latent = graph.add("EmptyLatentImage", f"Scene {n} size", n, width=int(width), height=int(height), batch_size=1)
    common = dict(model=model, seed=int(scene.seed) % SEED_RANGE, sampler_name=sampler[0], scheduler=sampler[1],
                  positive=positive, negative=negative)
    latent = graph.add("KSampler", f"Scene {n} sampler", n, **_ksampler(common, s.steps, s.cfg, latent, 1.0))
    if hires:
        final_h, final_w = hires.final_size or s.size
        upscaled = graph.add("LatentUpscale", f"Scene {n} hires upscale", n, samples=latent,
                             upscale_method=LATENT_UPSCALE.get(hires.upscaler, "bicubic"), width=int(final_w),
                             height=int(final_h), crop="disabled")
        # ComfyUI's steps with denoise < 1 count the steps that run; hires.steps is the schedule they come from
        run = hires.refine_steps_run if hires.refine_steps_run is not None else int(hires.steps * hires.strength)
        steps = max(1, int(run))
        cfg = s.cfg if hires.cfg is None else hires.cfg
        latent = graph.add("KSampler", f"Scene {n} hires refine", n,
                           **_ksampler(common, steps, cfg, upscaled, float(hires.strength)))
    image = graph.add("VAEDecode", f"Scene {n} decode", n, samples=latent, vae=vae)
    graph.add("SaveImage", f"Scene {n} save", n, images=image, filename_prefix=str(n))


def _ksampler(common: dict, steps: int, cfg: float, latent: Link, denoise: float) -> dict:
    """KSampler's inputs in its own order (the UI's widget order follows it)."""
    return {"model": common["model"], "seed": common["seed"], "steps": int(steps), "cfg": float(cfg),
            "sampler_name": common["sampler_name"], "scheduler": common["scheduler"],
            "positive": common["positive"], "negative": common["negative"], "latent_image": latent,
            "denoise": float(denoise)}


def workflow_notes(manifest: Manifest, sampler_warning: str | None) -> tuple[list[str], list[str]]:
    """(notes, warnings): how the story maps onto the graph and what it leaves out, in the words the
    Note node, the API file and the model card show."""
    notes = [f"kolors-story: the story {manifest.story.title!r}, one column per scene; the loaders on the left "
             "are shared (ComfyUI-Kolors-MZ nodes + core).", NOISE_NOTE]
    warnings = [sampler_warning] if sampler_warning else []
    if manifest.tiny_model:
        notes.append("Made with the tiny stand-in model: the graph names the real Kolors files; its small pictures "
                     "are not what this graph gives.")
    if manifest.hires:
        h = manifest.hires
        height, width = h.final_size or manifest.sampler.size
        notes.append(f"Hires: the project upscales the decoded image ({h.upscaler}) and refines it with img2img; "
                     f"this graph upscales the latent ({LATENT_UPSCALE.get(h.upscaler, 'bicubic')}) to "
                     f"{width}x{height} and refines with a second KSampler at denoise {h.strength:g}.")
    if manifest.best_of:
        notes.append(f"Best of {manifest.best_of.n}: each KSampler has the seed of the candidate the project kept.")
    coherence = manifest.coherence
    if coherence and coherence.sharing:
        warnings.append(f"consistent self-attention (coherence.sharing, scenes {coherence.sharing.references} "
                        "shared) has no ComfyUI node: the workflow renders each scene on its own")
    if coherence and coherence.reference:
        warnings.append(f"the IP-Adapter reference (coherence.reference, strengths {coherence.reference.scales}) "
                        "is not wired: add ComfyUI_IPAdapter_plus's Kolors nodes with the same image")
    braces = [s.index for s in manifest.scenes if "{" in s.prompt or "{" in s.negative]
    if braces:
        warnings.append(f"MZ_ChatGLM3_V2 replaces {{a|b}} in a prompt by a random choice: scene(s) {braces} have braces")
    return notes + [f"Not as rendered: {w}." for w in warnings], warnings


def story_workflow(manifest: Manifest, settings: ComfyUISettings) -> StoryWorkflow:
    """The whole story as one ComfyUI graph (all scenes), in the API and the UI format."""
    if not manifest.scenes:
        raise SettingsError("the manifest has no scenes: there is no story to write as a ComfyUI workflow")
    check_comfyui(settings)
    kwargs = (manifest.config.get("sampler") or {}).get("scheduler_kwargs")
    sampler_name, scheduler, warning = comfyui_sampler(manifest.sampler.scheduler, kwargs)
    graph = _Graph()
    loaders = _loaders(graph, manifest, settings)
    for scene in manifest.scenes:
        _scene(graph, manifest, scene, loaders, (sampler_name, scheduler))
    notes, warnings = workflow_notes(manifest, warning)
    workflow = StoryWorkflow(nodes=graph.nodes, notes=notes, warnings=warnings)
    workflow.api = api_workflow(graph.nodes, notes)
    workflow.ui = ui_workflow(graph.nodes, notes, manifest.story.title)
    return workflow


def write_workflow(folder: Path, workflow: StoryWorkflow) -> list[Path]:
    """``workflow_api.json`` and ``workflow.json`` into ``folder``."""
    return [atomic_write_json(folder / API_FILE, workflow.api), atomic_write_json(folder / UI_FILE, workflow.ui)]


def warn(workflow: StoryWorkflow) -> None:
    """Print what the workflow renders otherwise than the project did."""
    for line in workflow.warnings:
        print(f"WARNING: ComfyUI workflow: {line}")


# node -> (its file widget, where ComfyUI looks for that file under ComfyUI/): ComfyUI's folder_paths
# ("unet" is also "diffusion_models") and the "LLM" folder ComfyUI-Kolors-MZ adds for ChatGLM3
MODEL_FOLDERS = {
    "MZ_KolorsUNETLoaderV2": ("unet_name", "models/unet/"),  # ComfyUI also lists models/diffusion_models/
    "MZ_ChatGLM3Loader": ("chatglm3_checkpoint", "models/LLM/"),
    "VAELoader": ("vae_name", "models/vae/"),
    "LoraLoaderModelOnly": ("lora_name", "models/loras/"),
}


def model_files(workflow: StoryWorkflow) -> list[tuple[str, str, str]]:
    """(node title, file name, folder under ComfyUI/) of every file the graph loads, in graph order."""
    out = []
    for node in workflow.nodes:
        if node.class_type in MODEL_FOLDERS:
            widget, folder = MODEL_FOLDERS[node.class_type]
            out.append((f"{node.title} ({node.class_type})", str(node.inputs[widget]), folder))
    return out
