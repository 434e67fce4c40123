"""The one sampler factory (ddpm_hf.sampling.make_sampler) and `ddpm-hf sample`."""

from __future__ import annotations

import random
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
from ddpm_hf.sampling import (
    FRACTIONAL_KARRAS_TIMESTEPS,
    SAMPLER_CHOICES,
    SAMPLERS,
    accepted_steps,
    gather_images,
    generate_images,
    make_sampler,
    resolve_sampler,
)


def micro_pipeline(folder, **scheduler_options):
    torch.manual_seed(0)
    unet = UNet2DModel(**MICRO_UNET, sample_size=16)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50, **scheduler_options)).save_pretrained(folder)
    return str(folder)


def test_auto_is_ddpm_with_all_steps_and_unipc_with_fewer():
    """sampling.AUTO_RULE, from the published CIFAR-10 frontier (docs/evaluation.md, "The frontier")."""
    assert resolve_sampler("auto", None, 1000) == ("ddpm", 1000)
    assert resolve_sampler("auto", 1000, 1000) == ("ddpm", 1000)
    assert resolve_sampler("auto", 999, 1000) == ("unipc", 999)
    assert resolve_sampler("auto", 50, 1000) == ("unipc", 50)
    auto = make_sampler(DDPMScheduler(num_train_timesteps=1000), "auto", 10)
    assert (auto.name, auto.steps, auto.nfe, type(auto.scheduler).__name__) == ("unipc", 10, 10, "UniPCMultistepScheduler")
    assert resolve_sampler("dpmsolver", 20, 1000) == ("dpmsolver", 20)
    with pytest.raises(UserError, match="needs --steps"):
        resolve_sampler("dpmsolver", None, 1000)
    with pytest.raises(UserError, match="unknown sampler"):
        resolve_sampler("nonsense", 10, 1000)


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_auto_with_fewer_steps_starts_at_the_last_timestep_on_any_schedule(beta_schedule):
    """'auto' below T takes 'trailing' timesteps, which start at t = T - 1 for any K: the model's 'leading' ones start
    lower for the multistep solvers (T // (K + 1) apart), which make_sampler refuses on the cosine schedule. A cosine
    run's default grids (--sample_scheduler auto) and `ddpm-hf sample --scheduler auto` must sample, from noise."""
    trained = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, timestep_spacing="leading")
    for steps in (5, 10, 20, 50, 100, 999):
        auto = make_sampler(trained, "auto", steps)
        assert (auto.name, auto.timestep_spacing, int(auto.scheduler.timesteps[0])) == ("unipc", "trailing", 999)
    assert make_sampler(trained, "auto", 10, timestep_spacing="linspace").timestep_spacing == "linspace"  # a given spacing wins
    assert make_sampler(trained, "auto", None).timestep_spacing == "leading"  # ddpm with all T steps: the model's own


def test_the_factory_keeps_the_trained_schedule():
    """Every sampler gets the trained betas, T, prediction type and clipping, also where the trained scheduler took
    them by default: from_config would otherwise give the new class its own defaults (Heun's betas are not DDPM's)."""
    trained = DDPMScheduler(num_train_timesteps=100, beta_schedule="linear", prediction_type="v_prediction", timestep_spacing="trailing")
    assert "beta_start" in trained.config["_use_default_values"]
    for name in SAMPLERS:
        sampler = make_sampler(trained, name, 10)
        assert sampler.name == name and sampler.steps == 10 and sampler.nfe == (19 if name == "heun" else 10)
        assert sampler.scheduler.config.prediction_type == "v_prediction" and sampler.scheduler.config.beta_schedule == "linear"
        torch.testing.assert_close(sampler.scheduler.alphas_cumprod, trained.alphas_cumprod, msg=name)


@pytest.mark.parametrize("name", SAMPLERS)
def test_nfe_is_the_number_of_network_calls(name):
    """Sampler.nfe is what the network is asked per image: Heun twice per step but the last (2K - 1), the others K;
    guidance doubles the batch of a call, not the count."""
    calls = []
    unet = UNet2DModel(**MICRO_UNET, sample_size=8, num_class_embeds=3)
    unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    sampler = make_sampler(DDPMScheduler(num_train_timesteps=50), name, 5, **({} if name in ("euler", "heun") else {"timestep_spacing": "trailing"}))
    gather_images(unet, sampler, 2, seed=0, batch_size=2, class_labels=[0, 1], guidance_scale=2.0)
    assert calls == [4] * sampler.nfe and sampler.nfe == (9 if name == "heun" else 5)
    assert ("9 network evaluations" in sampler.describe()) == (name == "heun")


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


def test_sample_runs_every_sampler(tmp_path, one_thread):
    model = micro_pipeline(tmp_path / "model")
    grids = {}
    for name in SAMPLERS:
        out = tmp_path / f"{name}.png"
        spacing = [] if name in ("euler", "heun") else ["--timestep_spacing", "trailing"] if name != "ddpm" else ["--timestep_spacing", "linspace"]
        main(
            [
                "sample",
                "--model",
                model,
                "--scheduler",
                name,
                "--steps",
                "5",
                "--num_images",
                "4",
                "--out",
                str(out),
                "--device",
                "cpu",
                "--save_individual",
                *spacing,
            ]
        )
        grids[name] = np.asarray(Image.open(out))
        assert grids[name].shape == (32, 32, 3) and len(list((tmp_path / name).glob("*.png"))) == 4
    assert len({grid.tobytes() for grid in grids.values()}) == len(SAMPLERS)  # really different samplers


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--scheduler", "dpmsolver", "--steps", "5", "--solver_order", "4"], "--solver_order 4: dpmsolver takes --solver_order 1 to 3"),
        (["--scheduler", "heun", "--steps", "5", "--solver_order", "2"], "--solver_order 2: heun has no --solver_order"),
        (["--scheduler", "ddim", "--steps", "5", "--karras_sigmas", "yes"], "--karras_sigmas: ddim has no Karras sigmas"),
        (["--scheduler", "ddpm", "--karras_sigmas", "yes"], "--karras_sigmas: ddpm has no Karras sigmas"),
        (["--scheduler", "euler", "--steps", "5", "--timestep_spacing", "leading"], "--timestep_spacing leading with Karras sigmas"),
        (["--scheduler", "ddim", "--steps", "7", "--timestep_spacing", "linspace"], "t - T // K"),
        (["--scheduler", "unipc", "--steps", "50", "--timestep_spacing", "leading"], "only 1 of them differ"),
        (["--scheduler", "deis", "--steps", "2", "--timestep_spacing", "leading"], "starts at t = 32 of T = 50"),
    ],
)
def test_sampler_options_that_make_no_sense_are_one_line_errors(tmp_path, capsys, arguments, message):
    model = micro_pipeline(tmp_path / "model", beta_schedule="squaredcos_cap_v2")
    out = tmp_path / "grid.png"
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--model", model, "--out", str(out), "--device", "cpu", *arguments])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not out.exists()


def step_counts_to_compare(T: int, karras: bool) -> list[int]:
    """The K at which a test asks make_sampler itself, which builds a diffusers scheduler each time (~2 ms; heun's
    sets T Karras sigmas one at a time, ~45 ms): all of them for a small T, else the ends, around 'leading''s hole
    at T = 1000 (501..664 on the linear schedule) and random ones (fixed seed); fewer for Karras euler and heun."""
    if T <= 50:
        return list(range(1, T + 1))
    if karras:
        return sorted({*range(1, 6), T - 1, T, *random.Random(0).sample(range(1, T + 1), 8)})
    return sorted({*range(1, 31), *range(T - 5, T + 1), *range(495, 506), *range(659, 670), *random.Random(0).sample(range(1, T + 1), 30)})


@pytest.mark.parametrize(
    "schedule, names",
    [
        (dict(num_train_timesteps=1000), SAMPLER_CHOICES),
        (dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"), SAMPLER_CHOICES),
        (dict(num_train_timesteps=50, beta_end=0.7), SAMPLER_CHOICES),  # steep: short 'leading' ddpm / ddim chains start too low
        # ddim: only the K that divide T (the Karras samplers have a spacing of their own)
        (dict(num_train_timesteps=1000, timestep_spacing="trailing"), ("ddpm", "ddim", "dpmsolver")),
    ],
    ids=["linear", "cosine", "steep", "trailing"],
)
def test_accepted_steps_are_the_step_counts_make_sampler_takes(schedule, names):
    """accepted_steps scans every K with one scheduler per sampler; make_sampler, asked at many of them, agrees."""
    trained = DDPMScheduler(**schedule)
    T = trained.config.num_train_timesteps
    for name in names:
        accepted = {steps for first, last in accepted_steps(trained, name) for steps in range(first, last + 1)}
        for steps in step_counts_to_compare(T, karras=name in FRACTIONAL_KARRAS_TIMESTEPS):
            try:
                make_sampler(trained, name, steps)
                taken = True
            except UserError:
                taken = False
            assert taken == (steps in accepted), (name, steps)
    ddim = accepted_steps(trained, "ddim")
    if schedule == dict(num_train_timesteps=1000):  # not one interval: K = 600 strides by 1 and starts at t = 599
        assert len(ddim) == 2 and ddim[0][1] < 600 < ddim[1][0] and ddim[1][1] == T
    if "beta_schedule" in schedule:  # cosine: many holes, from the first steps to near T
        assert len(ddim) > 10 and ddim[-1][1] == T
    if schedule.get("timestep_spacing") == "trailing":
        assert {steps for first, last in ddim for steps in range(first, last + 1)} == {steps for steps in range(1, T + 1) if T % steps == 0}


def test_accepted_steps_of_a_sampler_refused_whatever_the_steps_are_none():
    trained = DDPMScheduler(num_train_timesteps=100)
    assert accepted_steps(trained, "ddim", solver_order=2) == [] and accepted_steps(trained, "unipc", solver_order=3) == [(1, 99)]
    assert accepted_steps(trained, "auto", solver_order=3) == [(1, 99)]  # ddpm, chosen at K = T, has no solver order


def test_solver_order_and_karras_sigmas_reach_the_scheduler():
    trained = DDPMScheduler(num_train_timesteps=1000)
    third = make_sampler(trained, "unipc", 20, solver_order=3, karras_sigmas=True)
    assert (
        third.scheduler.config.solver_order == 3 and third.scheduler.config.use_karras_sigmas and third.describe() == "unipc 20 steps (order 3, Karras sigmas)"
    )
    plain = make_sampler(trained, "euler", 20, karras_sigmas=False, timestep_spacing="trailing")
    assert not plain.scheduler.config.use_karras_sigmas and plain.scheduler.timesteps[0] == 999 and plain.describe() == "euler 20 steps"
    assert make_sampler(trained, "heun", 10).scheduler.timesteps[0] == 999  # Karras sigmas from sigma(T - 1)


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
    """DDPM reads the 2C channels itself; every other sampler gets the mean part (diffusers' DPM-Solver would cut
    only epsilon outputs, and to 3 channels)."""
    torch.manual_seed(0)
    unet = UNet2DModel(**{**MICRO_UNET, "out_channels": 6}, sample_size=8)
    trained = DDPMScheduler(num_train_timesteps=50, variance_type="learned_range", prediction_type=prediction_type)
    for name in SAMPLERS:
        ((_, images),) = list(generate_images(unet, make_sampler(trained, name, 3), 2, seed=1, batch_size=2))
        assert images.shape == (2, 3, 8, 8) and images.dtype == torch.uint8, name


def test_load_pipeline_hands_only_samplers_the_stock_pipelines_can_run(tmp_path):
    """DDPMPipeline never scales the model input (Euler, Heun) and passes `generator` to every step (UniPC and DEIS take
    none): those samplers are a one-line error there, with the way to run them."""
    from ddpm_hf.sampling import load_pipeline

    model = micro_pipeline(tmp_path / "model")
    assert type(load_pipeline(model, "dpmsolver", device="cpu", steps=5)).__name__ == "DDPMPipeline"
    for name in ("unipc", "deis", "euler", "heun"):
        with pytest.raises(UserError, match=f"cannot run {name}.*ddpm-hf sample --scheduler {name}"):
            load_pipeline(model, name, device="cpu", steps=5)
