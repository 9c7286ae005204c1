"""``best.yaml``: the checkpoint a sweep's leaderboard picked, with what ``generate.py run=`` needs
to render it (written by ``evaluate.py sweep=``, read by ``generate.py run=<best.yaml>``)."""

from __future__ import annotations

from pathlib import Path

from kolors_story.records.base import Record, RecordError

BEST_FILE = "best.yaml"


class BestPick(Record):
    run: str | None = None  # the run folder (absolute)
    checkpoint: str | None = None  # relative to the run (``checkpoints/step-XXXXXX``, ``:ema`` for the EMA weights)
    checkpoint_dir: str | None = None
    step: int | None = None
    mean: float | None = None
    min: float | None = None
    coherence: float | None = None
    clip_t: float | None = None
    copy_paste: float | None = None
    story_objective: float | None = None
    val_loss: float | None = None
    reward_held_out: float | None = None
    passed: bool | None = None
    ranked_by: dict | None = None  # the objective that picked it
    overrides: list[str] = []
    config: dict | None = None  # the run's resolved config

    @property
    def names_checkpoint(self) -> str | None:
        """The checkpoint it names: its absolute folder when recorded, else the run-relative one."""
        return self.checkpoint_dir or self.checkpoint

    def write_yaml(self, path: str | Path) -> Path:
        import yaml

        from kolors_story.files import atomic_write_text

        return atomic_write_text(Path(path), yaml.safe_dump(self.to_json(), sort_keys=False, allow_unicode=True))

    @classmethod
    def read_yaml(cls, path: str | Path) -> BestPick:
        """A best file; one without a checkpoint raises :class:`RecordError` naming the file."""
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            raise RecordError(f"{path} cannot be read as YAML ({err})") from None
        pick = cls.from_json(data, source=path)
        if not pick.names_checkpoint:
            raise RecordError(f"{path} has no 'checkpoint' key; a best file needs keys run and checkpoint")
        return pick


__all__ = ["BEST_FILE", "BestPick"]
