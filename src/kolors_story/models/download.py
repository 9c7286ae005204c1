"""Fetch the real weights from ModelScope into the folders the configs expect.

    python -m kolors_story.download                 # Kolors + fp16-fix VAE + aesthetic scorer + CLIP
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


WEIGHTS = {
    w.name: w
    for w in (
        Weights("kolors", "Kwai-Kolors/Kolors", "kolors/Kolors", "model=kolors (model.path)"),
        Weights("vae", "AI-ModelScope/sdxl-vae-fp16-fix", "sdxl-vae-fp16-fix", "fp16 decoding without NaNs (model.vae_path)"),
        Weights(
            "scorer",
            "AI-ModelScope/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE",
            "aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE",
            "the competition's aesthetic score (scorer.path)",
        ),
        Weights("clip", "AI-ModelScope/clip-vit-large-patch14", "clip-vit-large-patch14",
                "prompt alignment of each panel, CLIP-T (scorer.clip_path)"),
        Weights("ip_adapter", "Kwai-Kolors/Kolors-IP-Adapter-Plus", "Kolors-IP-Adapter-Plus",
                "a reference image for the characters, coherence.reference (coherence.reference.path)",
                default=False),
        Weights("captioner", "Qwen/Qwen2-VL-2B-Instruct", "Qwen2-VL-2B-Instruct",
                "automatic captions, dataset.captioner=qwen2_vl (the small one)", default=False),
        Weights("captioner_large", "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen2.5-VL-7B-Instruct",
                "automatic captions, dataset.captioner=qwen2_5_vl (the strong one)", default=False),
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


def download(names: list[str], root: str | Path = "models", snapshot_download=None) -> dict[str, Path]:
    """Download each item with modelscope's ``snapshot_download`` into ``root/<subdir>``."""
    if snapshot_download is None:
        from modelscope import snapshot_download
    done = {}
    for name, path in target_paths(names, root).items():
        w = WEIGHTS[name]
        path.mkdir(parents=True, exist_ok=True)
        print(f"Downloading {w.model_id} -> {path}  ({w.needed_for})", flush=True)
        try:
            done[name] = Path(snapshot_download(w.model_id, local_dir=str(path)))
        except Exception as exc:  # network, auth, disk: all end the same way for the user
            raise DownloadError(
                f"Could not download {w.model_id} from ModelScope into {path}: {type(exc).__name__}: {exc}\n"
                f"Check the network (or a proxy / MODELSCOPE_DOMAIN), or copy that model's files into {path} "
                "by hand; the loaders only need the files in place."
            ) from exc
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kolors_story.download", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = [n for n, w in WEIGHTS.items() if w.default]
    parser.add_argument("what", nargs="*", default=defaults,
                        help=f"any of {sorted(WEIGHTS)} (default: {' '.join(defaults)})")
    parser.add_argument("--dir", default="models", help="root folder (default: models/, as in conf/)")
    args = parser.parse_args(argv)
    try:
        for name, path in download(args.what, args.dir).items():
            print(f"{name}: {path}")
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
