"""Image i depends only on (seed, i) for the samplers issue 22 added, on two gloo processes as on one: one torchrun
launch samples with each of them and the main process saves what it gathered."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import MICRO_UNET, REPO_ROOT, offline_env

pytestmark = pytest.mark.slow

NEW_SAMPLERS = ("unipc", "deis", "euler", "heun")

SCRIPT = """
import sys, torch
from diffusers import DDPMScheduler, UNet2DModel
from ddpm_hf.distributed import leave_process_group, process_state
from ddpm_hf.sampling import gather_images, make_sampler

state = process_state("cpu")
torch.manual_seed(0)
unet = UNet2DModel(**{micro}, sample_size=8)
trained = DDPMScheduler(num_train_timesteps=50, variance_type="fixed_large")
images = {{name: gather_images(unet, make_sampler(trained, name, 3), 5, seed=7, batch_size=2, state=state) for name in {samplers}}}
if state.is_main_process:
    torch.save(images, sys.argv[1])
leave_process_group()
"""


def test_new_samplers_make_the_same_images_on_two_processes_as_on_one(tmp_path, one_thread):
    from diffusers import DDPMScheduler, UNet2DModel

    from ddpm_hf.sampling import gather_images, make_sampler

    script = tmp_path / "sample_all.py"
    script.write_text(SCRIPT.format(micro=MICRO_UNET, samplers=NEW_SAMPLERS))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = tmp_path / "two.pt"
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(out)],
        capture_output=True,
        text=True,
        env=offline_env(),
        timeout=600,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    two = torch.load(out, weights_only=True)

    torch.manual_seed(0)
    unet = UNet2DModel(**MICRO_UNET, sample_size=8)
    trained = DDPMScheduler(num_train_timesteps=50, variance_type="fixed_large")
    for name in NEW_SAMPLERS:  # 5 images in chunks of 2, 2, 1: process 0 makes images 0, 1, 4 and process 1 images 2, 3
        assert torch.equal(two[name], gather_images(unet, make_sampler(trained, name, 3), 5, seed=7, batch_size=2)), name
