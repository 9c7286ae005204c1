"""The data stage: a source of images + captions -> preflight -> data-juicer recipe -> processed
dataset -> latent/embedding cache.

    sources, demo      where images + captions come from (a folder, ModelScope, the drawn demo set)
    preflight          every image fully decoded and converted to RGB; bad files listed with reasons
    filtering          the data-juicer recipe, run as a hardened dj-process subprocess
    processed          train/<n>.jpg + metadata.csv (the DiffSynth layout) and report.json
    prepare            the stage end to end (reuses an unchanged result)
    crop, cache_files, cache   pixels + micro-conditioning, the cache's files, building the cache

    from kolors_story.data import prepare_dataset
    prepared = prepare_dataset(settings.dataset, settings.filter, settings.data_dir)
"""

from kolors_story.data.candidates import DataError
from kolors_story.data.prepare import prepare_dataset, run_data_stage
from kolors_story.data.processed import PreparedDataset, load_prepared

__all__ = ["DataError", "PreparedDataset", "load_prepared", "prepare_dataset", "run_data_stage"]
