"""Train one stage: `python train.py stage=layer3 model=progan model.checkpoint=/path.pth`."""
import hydra
from omegaconf import DictConfig

import seeing.config  # noqa: F401 - registers the resolvers the YAML files use
from seeing.cli import run, task


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig):
    return task("train", cfg)


if __name__ == "__main__":
    run(main)  # a mistake in what was asked: one line, exit status 2 (SEEING_DEBUG=1: the traceback)
