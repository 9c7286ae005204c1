"""Train a Kolors style LoRA: `python train.py model=tiny dataset=demo` (see conf/train.yaml)."""

import sys

import hydra
from omegaconf import DictConfig

from kolors_story.config.compose import prepare_entry_point

prepare_entry_point(sys.argv)  # schemas, trigger=水墨画 unquoted, config errors in one line


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from kolors_story.cli import train_main

    # The last checkpoint's mean aesthetic score: what the Optuna sweeper maximises.
    return train_main(cfg)


if __name__ == "__main__":
    main()
