"""Score story images as the competition does: `python evaluate.py images=<dir>`."""

import sys

import hydra
from omegaconf import DictConfig

from kolors_story.config.compose import prepare_entry_point

prepare_entry_point(sys.argv)  # schemas, trigger=水墨画 unquoted, config errors in one line


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from kolors_story.cli import evaluate_main

    code = evaluate_main(cfg)
    if code:  # bad input: the one-line message is already printed
        sys.exit(code)


if __name__ == "__main__":
    main()
