"""The pre-trained tiny Kolors' and tiny IP-Adapter's weights, shipped in the package (``pretrained/``).

``python -m kolors_story.tiny.pretrain`` made them (see its docstring; ``PRETRAINED.json``
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
from kolors_story.models.ip_adapter import ENCODER_FOLDER, WEIGHT_NAME

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
PRETRAINED_RECORD = "PRETRAINED.json"
PRETRAINED_VERSION = 1
REBUILD = "rebuild them with `python -m kolors_story.tiny.pretrain` (about 15 minutes on 2 CPU cores)"


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


# ------------------------------------------------------------------------ the tiny IP-Adapter

PRETRAINED_IP_DIR = PRETRAINED_DIR / "ip_adapter"  # made by python -m kolors_story.tiny.pretrain_ip
PRETRAINED_IP_RECORD = "PRETRAINED_IP.json"
REBUILD_IP = "rebuild it with `python -m kolors_story.tiny.pretrain_ip` (about 6 minutes on 2 CPU cores)"


class PretrainedIPAdapterError(UserError, RuntimeError):
    """The shipped pre-trained tiny IP-Adapter is missing or does not match its record."""


def pretrained_ip_hashes(folder: Path) -> dict[str, str]:
    """sha256 of the adapter file and of the image encoder's weights in ``folder``."""
    files = {"adapter": Path(folder) / WEIGHT_NAME, "image_encoder": Path(folder) / ENCODER_FOLDER / "model.safetensors"}
    return {name: file_sha256(path) if path.is_file() else "missing" for name, path in files.items()}


def pretrained_ip_record(folder: Path | None = None) -> dict:
    """The shipped adapter's record (or ``folder``'s): the command, the settings, the sha256 values."""
    path = (Path(folder) if folder is not None else PRETRAINED_IP_DIR) / PRETRAINED_IP_RECORD
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PretrainedIPAdapterError(f"{path} cannot be read ({exc}): the pre-trained tiny IP-Adapter is missing; "
                                       f"{REBUILD_IP}, or use coherence.reference.tiny.weights=random") from exc


def check_pretrained_ip(folder: Path | None = None) -> dict:
    """The shipped adapter's record (or ``folder``'s), after checking both weight files against it."""
    folder = Path(folder) if folder is not None else PRETRAINED_IP_DIR
    record = pretrained_ip_record(folder)
    got = pretrained_ip_hashes(folder)
    for name, digest in got.items():
        if digest != record.get("sha256", {}).get(name):
            raise PretrainedIPAdapterError(f"{folder}: the {name} weights' sha256 {digest[:16]} does not match the "
                                           f"recorded one in {PRETRAINED_IP_RECORD}; {REBUILD_IP}")
    return record
