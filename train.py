"""Pre-train a GPT on TinyStories.

python train.py model=small trainer.devices=1
python train.py -m model=tiny,small optim.lr=3e-4,1e-3      # a sweep, one job each
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from slm.config import ConfigError
from slm.prepare import DataError
from slm.train import train

log = logging.getLogger("slm")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg)
    except (ConfigError, DataError, FloatingPointError) as e:
        log.error("error: %s", e)  # one line, on the console and in the run's log
        sys.exit(1)


if __name__ == "__main__":
    main()
