"""The records the project writes and reads back, defined once: their shapes and their files.

- ``layout``: where things are in a run folder (``train.py``) and a story folder (``generate.py``).
- ``metrics``: a run's ``metrics.jsonl`` lines (train, checkpoint, status).
- ``scores``: ``scores.json`` of a story or a checkpoint.
- ``manifest``: ``manifest.json`` of a story folder or submission bundle.
Writers (training, generation, evaluation) and readers (leaderboard, W&B mirror, reproduce, model
card, submission) all use these names; the on-disk formats are the project's public interface.
"""

from kolors_story.records.base import Record, RecordError  # noqa: F401
from kolors_story.records.best import *  # noqa: F403
from kolors_story.records.layout import *  # noqa: F403 - the package's surface is its modules' names
from kolors_story.records.manifest import *  # noqa: F403
from kolors_story.records.metrics import *  # noqa: F403
from kolors_story.records.plan import *  # noqa: F403
from kolors_story.records.scores import *  # noqa: F403
