"""`python -m ddpm_hf ARGS` is `ddpm-hf ARGS`, e.g. under `accelerate launch -m ddpm_hf evaluate ...`."""

import sys

from .cli import main

sys.exit(main())
