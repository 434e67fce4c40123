"""Train a DDPM on CIFAR-10 (or any image dataset) and save it as a diffusers DDPMPipeline.

    accelerate launch train_ddpm.py --preset quickstart      # minutes on a CPU, offline
    accelerate launch train_ddpm.py                          # the DDPM paper's CIFAR-10 run
    accelerate launch train_ddpm.py --help                   # every option

The work happens in ddpm_hf/: config.py (options), data.py, models.py, losses.py, training.py.
"""

import sys

from ddpm_hf.config import parse_training_config
from ddpm_hf.distributed import collective_failure
from ddpm_hf.errors import UserError, exit_with
from ddpm_hf.training import train


def main() -> None:
    try:
        train(parse_training_config())
    except UserError as error:
        exit_with(error)
    except RuntimeError as error:  # another process died or hangs: say so in one line, exit non-zero
        message = collective_failure(error)
        if message is None:
            raise
        print(message, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
