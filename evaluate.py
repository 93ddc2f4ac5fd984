"""Evaluate: `python evaluate.py metric=fsd`, `metric=reconstruction`, `metric=ablation`, ..."""
import hydra
from omegaconf import DictConfig

import seeing.config  # noqa: F401 - registers the resolvers the YAML files use
from seeing.cli import run, task


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig):
    return task("evaluate", cfg)


if __name__ == "__main__":
    run(main)  # a mistake in what was asked: one line, exit status 2 (SEEING_DEBUG=1: the traceback)
