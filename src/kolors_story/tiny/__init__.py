"""The tiny Kolors and its stand-ins: models of the real classes, small enough for a 2-core CPU,
saved in the real on-disk layouts and loaded by the same loaders as the real weights.

What lives here: the stand-ins' architectures (``architectures``), building their folders once
(``folders``, ``kolors``: the tiny and bench Kolors; ``scorer``: the predictor with a known taste
and CLIP; ``ip_adapter``; ``captioner``), the shipped pre-trained weights (``pretrained/`` and
``shipped``), the drawn base scenes (``scenes``) and demo dataset (``demo``), and the scripts that
pre-trained them (``python -m kolors_story.tiny.pretrain``, ``python -m kolors_story.tiny.pretrain_ip``).

**This module is the one seam** the rest of the package calls: nothing outside ``kolors_story.tiny``
imports its submodules (``tests/test_architecture.py`` checks it). The stand-ins are chosen by the
config (``model=tiny`` sets ``model.tiny``, ``scorer.tiny``, ``coherence.reference.tiny`` and the
paths they are built into). Every function below answers "nothing to do" for real settings, so
production code calls them unconditionally and carries no tiny branches of its own: a stand-in
folder is built where the real weights would be, and from then on it is read like the real thing.
"""

from __future__ import annotations

from pathlib import Path

NOTE = "tiny model: not a real result"  # what every output made with a stand-in says about itself
PANEL_NOTE = f"{NOTE} (64x64)"  # the title of sheets rendered by the tiny model
SUMMARY_NOTE = ("model=tiny: a tiny model (pre-trained on drawn scenes, or random), not Kolors - images and scores "
                "exercise the code paths and show the LoRA's effect; they are not a real result.")


def _taste(scorer) -> str | None:
    taste = scorer.tiny.taste
    return None if taste in (None, "none", "null") else str(taste)


def check(*, model=None, scorer=None, reference=None) -> None:
    """The stand-in specs of these settings groups, before anything is built or loaded: a bad value
    raises a one-line ``SettingsError`` naming the key."""
    from kolors_story.errors import SettingsError

    if model is not None and model.tiny is not None:
        from kolors_story.tiny.kolors import check_tiny_model

        check_tiny_model(int(model.tiny.seed), str(model.tiny.weights), str(model.tiny.layout))
    if scorer is not None and scorer.tiny is not None:
        from kolors_story.tiny.scorer import TASTES

        if _taste(scorer) not in (None, *TASTES):
            raise SettingsError(f"scorer.tiny.taste={scorer.tiny.taste!r}: use none or one of {list(TASTES)}")
    if reference is not None and reference.tiny is not None:
        from kolors_story.tiny.ip_adapter import check_tiny_ip_settings

        check_tiny_ip_settings(int(reference.tiny.seed), str(reference.tiny.weights))


def provides(group) -> bool:
    """True when the folder of this settings group (model, scorer or coherence.reference) is a
    stand-in built here, so a check for downloaded files does not apply to it."""
    return getattr(group, "tiny", None) is not None


def provide_model(model) -> Path:
    """The model folder of ``model`` (a ``ModelSettings``); for ``model=tiny`` the tiny Kolors is built there first."""
    path = Path(str(model.path)).expanduser()
    if model.tiny is not None:
        from kolors_story.tiny.kolors import ensure_tiny_model

        ensure_tiny_model(path, seed=int(model.tiny.seed), layout=str(model.tiny.layout), weights=str(model.tiny.weights))
    return path


def provide_scorer(scorer) -> None:
    """The tiny aesthetic predictor (with ``scorer.tiny.taste``) built into ``scorer.path`` when asked."""
    if scorer.tiny is not None:
        from kolors_story.tiny.scorer import ensure_tiny_scorer

        check(scorer=scorer)
        ensure_tiny_scorer(Path(str(scorer.path)).expanduser(), seed=int(scorer.tiny.seed), taste=_taste(scorer))


def provide_clip(scorer) -> None:
    """The tiny CLIP (both towers) built into ``scorer.clip_path`` when the scorer is a stand-in."""
    if scorer.tiny is not None:
        from kolors_story.tiny.scorer import ensure_tiny_clip

        ensure_tiny_clip(Path(str(scorer.clip_path)).expanduser(), seed=int(scorer.tiny.seed))


def provide_ip_adapter(reference) -> None:
    """The tiny Kolors-IP-Adapter-Plus (random or pre-trained) built into ``coherence.reference.path``."""
    if reference.tiny is not None:
        from kolors_story.tiny.ip_adapter import ensure_tiny_ip_adapter

        ensure_tiny_ip_adapter(reference.path, seed=int(reference.tiny.seed), weights=str(reference.tiny.weights))


def provide_captioner(dataset, folder: Path) -> None:
    """A tiny random captioner of ``dataset.captioner``'s family built into ``folder`` (``dataset.captioner_tiny``)."""
    if dataset.captioner_tiny:
        from kolors_story.tiny.captioner import ensure_tiny_captioner

        ensure_tiny_captioner(folder, str(dataset.captioner))


def draw_demo(dataset) -> Path:
    """The drawn ink-wash demo set (``dataset=demo``) in ``dataset.path``, drawn once per seed."""
    from kolors_story.tiny.demo import make_demo_dataset

    return make_demo_dataset(dataset.path, seed=int(getattr(dataset, "seed", 0)))


def note(subject) -> str | None:
    """:data:`NOTE` when ``subject`` (model or scorer settings, or a model/scorer folder) is a
    stand-in, else None: what outputs made with it say about themselves."""
    if getattr(subject, "tiny", None) is not None:
        return NOTE
    if isinstance(subject, (str, Path)):
        from kolors_story.tiny.folders import is_stand_in

        return NOTE if is_stand_in(subject) else None
    return None


# ------------------------------------------------------------- for the bench (real code, stand-in sizes)


def architecture(name: str, size: str = "tiny") -> dict:
    """A stand-in architecture dict: ``name`` in unet, text_encoder, vae, predictor, clip, ip_encoder,
    ip_resampler (tiny) or unet, text_encoder, vae (bench)."""
    from kolors_story.tiny import architectures as a

    table = {
        "tiny": {"unet": a.tiny_unet_config, "text_encoder": a.tiny_text_encoder_config, "vae": a.tiny_vae_config,
                 "predictor": a.tiny_predictor_config, "clip": a.tiny_clip_config,
                 "ip_encoder": a.tiny_ip_encoder_config, "ip_resampler": lambda: dict(a.TINY_IP_RESAMPLER)},
        "bench": {"unet": a.bench_unet_config, "text_encoder": a.bench_text_encoder_config,
                  "vae": a.bench_vae_config},
    }
    return table[size][name]()


def resolution(size: str = "tiny") -> int:
    """The native image size of a stand-in Kolors (tiny: 64, bench: 128)."""
    from kolors_story.tiny.architectures import BENCH_RESOLUTION

    return 64 if size == "tiny" else BENCH_RESOLUTION


def build_model(folder: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """A random stand-in Kolors folder, built once per seed. ``size``: tiny, bench, or peers (the real
    UNet and VAE with a 2-layer ChatGLM3 of the real width, fp16 files: the bench's peers section)."""
    from kolors_story.tiny.kolors import ensure_bench_model, ensure_peers_model, ensure_tiny_model

    builders = {"tiny": ensure_tiny_model, "bench": ensure_bench_model, "peers": ensure_peers_model}
    return builders[size](folder, seed=seed)


def model_version(size: str = "tiny") -> int:
    """The version of a stand-in's architecture (bumped when it changes, so cached copies are rebuilt)."""
    from kolors_story.tiny.kolors import BENCH_VERSION, PEERS_VERSION, TINY_VERSION

    return {"tiny": TINY_VERSION, "bench": BENCH_VERSION, "peers": PEERS_VERSION}[size]


def draw_demo_image(index: int, width: int, height: int, seed: int = 0):
    """One demo drawing and its caption (the bench's style set at any size)."""
    from kolors_story.tiny.demo import draw_demo_image as draw

    return draw(index, width, height, seed=seed)
