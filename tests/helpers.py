"""Helpers the tests share (fixtures live in conftest.py): composing configs the way the entry
points do, and turning them into the typed settings the library takes."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def compose(config_name: str, overrides: list[str] | None = None):
    """Compose a Hydra config from conf/ the way the entry points do (no run dir, no chdir)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from kolors_story.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [], return_hydra_config=True)


def settings(config_name: str, overrides: list[str] | None = None):
    """The typed settings (``TrainSettings``, ``GenerateSettings`` or ``EvaluateSettings``) of a composed config."""
    from kolors_story.config.compose import to_settings

    return to_settings(compose(config_name, overrides), config_name)


def prepare(cfg, **kw):
    """``data.prepare_dataset`` for a composed train config, as train.py's data stage calls it."""
    from kolors_story.config.compose import to_settings
    from kolors_story.data import prepare_dataset

    job = to_settings(cfg, "train")
    return prepare_dataset(job.dataset, job.filter, job.data_dir, scorer=job.scorer, **kw)


def run_data_stage(cfg):
    """``data.run_data_stage`` (prepare + the console summary) for a composed train config."""
    from kolors_story.config.compose import to_settings
    from kolors_story.data import run_data_stage as run

    job = to_settings(cfg, "train")
    return run(job.dataset, job.filter, job.data_dir, job.scorer)
