"""The tiny and bench Kolors: random (or pre-trained) components of the stand-in sizes, saved in
the real release layouts into a folder that the normal loader reads exactly like downloaded weights
(:func:`kolors_story.models.loading.load_pipeline`). A stamp file records what was built; a folder
whose stamp matches is reused, anything else is rebuilt atomically (never half-written).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from kolors_story.errors import SettingsError
from kolors_story.models.architectures import KOLORS_UNET_CONFIG, SDXL_VAE_CONFIG
from kolors_story.models.random_init import build_components, chatglm_tokenizer_dir
from kolors_story.tiny.architectures import (
    bench_text_encoder_config,
    bench_unet_config,
    bench_vae_config,
    peers_text_encoder_config,
    pretrained_unet_config,
    pretrained_vae_config,
    tiny_text_encoder_config,
    tiny_unet_config,
    tiny_vae_config,
)
from kolors_story.tiny.folders import MODEL_NOTE_FILE, build_stamped_folder

# Bump when an architecture below changes, so cached copies are rebuilt.
TINY_VERSION = 1
BENCH_VERSION = 1
PEERS_VERSION = 1


def build_tiny_components(seed: int = 0, text_encoder_config: dict | None = None,
                          unet_config: dict | None = None, vae_config: dict | None = None) -> dict:
    """Random Kolors components in memory (fp32, CPU), deterministic for ``seed``: the tiny
    model's sizes unless other configs (e.g. the bench model's) are given."""
    return build_components(text_encoder_config or tiny_text_encoder_config(), unet_config or tiny_unet_config(),
                            vae_config or tiny_vae_config(), seed)


def save_release(components: dict, folder: Path, layout: str = "kolors") -> None:
    """Write components in the Kwai-Kolors/Kolors (``kolors``) or Kolors-diffusers (``diffusers``) layout."""
    if layout not in LAYOUTS:
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
    (folder / MODEL_NOTE_FILE).write_text(
        f"Tiny randomly initialised Kolors (kolors-story tiny v{TINY_VERSION}). Not a real model: "
        "outputs are noise-like and exist only to exercise the code paths.\n"
    )


def build_model_folder(folder: str | Path, stamp: dict, stamp_name: str, build: Callable[[], dict],
                       layout: str = "kolors", note: str | None = None) -> Path:
    """Save ``build()``'s components into ``folder`` in ``layout`` unless it already holds ``stamp``."""

    def write(tmp: Path) -> None:
        save_release(build(), tmp, layout)
        if note:
            (tmp / MODEL_NOTE_FILE).write_text(note)

    return build_stamped_folder(folder, stamp, stamp_name, write)


TINY_WEIGHTS = ("pretrained", "random")
LAYOUTS = ("kolors", "diffusers")


def check_tiny_model(seed: int, weights: str, layout: str) -> None:
    """``model.tiny``'s keys, before anything is built."""
    if weights not in TINY_WEIGHTS:
        raise SettingsError(f"model.tiny.weights={weights!r}: use pretrained or random")
    if layout not in LAYOUTS:
        raise SettingsError(f"model.tiny.layout={layout!r}: use 'kolors' or 'diffusers'")
    if weights == "pretrained" and int(seed) != 0:
        raise SettingsError(f"model.tiny.seed={seed}: the pre-trained tiny model was trained on the text encoder "
                            "of seed 0; use model.tiny.seed=0 or model.tiny.weights=random")


def ensure_tiny_model(folder: str | Path, seed: int = 0, layout: str = "kolors", weights: str = "random") -> Path:
    """Build the tiny model into ``folder`` unless a complete one of this spec is already there.
    ``weights="pretrained"``: the random model of seed 0 with the shipped pre-trained UNet and VAE
    (``tiny.shipped``, sha256-checked)."""
    check_tiny_model(seed, weights, layout)
    if weights == "random":
        return build_model_folder(folder, {"version": TINY_VERSION, "seed": seed, "layout": layout},
                                  "TINY_MODEL.json", lambda: build_tiny_components(seed), layout)
    from kolors_story.tiny.shipped import (
        load_pretrained_into,
        pretrained_record,
    )

    record = pretrained_record()  # its hashes are in the stamp: new shipped weights -> a rebuilt folder

    def build() -> dict:
        parts = build_tiny_components(0, unet_config=pretrained_unet_config(), vae_config=pretrained_vae_config())
        load_pretrained_into(parts)
        return parts

    note = (f"Pre-trained tiny Kolors (kolors-story, weights v{record.get('version')}): a tiny model, not Kolors. "
            "Its UNet and VAE learned simple drawn scenes (`python -m kolors_story.tiny.pretrain`); "
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


def build_peers_components(seed: int = 0) -> dict:
    """Kolors' real UNet and VAE and a 2-layer ChatGLM3 of the real width, random, in float16 (as
    the release ships its weights: every reader upcasts them the same way)."""
    parts = build_components(peers_text_encoder_config(), dict(KOLORS_UNET_CONFIG), dict(SDXL_VAE_CONFIG), seed)
    for name in ("text_encoder", "unet", "vae"):
        parts[name].half()  # in place: the float32 copies go before the fp16 files are written
    return parts


def ensure_peers_model(folder: str | Path, seed: int = 0) -> Path:
    """Build the peers model into ``folder`` (Kolors-diffusers layout, fp16 files: what diffusers'
    ``KolorsPipeline.from_pretrained``, DiffSynth's ``ModelManager`` and this project all read)
    unless it is there already. About 7 GB on disk; building it takes a few minutes and ~16 GB of RAM."""
    note = (f"Full-size randomly initialised Kolors, ChatGLM3 cut to 2 of 28 layers (kolors-story peers "
            f"v{PEERS_VERSION}): for the bench's peers section only.\n")
    return build_model_folder(folder, {"version": PEERS_VERSION, "seed": seed}, "PEERS_MODEL.json",
                              lambda: build_peers_components(seed), "diffusers", note=note)
