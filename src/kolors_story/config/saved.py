"""The config a finished run saved, read back: ``resume=`` (the run's own config with this command
line's plain overrides), ``generate.py run=`` (a training run's model, story and sampler with the
checkpoint's LoRA) and ``reproduce=`` (the settings a manifest recorded, only locations changed).

These read a raw Hydra/OmegaConf config, as only the entry layer and this package do; what they
return is handed to :func:`kolors_story.config.compose.to_settings` (or is typed settings already).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from kolors_story.config.compose import group_choices, override_key, task_overrides, typed
from kolors_story.config.job_settings import GenerateSettings
from kolors_story.errors import MissingFileError, SettingsError, TrainingError
from kolors_story.files import atomic_path
from kolors_story.records import (
    BEST_FILE,
    CHARACTER_DIR,
    CHECKPOINTS,
    EMA_SUFFIX,
    FILE_NAMES,
    LAST_FILE,
    TRAINER_STATE,
    BestPick,
    Manifest,
    RunMetrics,
    checkpoint_lora_file,
    last_checkpoint,
)
from kolors_story.story.files import story_copy_in


def saved_choices(run_dir: Path) -> dict:
    """The group choices a run folder's ``.hydra/hydra.yaml`` recorded."""
    f = Path(run_dir) / ".hydra" / "hydra.yaml"
    if not f.exists():
        return {}
    choices = OmegaConf.select(OmegaConf.load(f), "hydra.runtime.choices", default={}) or {}
    return OmegaConf.to_container(choices) if isinstance(choices, DictConfig) else dict(choices)



# ------------------------------------------------------------------------ run= (generate.py)

RUN_GROUPS = ("model", "scorer", "story", "sampler", "coherence", "character")  # taken from the training run's config
RUN_KEYS = ("trigger",)  # top-level keys taken from it too: the words the LoRA was trained with


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
        looked = [run_path / BEST_FILE, run_path.parent / BEST_FILE]
        best_file = next((p for p in looked if p.is_file()), None)
        if best_file is None:
            raise MissingFileError(
                f"checkpoint=best: no best.yaml at {' or '.join(map(str, looked))}; run "
                "`python evaluate.py sweep=<sweep folder>` to write one, or name the checkpoint (step-XXXXXX, last)"
            )
    if best_file is not None:
        pick = BestPick.read_yaml(best_file)
        best_run, checkpoint = (Path(pick.run) if pick.run else None), str(pick.names_checkpoint)
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
        for group in (*RUN_GROUPS, *RUN_KEYS):
            if group in keys or group not in run_cfg:
                continue  # chosen on the command line, or the run has none: keep the composed one
            new[group] = run_cfg[group]
        for key in keys:
            if "." in key and key.split(".", 1)[0] in RUN_GROUPS:
                OmegaConf.update(new, key, OmegaConf.select(cfg, key), force_add=True)
        new.lora_path = str(ref.lora)
        _stack_character(new, ref.run)
        copy = story_copy_in(ref.run)
        if OmegaConf.select(new, "story.file") and copy and "story.file" not in keys:
            new.story.file = str(copy)  # the run's own copy of its story file
    return new


def _stack_character(new, run: Path) -> None:
    """The run's character LoRA (``character=auto``) first in ``loras``, at ``character.scale`` (0: left out)."""
    lora = run / CHARACTER_DIR / FILE_NAMES["diffusers"]
    scale = float(OmegaConf.select(new, "character.scale", default=1.0) or 0.0)
    if lora.is_file() and scale:
        new.loras = [{"path": str(lora), "scale": scale}, *(new.get("loras") or [])]


def effective_config(cfg):
    """The config that will actually be rendered (run/checkpoint resolved), and where it came from."""
    if not cfg.run:
        return cfg, None
    if cfg.lora_path:
        raise SettingsError("run= supplies the LoRA (the checkpoint's lora.safetensors): drop lora_path, "
                         "or stack extra LoRAs with loras=[{path: ..., scale: ...}]")
    ref = resolve_checkpoint(cfg.run, cfg.checkpoint)
    return config_from_run(cfg, ref), ref


# ------------------------------------------------------------------------------ resume= (train.py)


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


def resume_config(cfg, check_state: Callable[[Path], None] | None = None) -> tuple[DictConfig, Path, Path]:
    """For ``resume=<run dir | checkpoint dir>``: the run's saved config with this command line's
    overrides, the run folder (training continues there) and the trainer state to restore, which
    ``check_state`` (``train.resume.check_trainer_state``) checks before the config is read."""
    run_dir, ckpt_dir = _locate(Path(str(cfg.resume)).expanduser())
    state = ckpt_dir / TRAINER_STATE
    if not state.exists():
        raise TrainingError(f"resume: {state} is missing (the checkpoint folder is incomplete); "
                            f"resume from an earlier one: resume={ckpt_dir.parent}/step-XXXXXX")
    if check_state is not None:
        check_state(state)
    saved_file = run_dir / ".hydra" / "config.yaml"
    if not saved_file.exists():
        raise TrainingError(f"resume: {saved_file} is missing, so the run's config is unknown")
    saved = OmegaConf.load(saved_file)
    saved.pop("hydra", None)
    _apply_overrides(saved, cfg, run_dir)
    saved.resume = str(run_dir)
    saved.output_dir = str(run_dir)
    return saved, run_dir, state


def stopped_run(cfg) -> Path | None:
    """This job's run folder when it already holds a run that stopped before its end with a
    checkpoint (stopped by a signal, or killed outright: no status line last): a job requeued into
    the same folder (submitit's requeue, or SLURM's ``--requeue`` with a fixed ``hydra.run.dir``)
    resumes from its stop checkpoint by itself. Finished, failed and interrupted runs are left alone."""
    try:
        out = cfg.output_dir
    except Exception:  # noqa: BLE001 - ${hydra:...} outside a Hydra run: no folder to look in
        return None
    if not out or not Path(str(out)).is_dir():
        return None
    run = Path(str(out))
    metrics = RunMetrics.read(run)
    unfinished = (metrics.ended and metrics.status.status == "stopped") or (not metrics.ended and metrics.lines > 0)
    return run if unfinished and last_checkpoint(run) is not None else None


def with_resume(cfg, run_dir: Path):
    """``cfg`` with ``resume=<run_dir>`` set, as if it had been given on the command line."""
    new = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(new):
        new.resume = str(run_dir)
    return new


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


# --------------------------------------------------------------------------- reproduce= (generate.py)

# Keys a user may change with reproduce=: where things live and what runs them, never what is
# rendered (memory modes change pixels by at most fp rounding, which the report shows).
LOCATION_KEYS = ("model.path", "model.vae_path", "model.device", "scorer.path", "scorer.device", "output_dir",
                 "coherence.reference.path", "memory", "memory.*")


def is_location_key(key: str) -> bool:
    return key in LOCATION_KEYS or key.startswith("memory.")


def _location_overrides(overrides: list[str]) -> list[str]:
    bad = [o for o in overrides if not is_location_key(override_key(o)) and override_key(o) != "reproduce"]
    if bad:
        raise SettingsError(
            f"reproduce= regenerates with the recorded settings; only {', '.join(LOCATION_KEYS)} may be changed "
            f"(got {', '.join(bad)}). To render with other settings run generate.py without reproduce="
        )
    return [o for o in overrides if override_key(o) not in ("reproduce", "output_dir")]


def recorded_job(manifest: Manifest, locations: dict | None = None) -> GenerateSettings:
    """The generate settings a manifest recorded, with only ``locations`` changed; it renders the
    recorded LoRA files (not ``lora_path``/``run``) and writes no bundle."""
    config = OmegaConf.create(manifest.config)
    with open_dict(config):
        for key, value in (locations or {}).items():
            if not is_location_key(key):
                raise SettingsError(f"reproduce cannot change {key}; only {', '.join(LOCATION_KEYS)}")
            OmegaConf.update(config, key, value, force_add=True)
    job = typed(config, GenerateSettings, lenient=True)  # manifests of older versions carry retired keys
    job.run, job.reproduce, job.score, job.lora_path, job.loras = None, None, False, None, []
    job.submit.team = None
    return job


def reproduce_request(cfg) -> tuple[str, str, dict]:
    """For ``generate.py reproduce=<...> [model.path=<moved weights>]`` (the composed config: only its
    location keys are used): the source, the output folder and the locations that changed."""
    overrides = _location_overrides(task_overrides(cfg))
    locations = {override_key(o): OmegaConf.select(cfg, override_key(o)) for o in overrides}
    return str(cfg.reproduce), str(cfg.output_dir), locations
