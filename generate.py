"""Render the selected story's 8 scenes: `python generate.py model=tiny`."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    from kolors_story.generation import generate_story_from_config

    generate_story_from_config(cfg)


if __name__ == "__main__":
    main()
