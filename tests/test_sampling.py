"""The one sampler factory (ddpm_hf.sampling.make_sampler) and `ddpm-hf sample`."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import MICRO_UNET
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image

from ddpm_hf.cli import main
from ddpm_hf.config import config_from_dict
from ddpm_hf.distributed import item_generators
from ddpm_hf.errors import UserError
from ddpm_hf.sampling import gather_images, generate_images, make_sampler, resolve_sampler


def micro_pipeline(folder, **scheduler_options):
    torch.manual_seed(0)
    unet = UNet2DModel(**MICRO_UNET, sample_size=16)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50, **scheduler_options)).save_pretrained(folder)
    return str(folder)


def test_auto_is_ddpm_with_all_steps_and_ddim_with_fewer():
    assert resolve_sampler("auto", None, 1000) == ("ddpm", 1000)
    assert resolve_sampler("auto", 1000, 1000) == ("ddpm", 1000)
    assert resolve_sampler("auto", 50, 1000) == ("ddim", 50)
    assert resolve_sampler("dpmsolver", 20, 1000) == ("dpmsolver", 20)
    with pytest.raises(UserError, match="needs --steps"):
        resolve_sampler("dpmsolver", None, 1000)
    with pytest.raises(UserError, match="unknown sampler"):
        resolve_sampler("euler", 10, 1000)


def test_the_factory_keeps_the_trained_schedule():
    trained = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="linspace")
    for name in ("ddpm", "ddim", "dpmsolver"):
        sampler = make_sampler(trained, name, 10)
        assert sampler.name == name and sampler.nfe == 10
        assert sampler.scheduler.config.prediction_type == "v_prediction" and sampler.scheduler.config.beta_schedule == "squaredcos_cap_v2"
        torch.testing.assert_close(sampler.scheduler.alphas_cumprod, trained.alphas_cumprod)


def test_ddpm_with_trailing_spacing_and_fewer_steps_is_refused_everywhere(tmp_path):
    """diffusers' DDPMScheduler adds noise whenever t > 0, and trailing spacing ends above 0: the image keeps
    noise of std ~0.3 (shown first), so the factory refuses that combination, and so do training and the CLI."""
    trained = DDPMScheduler(num_train_timesteps=1000, timestep_spacing="trailing", variance_type="fixed_large")  # the paper's sigma_t^2 = beta_t
    stock = DDPMScheduler.from_config(trained.config)
    stock.set_timesteps(10)
    last_t = int(stock.timesteps[-1])
    assert last_t > 0
    x_0 = torch.zeros(1, 3, 8, 8)
    noise_left = stock.step(torch.zeros_like(x_0), last_t, x_0, generator=torch.Generator().manual_seed(0)).prev_sample
    assert noise_left.std() > 0.2  # what the refusal prevents

    with pytest.raises(UserError, match="trailing"):
        make_sampler(trained, "ddpm", 10)
    assert make_sampler(trained, "ddpm", 1000).nfe == 1000 and make_sampler(trained, "ddim", 10).nfe == 10  # these are fine
    small = DDPMScheduler.from_config(trained.config, variance_type="fixed_small")  # beta-tilde is 0 at the last step: fine too
    assert make_sampler(small, "ddpm", 10).nfe == 10
    with pytest.raises(UserError, match="trailing"):
        config_from_dict(dict(preset="quickstart", output_dir=str(tmp_path / "run"), timestep_spacing="trailing", sample_scheduler="ddpm", sample_steps=10))
    model = micro_pipeline(tmp_path / "model", timestep_spacing="trailing", variance_type="fixed_large")
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--model", model, "--steps", "5", "--out", str(tmp_path / "s.png"), "--device", "cpu"])
    assert exit_info.value.code == 2 and not (tmp_path / "s.png").exists()


def test_sample_with_dpmsolver_and_each_sampler_gives_images(tmp_path, one_thread):
    model = micro_pipeline(tmp_path / "model")
    grids = {}
    for name in ("ddpm", "ddim", "dpmsolver"):
        out = tmp_path / f"{name}.png"
        main(["sample", "--model", model, "--scheduler", name, "--steps", "4", "--num_images", "4", "--out", str(out), "--device", "cpu", "--save_individual"])
        grids[name] = np.asarray(Image.open(out))
        assert grids[name].shape == (32, 32, 3) and len(list((tmp_path / name).glob("*.png"))) == 4
    assert not np.array_equal(grids["ddim"], grids["dpmsolver"])  # really two samplers


def test_generate_images_is_the_stock_pipeline_with_one_generator_per_image(tmp_path, one_thread):
    """The one sampling loop gives, bit for bit in fp32, what diffusers' DDPMPipeline gives when handed one generator
    per image seeded with distributed.item_seed(seed, i): diffusers draws x_T and each step's noise per image then."""
    pipeline = DDPMPipeline.from_pretrained(micro_pipeline(tmp_path / "model"))
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(batch_size=3, generator=item_generators(5, range(3)), num_inference_steps=6, output_type="np").images
    sampler = make_sampler(pipeline.scheduler, "ddpm", 6)
    ((indices, images),) = list(generate_images(pipeline.unet, sampler, 3, seed=5, batch_size=3))
    assert indices == range(3)
    assert torch.equal(images.permute(0, 2, 3, 1), torch.from_numpy((expected * 255).round().astype(np.uint8)))


def test_image_i_depends_only_on_the_seed_and_i(tmp_path, one_thread):
    """Split as two processes would split it (chunks 0 and 1 of 2 images each), the images are those of one process."""
    pipeline = DDPMPipeline.from_pretrained(micro_pipeline(tmp_path / "model"))
    sampler = make_sampler(pipeline.scheduler, "ddpm", 4)
    one = gather_images(pipeline.unet, sampler, 4, seed=3, batch_size=2)

    class Rank:  # the part of Accelerate's state the loop reads
        def __init__(self, index):
            self.process_index, self.num_processes = index, 2

    parts = [list(generate_images(pipeline.unet, sampler, 4, seed=3, batch_size=2, state=Rank(r))) for r in (0, 1)]
    assert [indices for indices, _ in parts[0]] == [range(0, 2)] and [indices for indices, _ in parts[1]] == [range(2, 4)]
    assert torch.equal(torch.cat([parts[0][0][1], parts[1][0][1]]), one)
    other_seed = gather_images(pipeline.unet, sampler, 4, seed=4, batch_size=2)
    assert not torch.equal(other_seed, one)


def test_more_processes_than_images_is_a_one_line_error(tmp_path):
    pipeline = DDPMPipeline.from_pretrained(micro_pipeline(tmp_path / "model"))
    sampler = make_sampler(pipeline.scheduler, "ddpm", 2)

    class Rank:
        process_index, num_processes = 0, 3

    with pytest.raises(UserError, match="2 items cannot be shared by 3 processes"):
        list(generate_images(pipeline.unet, sampler, 2, state=Rank()))


def test_sample_out_that_cannot_be_created_is_a_one_line_error_before_any_work(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    result = subprocess.run(
        [sys.executable, "-m", "ddpm_hf", "sample", "--model", "user/model", "--out", str(blocker / "sub" / "grid.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: argument --out") and "cannot be created" in lines[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_every_sampler_runs_a_learned_variance_model(prediction_type, one_thread):
    """DDPM reads the 2C channels itself; DDIM and DPM-Solver get the mean part (diffusers' DPM-Solver would cut
    only epsilon outputs, and to 3 channels)."""
    torch.manual_seed(0)
    unet = UNet2DModel(**{**MICRO_UNET, "out_channels": 6}, sample_size=8)
    trained = DDPMScheduler(num_train_timesteps=50, variance_type="learned_range", prediction_type=prediction_type)
    for name in ("ddpm", "ddim", "dpmsolver"):
        ((_, images),) = list(generate_images(unet, make_sampler(trained, name, 3), 2, seed=1, batch_size=2))
        assert images.shape == (2, 3, 8, 8) and images.dtype == torch.uint8, name
