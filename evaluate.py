"""Score story images as the competition does: `python evaluate.py images=<dir>`."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from kolors_story.evaluation import evaluate_from_config

    evaluate_from_config(cfg)


if __name__ == "__main__":
    main()
