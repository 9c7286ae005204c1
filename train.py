"""Train a Kolors style LoRA: `python train.py model=tiny dataset=demo` (see conf/train.yaml)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from kolors_story.jobs import run_job
    from kolors_story.training import train_from_config

    # The last checkpoint's mean aesthetic score: what the Optuna sweeper maximises.
    return run_job(train_from_config, cfg)


if __name__ == "__main__":
    main()
