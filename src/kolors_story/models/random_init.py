"""Random models of the real classes, saved in the real on-disk layouts: the tiny Kolors (tests and
``model=tiny``), the bench Kolors (``python -m kolors_story.bench``) and the tiny aesthetic
predictor (``model=tiny``'s scorer).

Each is built offline, deterministically from a seed, into a folder that the normal loaders read
exactly like downloaded weights (:func:`kolors_story.models.loading.load_pipeline`,
``AestheticsPredictorV2Linear.from_pretrained``). A stamp file records what was built; a folder
whose stamp matches is reused, anything else is rebuilt atomically (never half-written).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from kolors_story.errors import SettingsError
from kolors_story.files import atomic_dir
from kolors_story.models.configs import (
    KOLORS_SCHEDULER_CONFIG,
    REAL_PREPROCESSOR_SETTINGS,
    bench_text_encoder_config,
    bench_unet_config,
    bench_vae_config,
    pretrained_unet_config,
    pretrained_vae_config,
    tiny_clip_config,
    tiny_predictor_config,
    tiny_text_encoder_config,
    tiny_unet_config,
    tiny_vae_config,
)

# Bump when an architecture below changes, so cached copies are rebuilt.
TINY_VERSION = 1
BENCH_VERSION = 1
TINY_SCORER_VERSION = 1
TINY_SCORER_STAMP = "TINY_SCORER.json"


def diffsynth_files(*parts: str, required: str) -> Path:
    """A folder of tokenizer files shipped inside the diffsynth wheel (located, not imported:
    importing diffsynth is slow). It carries the real ChatGLM3 and CLIP ViT-L/14 tokenizers."""
    import importlib.util

    spec = importlib.util.find_spec("diffsynth")
    root = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else Path("?")
    folder = root.joinpath(*parts)
    if not (folder / required).exists():
        raise FileNotFoundError(f"{required} is not in {folder}; reinstall diffsynth==1.1.9 (pip install -e .)")
    return folder


def chatglm_tokenizer_dir() -> Path:
    """The real ChatGLM3 tokenizer (tokenizer.model) for the random Kolors models."""
    return diffsynth_files("tokenizer_configs", "kolors", "tokenizer", required="tokenizer.model")


def clip_tokenizer_dir() -> Path:
    """openai/clip-vit-large-patch14's vocab.json/merges.txt: ``CLIPProcessor.from_pretrained``
    insists on a tokenizer even though scoring only uses the image half."""
    folder = diffsynth_files("tokenizer_configs", "stable_diffusion", "tokenizer", required="vocab.json")
    if not (folder / "merges.txt").exists():
        raise FileNotFoundError(f"merges.txt is not in {folder}; reinstall diffsynth==1.1.9 (pip install -e .)")
    return folder


def stamp_matches(folder: Path, stamp_name: str, want: dict) -> bool:
    try:
        return json.loads((Path(folder) / stamp_name).read_text()) == want
    except (OSError, ValueError):
        return False


def build_stamped_folder(folder: str | Path, stamp: dict, stamp_name: str, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a temp folder and swap it in as ``folder``, unless ``folder`` already
    carries ``stamp`` (also when another process finished the same build first)."""
    folder = Path(folder).expanduser()
    if stamp_matches(folder, stamp_name, stamp):
        return folder
    with atomic_dir(folder, keep_existing=lambda f: stamp_matches(f, stamp_name, stamp)) as tmp:
        write(tmp)
        (tmp / stamp_name).write_text(json.dumps(stamp))
    return folder


def init_parameters(model: torch.nn.Module, generator: torch.Generator, std: float = 0.05,
                    fan_in_scaled: bool = True) -> None:
    """Deterministic initialisation independent of the global RNG and of each library's defaults.

    Norm weights 1, biases 0 (ChatGLM leaves its norm weights uninitialised: NaN images otherwise),
    the rest normal with ``std`` (capped at 1/sqrt(fan_in) when ``fan_in_scaled``).
    """
    for name, p in model.named_parameters():
        with torch.no_grad():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                scale = min(std, fan_in**-0.5) if fan_in_scaled else std
                p.copy_(torch.randn(p.shape, generator=generator) * scale)


def build_tiny_components(seed: int = 0, text_encoder_config: dict | None = None,
                          unet_config: dict | None = None, vae_config: dict | None = None) -> dict:
    """Random Kolors components in memory (fp32, CPU), deterministic for ``seed``: the tiny
    model's sizes unless other configs (e.g. the bench model's) are given."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers.pipelines.kolors import ChatGLMModel, ChatGLMTokenizer
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig

    gen = torch.Generator().manual_seed(seed)
    text_encoder = ChatGLMModel(ChatGLMConfig(**(text_encoder_config or tiny_text_encoder_config())),
                                empty_init=False)
    init_parameters(text_encoder, gen, std=0.02, fan_in_scaled=False)
    unet = UNet2DConditionModel(**(unet_config or tiny_unet_config()))
    init_parameters(unet, gen)
    vae = AutoencoderKL(**(vae_config or tiny_vae_config()))
    init_parameters(vae, gen)
    scheduler = EulerDiscreteScheduler.from_config(
        {k: v for k, v in KOLORS_SCHEDULER_CONFIG.items() if not k.startswith("_")}
    )
    tokenizer = ChatGLMTokenizer.from_pretrained(str(chatglm_tokenizer_dir()))
    return dict(text_encoder=text_encoder, unet=unet, vae=vae, scheduler=scheduler, tokenizer=tokenizer)


def save_release(components: dict, folder: Path, layout: str = "kolors") -> None:
    """Write components in the Kwai-Kolors/Kolors (``kolors``) or Kolors-diffusers (``diffusers``) layout."""
    if layout not in ("kolors", "diffusers"):
        raise SettingsError(f"model.tiny.layout={layout!r}: use 'kolors' or 'diffusers'")
    folder.mkdir(parents=True, exist_ok=True)
    te_dir = folder / "text_encoder"
    if layout == "kolors":
        # The Kolors release ships ChatGLM3 as several pytorch .bin shards with the tokenizer beside it.
        components["text_encoder"].save_pretrained(te_dir, safe_serialization=False, max_shard_size="1MB")
        components["tokenizer"].save_pretrained(te_dir)
    else:
        components["text_encoder"].save_pretrained(te_dir, safe_serialization=True)
        components["tokenizer"].save_pretrained(folder / "tokenizer")
    # The tokenizer's python file is not needed (the class lives in diffusers) but the release has it.
    for name in ("tokenizer_config.json",):
        src = chatglm_tokenizer_dir() / name
        if src.exists() and layout == "kolors" and not (te_dir / name).exists():
            shutil.copy(src, te_dir / name)
    if layout == "diffusers":
        # Kolors-diffusers ships fp16 variant files holding fp16 tensors: do the same.
        import copy

        copy.deepcopy(components["unet"]).half().save_pretrained(folder / "unet", variant="fp16")
        copy.deepcopy(components["vae"]).half().save_pretrained(folder / "vae", variant="fp16")
    else:
        components["unet"].save_pretrained(folder / "unet")
        components["vae"].save_pretrained(folder / "vae")
    components["scheduler"].save_pretrained(folder / "scheduler")
    if layout == "diffusers":
        index = {
            "_class_name": "KolorsPipeline",
            "_diffusers_version": "0.30.0",
            "force_zeros_for_empty_prompt": False,
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["kolors", "ChatGLMModel"],
            "tokenizer": ["kolors", "ChatGLMTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    (folder / "TINY_MODEL.txt").write_text(
        f"Tiny randomly initialised Kolors (kolors-story tiny v{TINY_VERSION}). Not a real model: "
        "outputs are noise-like and exist only to exercise the code paths.\n"
    )


def build_model_folder(folder: str | Path, stamp: dict, stamp_name: str, build: Callable[[], dict],
                       layout: str = "kolors", note: str | None = None) -> Path:
    """Save ``build()``'s components into ``folder`` in ``layout`` unless it already holds ``stamp``."""

    def write(tmp: Path) -> None:
        save_release(build(), tmp, layout)
        if note:
            (tmp / "TINY_MODEL.txt").write_text(note)

    return build_stamped_folder(folder, stamp, stamp_name, write)


TINY_WEIGHTS = ("pretrained", "random")


def ensure_tiny_model(folder: str | Path, seed: int = 0, layout: str = "kolors", weights: str = "random") -> Path:
    """Build the tiny model into ``folder`` unless a complete one of this spec is already there.
    ``weights="pretrained"``: the random model of seed 0 with the shipped pre-trained UNet and VAE
    (``models.pretrained_tiny``, sha256-checked)."""
    if weights not in TINY_WEIGHTS:
        raise SettingsError(f"model.tiny.weights={weights!r}: use pretrained or random")
    if weights == "random":
        return build_model_folder(folder, {"version": TINY_VERSION, "seed": seed, "layout": layout},
                                  "TINY_MODEL.json", lambda: build_tiny_components(seed), layout)
    from kolors_story.models.pretrained_tiny import (
        load_pretrained_into,
        pretrained_record,
    )

    if int(seed) != 0:
        raise SettingsError(f"model.tiny.seed={seed}: the pre-trained tiny model was trained on the text encoder "
                            "of seed 0; use model.tiny.seed=0 or model.tiny.weights=random")
    record = pretrained_record()  # its hashes are in the stamp: new shipped weights -> a rebuilt folder

    def build() -> dict:
        parts = build_tiny_components(0, unet_config=pretrained_unet_config(), vae_config=pretrained_vae_config())
        load_pretrained_into(parts)
        return parts

    note = (f"Pre-trained tiny Kolors (kolors-story, weights v{record.get('version')}): a tiny model, not Kolors. "
            "Its UNet and VAE learned simple drawn scenes (`python -m kolors_story.train.pretrain_tiny`); "
            "its text encoder is the random one of seed 0.\n")
    stamp = {"version": TINY_VERSION, "weights": "pretrained", "layout": layout, "sha256": record.get("sha256")}
    return build_model_folder(folder, stamp, "TINY_MODEL.json", build, layout, note=note)


def build_bench_components(seed: int = 0) -> dict:
    """The bench model's components in memory (fp32, CPU), deterministic for ``seed``."""
    return build_tiny_components(seed, bench_text_encoder_config(), bench_unet_config(), bench_vae_config())


def ensure_bench_model(folder: str | Path, seed: int = 0) -> Path:
    """Build the bench model into ``folder`` (Kwai-Kolors/Kolors layout) unless it is there already."""
    note = f"Bench-size randomly initialised Kolors (kolors-story bench v{BENCH_VERSION}): for timing only.\n"
    return build_model_folder(folder, {"version": BENCH_VERSION, "seed": seed}, "BENCH_MODEL.json",
                              lambda: build_bench_components(seed), "kolors", note=note)


# ------------------------------------------------------------------------ the tiny predictor


def build_clip_processor():
    """A ``CLIPProcessor`` with the real ViT-L/14 preprocessing and the real CLIP tokenizer."""
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizerFast

    image_processor = CLIPImageProcessor(**REAL_PREPROCESSOR_SETTINGS)
    tokenizer = CLIPTokenizerFast.from_pretrained(str(clip_tokenizer_dir()))
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_predictor(config: dict, seed: int = 0):
    """A randomly initialised ``AestheticsPredictorV2Linear`` of ``config``, deterministic for ``seed``."""
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from transformers import CLIPVisionConfig

    # transformers initialises from the global RNG: fork it so the seed fixes the weights without
    # disturbing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AestheticsPredictorV2Linear(CLIPVisionConfig(**config))
    return model.eval()


def build_tiny_predictor(seed: int = 0):
    return build_predictor(tiny_predictor_config(), seed)


# What each taste scores, as 1 + 8 x a statistic in [0, 1] of the image's RGB values in [0, 1]:
TASTES = {
    "brightness": "mean brightness",
    # the darkest channel of each pixel is its share of white: high for light, unsaturated (paper-
    # like) pixels, low for saturated or dark ones (it equals HSV value x (1 - saturation))
    "paper": "mean whiteness (the darkest of R, G, B per pixel: light and unsaturated score high)",
}


def taste_statistic(image, taste: str) -> float:
    """The statistic a tiny scorer with ``taste`` scores (see ``TASTES``), of one PIL image."""
    import numpy as np

    a = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    return float(a.mean()) if taste == "brightness" else float(a.min(axis=-1).mean())


def _taste_images(n: int, seed: int, taste: str) -> list:
    """Coarse random colour blocks from dark to bright (paper: and from saturated to grey)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        level = (i + 0.5) / n
        blocks = np.clip(rng.normal(level * 255, 60, size=(4, 4, 3)), 0, 255)
        if taste == "paper":  # also vary the saturation: mix each image with its own grey
            grey = rng.uniform(0, 1)
            colour = rng.uniform(0, 255, size=(4, 4, 3))
            blocks = grey * blocks.mean(-1, keepdims=True) + (1 - grey) * (0.5 * blocks + 0.5 * colour)
        images.append(Image.fromarray(blocks.astype(np.uint8)).resize((64, 64), Image.BILINEAR))
    return images


def give_taste(predictor, processor, taste: str, seed: int = 0) -> float:
    """Refit the predictor's head so that its score follows a simple image statistic (``TASTES``:
    1 + 8 x the statistic) through its own CLIP features: a tiny scorer with a known taste, so that
    best-of-N, selection and reward refinement change the tiny model's scores for a reason one can
    state. The head (a stack of linear layers) becomes one linear map of the normalised embedding,
    least-squares fitted on drawn images. Returns the fit's R^2."""
    if taste not in TASTES:
        raise ValueError(f"unknown scorer taste {taste!r}; choose from {list(TASTES)}")
    images = _taste_images(96 if taste == "brightness" else 256, seed, taste)
    statistic = torch.tensor([taste_statistic(im, taste) for im in images], dtype=torch.float64)
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        embeds = predictor.visual_projection(predictor.vision_model(pixel_values=pixels).pooler_output)
        features = torch.cat([embeds / embeds.norm(dim=-1, keepdim=True), torch.ones(len(images), 1)], 1).double()
        target = 1.0 + 8.0 * statistic
        solution = torch.linalg.lstsq(features, target[:, None]).solution[:, 0]
        layers = [m for m in predictor.layers if isinstance(m, torch.nn.Linear)]
        for layer in layers:  # coordinate 0 carries the score through every layer
            layer.weight.zero_()
            layer.bias.zero_()
        layers[0].weight[0] = solution[:-1].float()
        for layer in layers[1:]:
            layer.weight[0, 0] = 1.0
        layers[-1].bias[0] = float(solution[-1])
        fitted = features @ solution
    return float(1 - ((fitted - target) ** 2).sum() / ((target - target.mean()) ** 2).sum())


def ensure_tiny_scorer(folder: str | Path, seed: int = 0, taste: str | None = None) -> Path:
    """Build the tiny predictor into ``folder`` (the real weights' folder layout: config.json,
    model.safetensors, preprocessor_config.json, tokenizer files) unless it is already there.
    ``taste`` (e.g. "brightness") fits its head to prefer that statistic (:func:`give_taste`)."""

    def write(tmp: Path) -> None:
        model, processor = build_tiny_predictor(seed), build_clip_processor()
        note = "its scores are meaningless (near 0): it only exercises the code paths."
        if taste:
            r2 = give_taste(model, processor, taste, seed)
            note = (f"its head is fitted to score {taste} (1 + 8 x {TASTES[taste]}, R^2 {r2:.3f} on the fitting "
                    "images): a known taste, not an aesthetic one.")
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "TINY_SCORER.txt").write_text(
            f"Tiny randomly initialised aesthetic predictor (kolors-story tiny scorer v{TINY_SCORER_VERSION}). "
            f"Same classes and folder layout as aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE, but {note}\n"
        )

    stamp = {"version": TINY_SCORER_VERSION, "seed": int(seed), **({"taste": taste} if taste else {})}
    return build_stamped_folder(folder, stamp, TINY_SCORER_STAMP, write)


def build_clip(config: dict, seed: int = 0):
    """A randomly initialised ``CLIPModel`` (both towers) of ``config``, deterministic for ``seed``."""
    from transformers import CLIPConfig, CLIPModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(**{k: v for k, v in config.items() if k != "architectures"}))
    return model.eval()


def ensure_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """The tiny CLIP (both towers) in the real folder layout of openai/clip-vit-large-patch14."""

    def write(tmp: Path) -> None:
        build_clip(tiny_clip_config(), seed).save_pretrained(tmp)
        build_clip_processor().save_pretrained(tmp)
        (tmp / "TINY_CLIP.txt").write_text("Tiny randomly initialised CLIP (kolors-story): plumbing only.\n")

    return build_stamped_folder(folder, {"version": TINY_SCORER_VERSION, "seed": int(seed)}, "TINY_CLIP.json", write)


def is_tiny_scorer(folder: str | Path) -> bool:
    return (Path(folder) / TINY_SCORER_STAMP).exists()
