"""Train a DDPM on CIFAR-10 (or any image dataset) and save it as a diffusers DDPMPipeline.

    accelerate launch train_ddpm.py --preset quickstart      # minutes on a CPU, offline
    accelerate launch train_ddpm.py                          # the DDPM paper's CIFAR-10 run
    accelerate launch train_ddpm.py --help                   # every option

The work happens in ddpm_hf/: config.py (options), data.py, models.py, losses.py, training.py.
"""

from ddpm_hf.config import parse_training_config
from ddpm_hf.errors import UserError, exit_with
from ddpm_hf.training import train


def main() -> None:
    try:
        train(parse_training_config())
    except UserError as error:
        exit_with(error)


if __name__ == "__main__":
    main()
