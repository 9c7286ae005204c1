"""The pre-trained tiny Kolors' weights, shipped in the package (``tiny_pretrained/``).

``python -m kolors_story.train.pretrain_tiny`` made them (see its docstring; ``PRETRAINED.json``
holds the command, the settings, the losses and each file's sha256). ``model.tiny.weights=
pretrained`` builds the tiny model of seed 0 and puts these weights into its UNet and VAE. The
files are checked against the recorded sha256 before use: a changed or damaged file is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kolors_story.errors import UserError
from kolors_story.files import file_sha256

PRETRAINED_DIR = Path(__file__).parent / "tiny_pretrained"
PRETRAINED_RECORD = "PRETRAINED.json"
PRETRAINED_VERSION = 1
REBUILD = "rebuild them with `python -m kolors_story.train.pretrain_tiny` (about 15 minutes on 2 CPU cores)"


class PretrainedTinyError(UserError, RuntimeError):
    """The shipped pre-trained tiny weights are missing or do not match their record."""


def pretrained_record(folder: Path = PRETRAINED_DIR) -> dict:
    path = Path(folder) / PRETRAINED_RECORD
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PretrainedTinyError(f"{path} cannot be read ({exc}): the pre-trained tiny weights are missing; "
                                  f"{REBUILD}, or use model.tiny.weights=random") from exc


def load_pretrained_into(components: dict, folder: Path = PRETRAINED_DIR) -> dict:
    """Put the shipped UNet, VAE and text-encoder-layer weights into the tiny ``components`` (in
    place, as float32), after checking each file's sha256 against ``PRETRAINED.json``. Returns the
    record. The text encoder file holds its transformer layers only (its token embeddings are the
    random ones of seed 0)."""
    from safetensors.torch import load_file

    record = pretrained_record(folder)
    for name in ("unet", "vae", "text_encoder"):
        path = Path(folder) / f"{name}.safetensors"
        want = record.get("sha256", {}).get(name)
        got = file_sha256(path) if path.is_file() else "missing"
        if got != want:
            raise PretrainedTinyError(f"{path}: sha256 {got[:16]} does not match the recorded {str(want)[:16]} in "
                                      f"{PRETRAINED_RECORD}; {REBUILD}")
        state = {k: v.to(torch.float32) for k, v in load_file(str(path)).items()}
        missing, unexpected = components[name].load_state_dict(state, strict=False)
        if unexpected or (missing and name != "text_encoder"):
            raise PretrainedTinyError(f"{path} does not fit the tiny {name} (missing {missing[:3]}, unexpected "
                                      f"{unexpected[:3]}); {REBUILD}")
    components["vae"].register_to_config(scaling_factor=float(record["vae_scaling_factor"]))
    return record
