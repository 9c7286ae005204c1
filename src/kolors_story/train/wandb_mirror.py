"""The W&B mirror of a run's metrics.jsonl: loss/lr, the story panel per checkpoint and a per-scene
score table. It only mirrors: any W&B failure (init or a later call) prints a warning and turns the
mirror off; training goes on with metrics.jsonl alone."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from kolors_story import tiny
from kolors_story.config import TrainSettings
from kolors_story.config.compose import RunIdentity
from kolors_story.files import atomic_write_text
from kolors_story.records import WANDB_ID_FILE, CharacterLine, CheckpointLine


class WandbMirror:
    """A W&B run fed from the same records as metrics.jsonl. ``active`` is False when W&B is off
    (mode disabled) or failed; every method is then a no-op."""

    def __init__(self, *, project: str, mode: str, run_dir: str | Path, config: dict | None = None,
                 entity: str | None = None, group: str | None = None, name: str | None = None,
                 tags: list[str] | None = None, wandb_dir: str | Path | None = None, resume_id: str | None = None):
        self.run = None
        self.mode = str(mode)
        self.error: str | None = None
        self.run_dir = Path(run_dir)
        if self.mode == "disabled":
            return
        try:
            import wandb

            folder = Path(wandb_dir) if wandb_dir else self.run_dir
            folder.mkdir(parents=True, exist_ok=True)
            kwargs: dict[str, Any] = dict(
                project=project, entity=entity, mode=self.mode, dir=str(folder), group=group, name=name,
                tags=list(tags or []), config=config or {}, reinit="finish_previous",
            )
            if resume_id:
                kwargs.update(id=resume_id, resume="allow")
            # mode= is passed explicitly: Lightning's WandbLogger(offline=True) would set
            # WANDB_MODE=dryrun for the whole process (and every later job of a multirun).
            self.run = wandb.init(**kwargs)
            self._wandb = wandb
        except Exception as exc:  # noqa: BLE001 - a dashboard problem must never stop training
            self._fail("init", exc)

    @property
    def active(self) -> bool:
        return self.run is not None

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    @property
    def files_dir(self) -> Path | None:
        """The folder of this W&B run (offline: ``wandb/offline-run-*``)."""
        if self.run is None:
            return None
        return Path(self.run.dir).parent

    def _fail(self, what: str, exc: BaseException) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"W&B {what} failed ({self.error}); training continues, metrics.jsonl stays complete. "
            "Set logger=none (or WANDB_MODE=disabled) to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        print(f"WARNING: W&B {what} failed ({self.error}); continuing with metrics.jsonl only")
        if self.run is not None:
            try:
                self.run.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                pass
        self.run = None

    def log(self, data: dict, step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(data, step=int(step))
        except Exception as exc:  # noqa: BLE001
            self._fail("log", exc)

    def log_checkpoint(self, record: CheckpointLine, run_dir: Path, scenes: list | None = None) -> None:
        """Scores as scalars, the panel as an image and a per-scene table (with each image); the
        validation loss (when there is a held-out split)."""
        step = int(record.step)
        if self.run is not None and record.val_loss is not None:
            self.log({"val/loss": float(record.val_loss)}, step=step)
        if self.run is not None and record.reward_held_out is not None:
            self.log({"val/reward_held_out": float(record.reward_held_out)}, step=step)
        ema = record.ema
        numbers = {f"val_ema/{'loss' if k == 'val_loss' else k}": float(getattr(ema, k)) for k in
                   ("mean", "min", "coherence", "clip_t", "story_objective", "val_loss")
                   if ema is not None and getattr(ema, k) is not None}
        if self.run is not None and numbers:
            self.log(numbers, step=step)
        if self.run is None or record.scores is None:
            return
        try:
            wandb = self._wandb
            data: dict[str, Any] = {"val/mean": record.mean, "val/min": record.min, "val/passed": int(bool(record.passed))}
            for key in ("coherence", "clip_t", "copy_paste", "story_objective"):
                if getattr(record, key) is not None:
                    data[f"val/{key}"] = getattr(record, key)
            if record.panel:
                data["val/panel"] = wandb.Image(str(run_dir / record.panel), caption=f"step {step}: mean {record.mean:.3f}")
            columns = ["step", "scene", "description", "seed", "score", "image"]
            rows = []
            images = record.images or [None] * len(record.scores)
            for i, score in enumerate(record.scores):
                scene = scenes[i] if scenes and i < len(scenes) else None
                image = images[i]
                rows.append([
                    step, i + 1, getattr(scene, "description", ""), getattr(scene, "seed", None), float(score),
                    wandb.Image(str(run_dir / image)) if image else None,
                ])
            data["val/scores"] = wandb.Table(columns=columns, data=rows)
            self.run.log(data, step=step)
            self._best = max(getattr(self, "_best", -math.inf), float(record.mean))
            self.run.summary["val/best_mean"] = self._best
        except Exception as exc:  # noqa: BLE001
            self._fail("log", exc)

    def log_character(self, record: CharacterLine, run_dir: Path) -> None:
        """A character round: a row of the ``character/rounds`` table, its cluster sheet and the
        similarities in the summary. All at step 0 (W&B steps only go up, and the rounds come before
        training's first step), so the table is logged again whole with each round."""
        if self.run is None:
            return
        try:
            wandb = self._wandb
            self._character_rows = [*getattr(self, "_character_rows", []), [
                record.round, record.choice, record.candidates, record.cluster_size, record.cluster_similarity,
                record.cluster_excess, record.candidates_similarity, bool(record.trained), record.loss, record.stopped or ""]]
            columns = ["round", "choice", "candidates", "cluster_size", "cluster_similarity", "cluster_excess",
                       "candidates_similarity", "trained", "loss", "stopped"]
            data: dict[str, Any] = {"character/rounds": wandb.Table(columns=columns, data=self._character_rows)}
            if record.sheets.get("cluster"):
                data["character/cluster"] = wandb.Image(str(Path(run_dir) / record.sheets["cluster"]),
                                                        caption=f"round {record.round}")
            self.run.log(data, step=0)
            self.run.summary.update({"character/round": record.round,
                                     "character/cluster_similarity": record.cluster_similarity,
                                     "character/cluster_excess": record.cluster_excess,
                                     "character/candidates_similarity": record.candidates_similarity})
        except Exception as exc:  # noqa: BLE001
            self._fail("log", exc)

    def finish(self, exit_code: int = 0, preempted: bool = False) -> None:
        """End the W&B run; a stopped run is marked preempted (it resumes into the same W&B run), not crashed."""
        if self.run is None:
            return
        try:
            if preempted:
                self.run.mark_preempting()
            self.run.finish(exit_code=exit_code)
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"W&B finish failed ({exc}); metrics.jsonl is complete", RuntimeWarning, stacklevel=2)
        self.run = None


def _identity(job: TrainSettings, run_dir: Path, identity: RunIdentity) -> tuple[str | None, str | None]:
    """W&B group (the sweep folder in a multirun) and name (the job's overrides)."""
    group = job.logger.group if job.logger.group is not None else identity.sweep_dir
    name = job.logger.name if job.logger.name is not None else identity.overrides
    return group, name or run_dir.name


def open_mirror(job: TrainSettings, run_dir: Path, config: dict, resuming: bool,
                  identity: RunIdentity) -> WandbMirror:
    """The run's W&B mirror; a resumed run continues its W&B run (the id is kept in the run folder)."""
    group, name = _identity(job, run_dir, identity)
    id_file = run_dir / WANDB_ID_FILE
    resume_id = json.loads(id_file.read_text())["id"] if (resuming and id_file.exists()) else None
    lg = job.logger
    mirror = WandbMirror(project=lg.project, mode=lg.mode, run_dir=run_dir, config=config, entity=lg.entity,
                         group=group, name=name, tags=list(lg.tags) + (["tiny-model"] if tiny.note(job.model) else []),
                         wandb_dir=lg.dir, resume_id=resume_id)
    if mirror.active:
        atomic_write_text(id_file, json.dumps({"id": mirror.run_id, "dir": str(mirror.files_dir)}))
    return mirror


def mirror_files(mirror: WandbMirror | None, run_dir: Path) -> Path | None:
    """The W&B run's folder (offline: ``wandb/offline-run-*``), also when the mirror failed on the way."""
    if mirror is None:
        return None
    if mirror.active:
        return mirror.files_dir
    if mirror.mode == "disabled":
        return None
    runs = sorted((run_dir / "wandb").glob("*run-*"), key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None
