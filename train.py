"""Train one stage: `python train.py stage=layer3 model=progan model.checkpoint=/path.pth`."""
import hydra

import seeing.config  # noqa: F401 - registers the resolvers the YAML files use
from omegaconf import DictConfig

from seeing.pipeline import train


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig):
    return train(cfg)


if __name__ == "__main__":
    main()
