"""Train a Kolors style LoRA: `python train.py model=tiny dataset=demo` (see conf/train.yaml)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from kolors_story.training import train_from_config

    train_from_config(cfg)


if __name__ == "__main__":
    main()
