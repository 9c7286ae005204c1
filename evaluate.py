"""Score story images as the competition does: `python evaluate.py images=<dir>`."""

import sys

import hydra
from omegaconf import DictConfig

from kolors_story.config import register_configs
from kolors_story.config.compose import config_errors_in_one_line, quote_unicode_overrides

register_configs()  # the schemas conf/ builds on
sys.argv[1:] = quote_unicode_overrides(sys.argv[1:])  # trigger=水墨画 works unquoted too
config_errors_in_one_line()  # trainer.seed=abc: one error line and exit 2, like every user error


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from kolors_story.cli import evaluate_main

    code = evaluate_main(cfg)
    if code:  # bad input: the one-line message is already printed
        sys.exit(code)


if __name__ == "__main__":
    main()
