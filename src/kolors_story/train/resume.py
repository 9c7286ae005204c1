"""``python train.py resume=<run | checkpoint>``: the trainer state is checked before it is used, and
a changed dataset is named. (The run's saved config is read back by ``config.saved.resume_config``.)"""

from __future__ import annotations

from pathlib import Path

from kolors_story.errors import TrainingError


def check_trainer_state(state: Path) -> None:
    """The trainer state opens with the safe loader (tensors and plain values only); anything else
    is refused naming the file, never by loading it less safely."""
    import torch

    try:
        torch.load(state, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch's message suggests weights_only=False: not shown
        raise TrainingError(
            f"resume: {state} cannot be read as a kolors-story trainer state ({type(exc).__name__}): it is damaged "
            "or was not written by train.py, so it is not trusted. Resume from an earlier checkpoint "
            f"(resume={state.parent.parent}/step-XXXXXX) or start a new run."
        ) from None


def warn_if_dataset_changed(ckpt_dir: Path, dataset_hash: str) -> None:
    try:
        from kolors_story.lora import checkpoint_lora_file, read_lora

        meta = read_lora(checkpoint_lora_file(ckpt_dir)).metadata
    except Exception:  # noqa: BLE001 - informational only
        return
    old = meta.get("dataset_hash")
    if old and dataset_hash and old != dataset_hash:
        print(f"WARNING: the dataset changed since {ckpt_dir} (dataset hash {old} -> {dataset_hash}); "
              "the resumed run trains on the new data")
