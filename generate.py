"""Render a story (or reproduce one): `python generate.py model=tiny`, `... reproduce=<bundle>`."""

import sys

import hydra
from omegaconf import DictConfig

from kolors_story.config.compose import prepare_entry_point

prepare_entry_point(sys.argv)  # schemas, trigger=水墨画 unquoted, config errors in one line


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    from kolors_story.cli import generate_main

    code = generate_main(cfg)
    if code:  # only on failure: a SystemExit(0) would end a -m sweep after its first job
        sys.exit(code)


if __name__ == "__main__":
    main()
