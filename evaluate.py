"""Score story images as the competition does: `python evaluate.py images=<dir>`."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from kolors_story.evaluation import EvaluationError, ScorerError, evaluate_from_config

    try:
        evaluate_from_config(cfg)
    except (EvaluationError, ScorerError) as exc:  # bad input: a clear message, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
