"""The data stage: a source of images + captions -> preflight -> data-juicer recipe -> processed dataset.

    from kolors_story.data import prepare_dataset, run_data_stage
    prepared = prepare_dataset(cfg)   # cfg = the full train config (dataset, filter, data_dir)

The latent/embedding cache built from the processed dataset lives in ``kolors_story.cache``.
"""

from kolors_story.data.prepare import prepare_dataset, run_data_stage
from kolors_story.data.processed import PreparedDataset, load_prepared
from kolors_story.data.records import DataError

__all__ = ["DataError", "PreparedDataset", "load_prepared", "prepare_dataset", "run_data_stage"]
