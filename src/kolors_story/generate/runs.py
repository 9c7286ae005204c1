"""``generate.py run=<training run | best.yaml> checkpoint=<step-XXXXXX | last | best>``: which
checkpoint that names, and the config it is rendered with (the run's model, scorer, story, sampler
and coherence; the user's own command-line choices still win)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from kolors_story.configs import override_key, task_overrides
from kolors_story.errors import MissingFileError, SettingsError
from kolors_story.lora.files import checkpoint_lora_file
from kolors_story.records import CHECKPOINTS, EMA_SUFFIX, LAST_FILE

RUN_GROUPS = ("model", "scorer", "story", "sampler", "coherence")  # taken from the training run's config


@dataclass
class CheckpointRef:
    run: Path
    checkpoint: Path  # the checkpoint folder
    lora: Path
    config: Path  # the run's .hydra/config.yaml
    best: Path | None = None  # the best.yaml it came from

    def as_dict(self) -> dict:
        return {"run": str(self.run), "checkpoint": self.checkpoint.name, "checkpoint_dir": str(self.checkpoint),
                "lora": str(self.lora), "config": str(self.config), "best": str(self.best) if self.best else None}


def _checkpoint_folder(run: Path, name: str) -> Path:
    """A checkpoint named as step-XXXXXX, a number, checkpoints/step-XXXXXX or a path."""
    name = str(name).strip()
    if name.isdigit():
        name = f"step-{int(name):06d}"
    for cand in (Path(name), run / name, run / CHECKPOINTS / name):
        if cand.is_dir():
            return cand
    folder = run / CHECKPOINTS
    found = sorted(p.name for p in folder.glob("step-*") if p.is_dir()) if folder.is_dir() else []
    raise MissingFileError(
        f"checkpoint {name!r} not found in {folder} (have: {', '.join(found) or 'none'}); "
        "use checkpoint=step-XXXXXX, last or best"
    )


def _read_best(path: Path) -> tuple[Path | None, str | None]:
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or not data.get("checkpoint") and not data.get("checkpoint_dir"):
        raise SettingsError(f"{path} has no 'checkpoint' key; a best file needs keys run and checkpoint")
    run = Path(str(data["run"])) if data.get("run") else None
    ckpt = data.get("checkpoint_dir") or data.get("checkpoint")
    return run, str(ckpt)


def resolve_checkpoint(run: str | Path | None, checkpoint: str | Path | None = "last") -> CheckpointRef:
    """Find a training run's checkpoint folder and its LoRA.

    ``run`` is a run folder (or a ``best.yaml`` / a sweep folder holding one); ``checkpoint`` is
    ``step-XXXXXX``, ``last`` (the name in ``<run>/checkpoints/last``), ``best`` (``best.yaml``
    in the run or its sweep folder) or a path to a best.yaml with keys run and checkpoint.
    """
    best_file = None
    checkpoint = "last" if checkpoint in (None, "") else str(checkpoint)
    run_path = Path(str(run)).expanduser() if run else None
    if run_path is not None and run_path.is_file() and run_path.suffix in (".yaml", ".yml"):
        best_file, run_path = run_path, None
    elif checkpoint.endswith((".yaml", ".yml")):
        best_file = Path(checkpoint).expanduser()
        if not best_file.is_file():
            raise MissingFileError(f"checkpoint={checkpoint}: best file {best_file} does not exist")
    elif checkpoint == "best":
        if run_path is None:
            raise SettingsError("checkpoint=best needs run=<run folder> (or pass the best.yaml itself as run= or checkpoint=)")
        looked = [run_path / "best.yaml", run_path.parent / "best.yaml"]
        best_file = next((p for p in looked if p.is_file()), None)
        if best_file is None:
            raise MissingFileError(
                f"checkpoint=best: no best.yaml at {' or '.join(map(str, looked))}; run "
                "`python evaluate.py sweep=<sweep folder>` to write one, or name the checkpoint (step-XXXXXX, last)"
            )
    if best_file is not None:
        best_run, checkpoint = _read_best(best_file)
        if best_run is not None and (run_path is None or not (run_path / ".hydra").is_dir()):
            run_path = best_run
        if run_path is None:
            raise SettingsError(f"{best_file} names no run; add a 'run' key or pass run=<run folder>")
    if run_path is None:
        raise SettingsError("run= is empty: give a training run folder")
    ema = checkpoint.endswith(EMA_SUFFIX)  # the checkpoint's EMA weights (trainer.ema)
    checkpoint = checkpoint.removesuffix(EMA_SUFFIX)
    if not run_path.is_dir():
        raise MissingFileError(f"run={run_path} is not a folder (expected a training run with .hydra/ and checkpoints/)")
    if checkpoint == "last":
        last = run_path / CHECKPOINTS / LAST_FILE
        if last.is_dir():
            folder = last
        elif last.is_file():
            folder = _checkpoint_folder(run_path, last.read_text(encoding="utf-8").strip())
        else:
            raise MissingFileError(f"checkpoint=last: {last} does not exist (has the run saved a checkpoint yet?)")
    else:
        folder = _checkpoint_folder(run_path, checkpoint)
    lora = checkpoint_lora_file(folder, "_ema" if ema else "")
    if not lora.is_file():
        raise MissingFileError(f"checkpoint {folder} has no {lora.name}"
                               + (" (the run was trained without trainer.ema.enabled)" if ema else ""))
    config = run_path / ".hydra" / "config.yaml"
    if not config.is_file():
        raise MissingFileError(f"run {run_path} has no .hydra/config.yaml (is it a train.py run folder?)")
    return CheckpointRef(run=run_path.resolve(), checkpoint=folder.resolve(), lora=lora.resolve(),
                         config=config.resolve(), best=best_file.resolve() if best_file else None)


def config_from_run(cfg, ref: CheckpointRef):
    """``cfg`` with model/scorer/story/sampler/coherence taken from the training run's config; the user's own
    command-line choices (``sampler=...`` or ``sampler.steps=...``) still win over the run's."""
    run_cfg = OmegaConf.load(ref.config)
    keys = [override_key(o) for o in task_overrides(cfg)]
    new = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(new):
        for group in RUN_GROUPS:
            if group in keys or group not in run_cfg:
                continue  # group chosen on the command line, or the run has none: keep the composed one
            new[group] = run_cfg[group]
        for key in keys:
            if "." in key and key.split(".", 1)[0] in RUN_GROUPS:
                OmegaConf.update(new, key, OmegaConf.select(cfg, key), force_add=True)
        new.lora_path = str(ref.lora)
    return new


def effective_config(cfg):
    """The config that will actually be rendered (run/checkpoint resolved), and where it came from."""
    if not cfg.get("run"):
        return cfg, None
    if cfg.get("lora_path"):
        raise SettingsError("run= supplies the LoRA (the checkpoint's lora.safetensors): drop lora_path, "
                         "or stack extra LoRAs with loras=[{path: ..., scale: ...}]")
    ref = resolve_checkpoint(cfg.run, cfg.get("checkpoint"))
    return config_from_run(cfg, ref), ref
