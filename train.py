"""Train a Kolors style LoRA: `python train.py model=tiny dataset=demo` (see conf/train.yaml)."""

import sys

import hydra
from omegaconf import DictConfig

from kolors_story.config import register_configs
from kolors_story.config.compose import config_errors_in_one_line, quote_unicode_overrides

register_configs()  # the schemas conf/ builds on
sys.argv[1:] = quote_unicode_overrides(sys.argv[1:])  # trigger=水墨画 works unquoted too
config_errors_in_one_line()  # trainer.seed=abc: one error line and exit 2, like every user error


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from kolors_story.cli import train_main

    # The last checkpoint's mean aesthetic score: what the Optuna sweeper maximises.
    return train_main(cfg)


if __name__ == "__main__":
    main()
