"""Evaluate: `python evaluate.py metric=fsd`, `metric=reconstruction`, `metric=ablation`, ..."""
import hydra

import seeing.config  # noqa: F401 - registers the resolvers the YAML files use
from omegaconf import DictConfig

from seeing.pipeline import evaluate


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig):
    return evaluate(cfg)


if __name__ == "__main__":
    main()
