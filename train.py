"""Pre-train a GPT on TinyStories.

python train.py model=small trainer.devices=1
python train.py -m model=tiny,small optim.lr=3e-4,1e-3      # a sweep, one job each
"""

import sys
import warnings

import hydra
from omegaconf import DictConfig

# conf/hydra/launcher/submitit_slurm.yaml is slm's own settings of the plugin's launcher of the
# same name; Hydra checks it against the plugin's schema, and says so on every run.
warnings.filterwarnings("ignore", message="'hydra/launcher/submitit_slurm' is validated against")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    from slm.train import main as train_main  # torch and Lightning: once the run dir is ours

    return train_main(cfg)


if __name__ == "__main__":
    main()
    from slm.sweep import exit_status  # a -m sweep with a failed job exits with 1

    sys.exit(exit_status())
