"""Tests for the Hub-uploadable custom pipeline in pipelines/ddpm_trajectory.py.

The pipeline is loaded the way users load it, through
`DiffusionPipeline.from_pretrained(..., custom_pipeline=..., trust_remote_code=True)`, with a tiny random UNet.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    UNet2DModel,
)

PIPELINE_FILE = Path(__file__).resolve().parents[1] / "pipelines" / "ddpm_trajectory.py"
BATCH = 2
SHAPE = (BATCH, 3, 16, 16)


def _tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory) -> Path:
    """A stock DDPMPipeline saved to disk, as `ddpm-hf` training writes it."""
    path = tmp_path_factory.mktemp("ddpm_pipe")
    DDPMPipeline(unet=_tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(saved_dir):
    pipe = DiffusionPipeline.from_pretrained(saved_dir, custom_pipeline=str(PIPELINE_FILE), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(loaded):
    """A fresh pipeline of the dynamically loaded class, sharing the UNet, with a fresh DDPM scheduler."""
    new = type(loaded)(unet=loaded.unet, scheduler=DDPMScheduler.from_config(loaded.scheduler.config))
    new.set_progress_bar_config(disable=True)
    return new


def _gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


# ---------------------------------------------------------------- loading


def test_loads_custom_class_from_local_file(loaded):
    assert type(loaded).__name__ == "DDPMTrajectoryPipeline"
    assert type(loaded).__module__.startswith("diffusers_modules.")  # loaded as dynamic module, not imported
    assert isinstance(loaded.unet, UNet2DModel)
    assert isinstance(loaded.scheduler, DDPMScheduler)
    assert set(loaded.components) == {"unet", "scheduler"}


def test_local_custom_code_needs_trust_remote_code(saved_dir):
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(saved_dir, custom_pipeline=str(PIPELINE_FILE))


def test_file_shipped_inside_repo_folder_loads_by_name(saved_dir, tmp_path):
    """The layout for a Hub repo: the .py at the repo root, selected by file stem or by model_index.json."""
    repo = tmp_path / "repo"
    shutil.copytree(saved_dir, repo)
    shutil.copy(PIPELINE_FILE, repo / "ddpm_trajectory.py")

    by_name = DiffusionPipeline.from_pretrained(repo, custom_pipeline="ddpm_trajectory", trust_remote_code=True)
    assert type(by_name).__name__ == "DDPMTrajectoryPipeline"

    index = json.loads((repo / "model_index.json").read_text())
    index["_class_name"] = ["ddpm_trajectory", "DDPMTrajectoryPipeline"]
    (repo / "model_index.json").write_text(json.dumps(index))
    by_index = DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)
    assert type(by_index).__name__ == "DDPMTrajectoryPipeline"


# ---------------------------------------------------------------- sampling


def test_matches_stock_ddpm_pipeline(saved_dir, pipe):
    stock = DDPMPipeline.from_pretrained(saved_dir)
    stock.set_progress_bar_config(disable=True)
    expected = stock(batch_size=BATCH, generator=_gen(3), num_inference_steps=8, output_type="np").images
    got = pipe(batch_size=BATCH, generator=_gen(3), num_inference_steps=8, output_type="np").images
    assert got.shape == (BATCH, 16, 16, 3)
    np.testing.assert_array_equal(got, expected)
    # and a different seed really changes the result (the comparison above is not vacuous)
    other = pipe(batch_size=BATCH, generator=_gen(4), num_inference_steps=8, output_type="np").images
    assert not np.allclose(other, expected)


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DPMSolverMultistepScheduler])
def test_other_schedulers_from_config(pipe, scheduler_cls):
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    if scheduler_cls is DPMSolverMultistepScheduler:
        assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    calls = []
    out = pipe(
        batch_size=BATCH,
        generator=_gen(0),
        num_inference_steps=4,
        output_type="np",
        return_trajectory=True,
        callback_on_step_end=lambda p, i, t, kw: calls.append(i),
    )
    assert isinstance(pipe.scheduler, scheduler_cls)
    assert out.images.shape == (BATCH, 16, 16, 3)
    assert np.isfinite(out.images).all()
    assert out.images.min() >= 0.0 and out.images.max() <= 1.0
    assert calls == [0, 1, 2, 3]
    assert len(out.trajectory_pred_x0) == 4
    assert all(torch.isfinite(x).all() for x in out.trajectory_pred_x0)


def test_caller_latents_are_used(pipe):
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    latents = torch.randn(SHAPE, generator=_gen(11))
    a = pipe(batch_size=BATCH, generator=_gen(1), latents=latents, num_inference_steps=3, eta=0.0, output_type="pt")
    b = pipe(batch_size=BATCH, generator=_gen(2), latents=latents, num_inference_steps=3, eta=0.0, output_type="pt")
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
    c = pipe(batch_size=BATCH, latents=latents + 1.0, num_inference_steps=3, output_type="pt")
    assert not torch.allclose(a.images, c.images)
    # with eta > 0 DDIM adds generator noise, so different generators now differ
    d = pipe(batch_size=BATCH, generator=_gen(1), latents=latents, num_inference_steps=3, eta=1.0, output_type="pt")
    e = pipe(batch_size=BATCH, generator=_gen(2), latents=latents, num_inference_steps=3, eta=1.0, output_type="pt")
    assert not torch.allclose(d.images, e.images)


def test_latents_equal_generator_noise_reproduces_generator_run(pipe):
    """Passing the noise the generator would have drawn gives the same images (DDPM, same step generator)."""
    from_gen = pipe(batch_size=BATCH, generator=_gen(5), num_inference_steps=3, output_type="pt").images
    g = _gen(5)
    latents = torch.randn(SHAPE, generator=g)  # consumes the generator like the pipeline does
    from_latents = pipe(batch_size=BATCH, generator=g, latents=latents, num_inference_steps=3, output_type="pt")
    torch.testing.assert_close(from_latents.images, from_gen, rtol=0, atol=0)


def test_bad_latents_shape_raises(pipe):
    with pytest.raises(ValueError, match=r"\(2, 3, 16, 16\)"):
        pipe(batch_size=BATCH, latents=torch.randn(1, 3, 16, 16), num_inference_steps=2)
    with pytest.raises(ValueError, match=r"\(1, 3, 16, 16\)"):
        pipe(latents=torch.randn(1, 3, 8, 8), num_inference_steps=2)


def test_output_types(pipe):
    kw = dict(batch_size=BATCH, num_inference_steps=2)
    pil = pipe(generator=_gen(0), output_type="pil", **kw).images
    arr = pipe(generator=_gen(0), output_type="np", **kw).images
    pt = pipe(generator=_gen(0), output_type="pt", **kw).images

    assert isinstance(pil, list) and len(pil) == BATCH
    assert all(isinstance(im, PIL.Image.Image) and im.size == (16, 16) and im.mode == "RGB" for im in pil)
    assert isinstance(arr, np.ndarray) and arr.shape == (BATCH, 16, 16, 3) and arr.dtype == np.float32
    assert isinstance(pt, torch.Tensor) and pt.shape == SHAPE
    assert 0.0 <= arr.min() and arr.max() <= 1.0
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), arr)
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in pil]), (arr * 255).round().astype(np.uint8))

    tup = pipe(generator=_gen(0), output_type="np", return_dict=False, **kw)
    assert isinstance(tup, tuple) and len(tup) == 1
    np.testing.assert_array_equal(tup[0], arr)

    with pytest.raises(ValueError, match="output_type"):
        pipe(output_type="latent", **kw)


def test_callback_and_trajectory(pipe):
    steps = 5
    seen = []

    def callback(pipeline, step_index, timestep, tensors):
        assert pipeline is pipe
        assert set(tensors) == {"x_t", "pred_x0"}
        seen.append((step_index, int(timestep), tensors["x_t"].clone(), tensors["pred_x0"].clone()))

    out = pipe(
        batch_size=BATCH,
        generator=_gen(7),
        num_inference_steps=steps,
        output_type="pt",
        callback_on_step_end=callback,
        return_trajectory=True,
    )
    assert [s[0] for s in seen] == list(range(steps))
    assert [s[1] for s in seen] == pipe.scheduler.timesteps.tolist()
    assert len(out.trajectory_x_t) == len(out.trajectory_pred_x0) == steps
    for (_, _, x_t, x0), traj_x_t, traj_x0 in zip(seen, out.trajectory_x_t, out.trajectory_pred_x0):
        assert traj_x_t.shape == traj_x0.shape == SHAPE
        assert traj_x_t.device.type == "cpu"
        torch.testing.assert_close(traj_x_t, x_t, rtol=0, atol=0)
        torch.testing.assert_close(traj_x0, x0, rtol=0, atol=0)
    # the trajectory actually moves
    assert not torch.allclose(out.trajectory_x_t[0], out.trajectory_x_t[-1])
    # final image is the last x_t mapped to [0, 1]
    torch.testing.assert_close(out.images, (out.trajectory_x_t[-1] / 2 + 0.5).clamp(0, 1))

    tup = pipe(batch_size=BATCH, generator=_gen(7), num_inference_steps=steps, return_dict=False, return_trajectory=True)
    assert len(tup) == 3 and len(tup[1]) == len(tup[2]) == steps
    # without return_trajectory the output carries no trajectories
    plain = pipe(batch_size=BATCH, generator=_gen(7), num_inference_steps=steps, output_type="pt")
    assert plain.trajectory_x_t is None and plain.trajectory_pred_x0 is None


def test_callback_can_replace_sample(pipe):
    def zero_last(pipeline, i, t, tensors):
        if i == 2:
            return {"x_t": torch.zeros_like(tensors["x_t"])}
        return None

    out = pipe(batch_size=BATCH, generator=_gen(0), num_inference_steps=3, output_type="pt", callback_on_step_end=zero_last)
    torch.testing.assert_close(out.images, torch.full(SHAPE, 0.5))


def test_last_pred_x0_is_final_image_for_ddim(pipe):
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    out = pipe(batch_size=BATCH, generator=_gen(9), num_inference_steps=4, output_type="pt", return_trajectory=True)
    final_sample = out.trajectory_x_t[-1]
    torch.testing.assert_close(out.trajectory_pred_x0[-1], final_sample, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.images, (out.trajectory_pred_x0[-1] / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=1e-5)
    # earlier predictions differ from the final one (the check above is not trivially true)
    assert not torch.allclose(out.trajectory_pred_x0[0], final_sample, atol=1e-3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predict_x0_matches_scheduler(loaded, prediction_type):
    """The fallback x0 formula (used when step() gives no pred_original_sample) agrees with DDPMScheduler's."""
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)
    sched.set_timesteps(1000)
    pipe = type(loaded)(unet=loaded.unet, scheduler=sched)
    g = _gen(0)
    sample, model_output = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    for t in (999, 500, 10):
        expected = sched.step(model_output, t, sample, generator=_gen(1)).pred_original_sample
        torch.testing.assert_close(pipe.predict_x0(model_output, torch.tensor(t), sample), expected)

    # and it inverts the forward process: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
    if prediction_type == "epsilon":
        x0, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        t = torch.tensor([300])
        x_t = sched.add_noise(x0, eps, t)
        torch.testing.assert_close(pipe.predict_x0(eps, t[0], x_t), x0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["ddim", "dpmsolver", "unipc", "deis", "euler", "heun"])
def test_the_pipeline_makes_the_engines_images_with_every_sampler(loaded, name):
    """Given make_sampler's scheduler and one generator per image, the single-file pipeline makes the images of
    `ddpm-hf sample` (ddpm_hf.sampling.generate_images) for every sampler, and its trajectory has one x0_hat per network
    evaluation (Heun's 2K - 1)."""
    from ddpm_hf.distributed import item_generators
    from ddpm_hf.sampling import gather_images, make_sampler

    sampler = make_sampler(loaded.scheduler, name, 4, **({} if name in ("euler", "heun") else {"timestep_spacing": "trailing"}))
    ours = gather_images(loaded.unet, sampler, BATCH, seed=5, batch_size=BATCH)
    pipe = type(loaded)(unet=loaded.unet, scheduler=type(sampler.scheduler).from_config(sampler.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=BATCH, generator=item_generators(5, range(BATCH)), num_inference_steps=4, output_type="pt", return_trajectory=True)
    theirs = (out.images.clamp(0, 1) * 255).round().to(torch.uint8)
    assert (ours.int() - theirs.int()).abs().max() <= 1, name
    assert len(out.trajectory_pred_x0) == sampler.nfe
