"""Fetch the real weights from ModelScope (default) or the Hugging Face Hub into the folders the
configs expect.

    python -m kolors_story.download                 # Kolors + fp16-fix VAE + aesthetic scorer + CLIP
    python -m kolors_story.download --source hf     # the same from the Hugging Face Hub
    python -m kolors_story.download ip_adapter      # Kolors-IP-Adapter-Plus (coherence.reference)
    python -m kolors_story.download captioner       # Qwen2-VL-2B-Instruct (dataset.captioner=qwen2_vl)
    python -m kolors_story.download kolors --dir /data/models
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from kolors_story.errors import UserError


@dataclass(frozen=True)
class Weights:
    name: str
    model_id: str  # ModelScope repository
    subdir: str  # folder under --dir; conf/ points here by default
    needed_for: str
    default: bool = True  # fetched by a plain `python -m kolors_story.download`
    hf_id: str = ""  # the same weights on the Hugging Face Hub (--source hf)

    def repo(self, source: str) -> str:
        return self.hf_id if source == "hf" else self.model_id


SOURCES = {"modelscope": "ModelScope", "hf": "the Hugging Face Hub"}


WEIGHTS = {
    w.name: w
    for w in (
        # the loader reads either release layout: Kwai-Kolors/Kolors or Kolors-diffusers (the Hub's)
        Weights("kolors", "Kwai-Kolors/Kolors", "kolors/Kolors", "model=kolors (model.path)",
                hf_id="Kwai-Kolors/Kolors-diffusers"),
        Weights("vae", "AI-ModelScope/sdxl-vae-fp16-fix", "sdxl-vae-fp16-fix", "fp16 decoding without NaNs (model.vae_path)",
                hf_id="madebyollin/sdxl-vae-fp16-fix"),
        Weights(
            "scorer",
            "AI-ModelScope/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE",
            "aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE",
            "the competition's aesthetic score (scorer.path)",
            hf_id="shunk031/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE",
        ),
        Weights("clip", "AI-ModelScope/clip-vit-large-patch14", "clip-vit-large-patch14",
                "prompt alignment of each panel, CLIP-T (scorer.clip_path)", hf_id="openai/clip-vit-large-patch14"),
        Weights("ip_adapter", "Kwai-Kolors/Kolors-IP-Adapter-Plus", "Kolors-IP-Adapter-Plus",
                "a reference image for the characters, coherence.reference (coherence.reference.path)",
                default=False, hf_id="Kwai-Kolors/Kolors-IP-Adapter-Plus"),
        Weights("captioner", "Qwen/Qwen2-VL-2B-Instruct", "Qwen2-VL-2B-Instruct",
                "automatic captions, dataset.captioner=qwen2_vl (the small one)", default=False,
                hf_id="Qwen/Qwen2-VL-2B-Instruct"),
        Weights("captioner_large", "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen2.5-VL-7B-Instruct",
                "automatic captions, dataset.captioner=qwen2_5_vl (the strong one)", default=False,
                hf_id="Qwen/Qwen2.5-VL-7B-Instruct"),
    )
}


class DownloadError(UserError, RuntimeError):
    pass


def target_paths(names: list[str], root: str | Path) -> dict[str, Path]:
    """Where each requested item goes; unknown names raise with the valid choices."""
    unknown = [n for n in names if n not in WEIGHTS]
    if unknown:
        raise DownloadError(f"unknown weights {unknown}; choose from {sorted(WEIGHTS)}")
    return {n: Path(root) / WEIGHTS[n].subdir for n in names}


def _snapshot(source: str):
    """The hub's own ``snapshot_download``: modelscope's or huggingface_hub's."""
    if source not in SOURCES:
        raise DownloadError(f"--source {source!r}: use one of {sorted(SOURCES)}")
    if source == "hf":
        from huggingface_hub import snapshot_download
    else:
        from modelscope import snapshot_download
    return snapshot_download


def download(names: list[str], root: str | Path = "models", snapshot_download=None,
             source: str = "modelscope") -> dict[str, Path]:
    """Download each item with the ``source`` hub's ``snapshot_download`` into ``root/<subdir>``."""
    snapshot_download = snapshot_download or _snapshot(source)
    hint = "HF_ENDPOINT, a proxy" if source == "hf" else "a proxy / MODELSCOPE_DOMAIN"
    done = {}
    for name, path in target_paths(names, root).items():
        w = WEIGHTS[name]
        path.mkdir(parents=True, exist_ok=True)
        print(f"Downloading {w.repo(source)} from {SOURCES[source]} -> {path}  ({w.needed_for})", flush=True)
        try:
            done[name] = Path(snapshot_download(w.repo(source), local_dir=str(path)))
        except Exception as exc:  # network, auth, disk: all end the same way for the user
            raise DownloadError(
                f"Could not download {w.repo(source)} from {SOURCES[source]} into {path}: {type(exc).__name__}: "
                f"{exc}\nCheck the network ({hint}), try the other --source, or copy that model's files into "
                f"{path} by hand; the loaders only need the files in place."
            ) from exc
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kolors_story.download", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = [n for n, w in WEIGHTS.items() if w.default]
    parser.add_argument("what", nargs="*", default=defaults,
                        help=f"any of {sorted(WEIGHTS)} (default: {' '.join(defaults)})")
    parser.add_argument("--dir", default="models", help="root folder (default: models/, as in conf/)")
    parser.add_argument("--source", default="modelscope", choices=sorted(SOURCES),
                        help="modelscope (default: where the competition hosts the weights) or hf (the Hugging Face Hub)")
    args = parser.parse_args(argv)
    try:
        for name, path in download(args.what, args.dir, source=args.source).items():
            print(f"{name}: {path}")
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
