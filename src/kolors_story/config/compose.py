"""Hydra and OmegaConf helpers: from a composed (or recorded) config to typed settings.

The entry points hand their composed config to :func:`to_settings` once; below that the library
works with the dataclasses of :mod:`kolors_story.config`. Recorded configs (a run's
``.hydra/config.yaml``, a manifest's ``config``) go through the same function, so an old record
missing a newer key gets that key's default instead of a ``.get(key, default)`` in the code.
"""

from __future__ import annotations

import dataclasses
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kolors_story.config.data_settings import DATASET_SCHEMAS
from kolors_story.config.job_settings import JOB_SCHEMAS, register_configs
from kolors_story.config.trigger import apply_trigger


@dataclass(frozen=True)
class RunIdentity:
    """Where Hydra put this job, for the stages that name it: inside a ``-m`` sweep or not, the sweep
    folder (a training run's W&B group) and the job's overrides (its W&B name)."""

    multirun: bool = False
    sweep_dir: str | None = None
    overrides: str | None = None


def run_identity() -> RunIdentity:
    """This job's :class:`RunIdentity` (all empty outside a Hydra run)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return RunIdentity()
        hc = HydraConfig.get()
        multirun = in_multirun()
        return RunIdentity(multirun, str(hc.sweep.dir) if multirun else None, hc.job.override_dirname or None)
    except Exception:  # noqa: BLE001 - no Hydra context
        return RunIdentity()


def in_multirun() -> bool:
    """True inside a ``-m`` sweep job."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001 - no Hydra context at all
        return False


def task_overrides(cfg) -> list[str]:
    """The user's command-line overrides (Hydra run, or a compose() with return_hydra_config)."""
    try:
        if "hydra" in cfg and cfg.hydra.get("overrides") is not None:
            return [str(o) for o in cfg.hydra.overrides.task]
    except Exception:  # noqa: BLE001 - a config without hydra metadata simply has no overrides
        pass
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return [str(o) for o in HydraConfig.get().overrides.task]
    except Exception:  # noqa: BLE001
        pass
    return []


def override_key(override: str) -> str:
    """``+a.b=1`` -> ``a.b``."""
    return override.split("=", 1)[0].lstrip("+~")


def explicit_keys(cfg, groups: tuple[str, ...] = ("memory",)) -> set[str]:
    """What the user set on the command line: dotted keys (``sampler.batch_size``), and the group
    names of ``groups`` chosen explicitly (``memory=low_vram`` sets every ``memory.*`` key)."""
    keys = set()
    for override in task_overrides(cfg):
        key = override_key(override)
        if "." in key or key in groups:
            keys.add(key)
    return keys


def group_choices(cfg) -> dict:
    """The config group choices of this job (``{"model": "tiny", ...}``), Hydra run or compose()."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return dict(HydraConfig.get().runtime.choices)
    except Exception:  # noqa: BLE001
        pass
    node = cfg.get("hydra") if isinstance(cfg, DictConfig) else None
    choices = OmegaConf.select(node, "runtime.choices", default=None) if node is not None else None
    return dict(OmegaConf.to_container(choices)) if isinstance(choices, DictConfig) else {}


def resolved_config(cfg) -> dict:
    """The config as plain data, every interpolation resolved, without Hydra's own node.

    ``output_dir`` (``${hydra:runtime.output_dir}``) is None outside a Hydra run unless set.
    """
    data = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else dict(cfg)
    data.pop("hydra", None)
    if "output_dir" in data:
        try:
            data["output_dir"] = None if cfg.get("output_dir") is None else str(cfg.output_dir)
        except Exception:  # noqa: BLE001 - ${hydra:...} outside a Hydra run
            data["output_dir"] = None
    return OmegaConf.to_container(OmegaConf.create(data), resolve=True)


def _known_keys(data, schema) -> tuple[dict, list[str]]:
    """``data`` without the keys ``schema`` does not have (recursively), and what was dropped."""
    hints = typing.get_type_hints(schema)
    kept, dropped = {}, []
    for key, value in data.items():
        if key not in hints:
            dropped.append(key)
            continue
        sub = hints[key]
        inner = [a for a in typing.get_args(sub) if dataclasses.is_dataclass(a)]  # Optional[X]
        target = sub if dataclasses.is_dataclass(sub) else (inner[0] if inner else None)
        if target is not None and isinstance(value, dict):
            value, below = _known_keys(value, _schema_for(key, value, target))
            dropped += [f"{key}.{k}" for k in below]
        kept[key] = value
    return kept, dropped


def _schema_for(key: str, value, declared):
    """The dataclass a group's values are checked against (the dataset's depends on its source)."""
    if key == "dataset" and isinstance(value, dict):
        return DATASET_SCHEMAS.get(str(value.get("source", "folder")), declared)
    return declared


def typed(data, schema, *, lenient: bool = False):
    """``data`` (a plain, resolved mapping) as an instance of the dataclass ``schema``.

    Keys ``data`` lacks get the schema's default; a wrong type raises OmegaConf's ValidationError
    naming the key. ``lenient`` drops keys the schema does not know (records written by an older
    version) with a warning, instead of refusing them.
    """
    if OmegaConf.is_config(data):
        data = OmegaConf.to_container(data, resolve=True)
    data = dict(data)
    if lenient:
        data, dropped = _known_keys(data, schema)
        if dropped:
            warnings.warn(f"ignoring config keys this version does not use: {', '.join(dropped)}", stacklevel=2)
    base = OmegaConf.structured(schema)
    hints = typing.get_type_hints(schema)
    for key, value in data.items():  # groups whose options differ in keys: pick the option's schema
        declared = hints.get(key)
        if dataclasses.is_dataclass(declared) and isinstance(value, dict):
            chosen = _schema_for(key, value, declared)
            if chosen is not declared:
                base[key] = OmegaConf.structured(chosen)
    return OmegaConf.to_object(OmegaConf.merge(base, data))


def to_settings(cfg, job: str, *, lenient: bool = False):
    """The typed settings of a whole job config (``job``: train, generate or evaluate), with the
    trigger words applied to the captions and prompts (``config.trigger``)."""
    settings = typed(resolved_config(cfg), JOB_SCHEMAS[job], lenient=lenient)
    return apply_trigger(settings) if hasattr(settings, "trigger") else settings


def quote_unicode_overrides(args: list[str]) -> list[str]:
    """Command-line overrides as Hydra can read them: a value with non-ASCII characters that the
    shell passed unquoted (``trigger=水墨画``) is quoted, since Hydra's grammar only takes such a
    value in quotes. Values holding quotes or Hydra's sweep/list syntax are left as typed."""
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        plain_key = key.lstrip("+~").replace(".", "").replace("_", "").replace("@", "").isalnum()
        if eq and plain_key and not value.isascii() and not set(value) & set("'\",[]{}()$"):
            arg = f"{key}='{value}'"
        out.append(arg)
    return out


def config_errors_in_one_line() -> None:
    """Make a config Hydra cannot compose (a mistyped value, an unknown key or group option) end
    like every user error: one ``error: ...`` line and exit code 2, instead of Hydra's report and
    exit 1. Hydra reports in ``run_and_report`` around composing and running; the entry points
    call this once before ``hydra.main`` runs."""
    import hydra._internal.utils as hydra_utils
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    from kolors_story.errors import SettingsError, print_user_error

    report = hydra_utils.run_and_report
    if getattr(report, "one_line", False):
        return

    def run_and_report(func):
        def composed():
            try:
                return func()
            except (ConfigCompositionException, MissingConfigException, OverrideParseException) as exc:
                what = ": ".join(str(e).strip().splitlines()[0].rstrip(".") for e in (exc, exc.__cause__) if e)
                if print_user_error(SettingsError(f"{what} (--cfg job prints the config with every key and its value)")):
                    raise SystemExit(2) from None
                raise  # HYDRA_FULL_ERROR=1: Hydra's own report
        return report(composed)

    run_and_report.one_line = True
    hydra_utils.run_and_report = run_and_report


def prepare_entry_point(argv: list[str]) -> None:
    """What train.py, generate.py and evaluate.py do before ``hydra.main``: register the schemas conf/
    builds on, quote a non-ASCII value typed bare (``trigger=水墨画``; ``argv`` is changed in place),
    and make Hydra's composition errors one ``error:`` line with exit code 2."""
    register_configs()
    argv[1:] = quote_unicode_overrides(argv[1:])
    config_errors_in_one_line()


CONF_DIR = Path(__file__).resolve().parents[3] / "conf"  # the checkout's conf/ (pip install -e .)


def compose_settings(job: str, overrides: list[str]):
    """The typed settings of ``conf/<job>.yaml`` with ``overrides``, composed as the entry points
    do (for library code that renders or plans without an entry point: bench, comparison sheets)."""
    from hydra import compose, initialize_config_dir

    if not (CONF_DIR / f"{job}.yaml").exists():
        raise FileNotFoundError(f"the config folder {CONF_DIR} is missing: run from a checkout (pip install -e .)")
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=job, overrides=overrides)
    return to_settings(cfg, job)


def plain(settings) -> dict:
    """Typed settings as plain data (what manifests, LoRA metadata and W&B record)."""
    return OmegaConf.to_container(OmegaConf.structured(settings))


def config_yaml(data: dict) -> str:
    """A recorded config (plain data) as the YAML a user reads (a bundle's ``config.yaml``)."""
    return OmegaConf.to_yaml(OmegaConf.create(data))
