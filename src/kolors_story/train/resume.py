"""``python train.py resume=<run | checkpoint>``: the run's own saved config with this command
line's plain ``key=value`` overrides (e.g. a larger ``trainer.max_steps``), and the trainer state
to restore. Also: saving a run's config when training was started from Python, not Hydra."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kolors_story.configs import group_choices, saved_choices, task_overrides
from kolors_story.errors import TrainingError
from kolors_story.files import atomic_path
from kolors_story.records import CHECKPOINTS, LAST_FILE, TRAINER_STATE, last_checkpoint


def _locate(target: Path) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) of ``resume=<run dir | checkpoint dir>``."""
    if (target / TRAINER_STATE).exists():
        return target.parent.parent, target
    if not target.is_dir():
        raise TrainingError(f"resume={target}: no such folder (give a run folder or one of its checkpoints/step-* folders)")
    ckpt_dir = last_checkpoint(target)
    if ckpt_dir is None:
        raise TrainingError(
            f"resume={target}: {target / CHECKPOINTS / LAST_FILE} does not exist: the run saved no checkpoint "
            "yet, so there is nothing to resume; start a new run"
        )
    return target, ckpt_dir


def _apply_overrides(saved: DictConfig, cfg, run_dir: Path) -> None:
    """This command line's overrides on the saved config; group changes and lora/model changes refused."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices, old_choices = group_choices(cfg), saved_choices(run_dir)
    for ov in OverridesParser.create().parse_overrides(task_overrides(cfg)):
        key = ov.key_or_group
        if key == "resume" or key.startswith("hydra"):
            continue
        if key in choices or key in old_choices:  # a config group choice (model=tiny ...)
            if old_choices.get(key) is not None and str(old_choices.get(key)) == str(ov.value()):
                continue
            raise TrainingError(
                f"resume: {key}={ov.value()} changes a config group of the run (it used "
                f"{key}={old_choices.get(key, '?')}); a resumed run keeps its groups - drop it or start a new run"
            )
        if key.split(".")[0] in ("lora", "model") and OmegaConf.select(saved, key) != ov.value():
            raise TrainingError(f"resume: {key} cannot change when resuming (the checkpoint was trained with "
                                f"{key}={OmegaConf.select(saved, key)})")
        if ov.is_delete():
            raise TrainingError(f"resume: ~{key} is not supported when resuming")
        OmegaConf.update(saved, key, ov.value(), force_add=ov.is_add())


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


def resume_config(cfg) -> tuple[DictConfig, Path, Path]:
    """For ``resume=<run dir | checkpoint dir>``: the run's saved config with this command line's
    overrides, the run folder (training continues there) and the trainer state to restore."""
    run_dir, ckpt_dir = _locate(Path(str(cfg.resume)).expanduser())
    state = ckpt_dir / TRAINER_STATE
    if not state.exists():
        raise TrainingError(f"resume: {state} is missing (the checkpoint folder is incomplete); "
                            f"resume from an earlier one: resume={ckpt_dir.parent}/step-XXXXXX")
    check_trainer_state(state)
    saved_file = run_dir / ".hydra" / "config.yaml"
    if not saved_file.exists():
        raise TrainingError(f"resume: {saved_file} is missing, so the run's config is unknown")
    saved = OmegaConf.load(saved_file)
    saved.pop("hydra", None)
    _apply_overrides(saved, cfg, run_dir)
    saved.resume = str(run_dir)
    saved.output_dir = str(run_dir)
    return saved, run_dir, state


def save_run_config(cfg, run_dir: Path) -> None:
    """``.hydra/config.yaml`` (+ choices) when training is called outside a Hydra run, so
    ``resume=`` works for runs started from Python too."""
    folder = run_dir / ".hydra"
    if (folder / "config.yaml").exists():
        return
    data = OmegaConf.to_container(cfg, resolve=False)
    data.pop("hydra", None)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "config.yaml") as tmp:
        OmegaConf.save(OmegaConf.create(data), tmp)
    choices = group_choices(cfg)
    if choices:
        with atomic_path(folder / "hydra.yaml") as tmp:
            OmegaConf.save(OmegaConf.create({"hydra": {"runtime": {"choices": choices}}}), tmp)


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
