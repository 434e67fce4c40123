"""pipelines/ddpm_trajectory.py with a learned-variance model (Nichol & Dhariwal 2021, Sec. 3.1): the UNet outputs
2 x C channels, the mean part then the variance's v (Eq. 15).

DDPMScheduler with variance_type "learned_range" reads both; DDIM and DPM-Solver++ sample from the mean alone and must be
given only the first C channels. The reference for "only the first C" is the same UNet cut down to its first C output
channels (conv_out's first C filters): every other weight is shared, so the two agree to float rounding.
"""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, UNet2DModel

PIPELINE_FILE = Path(__file__).resolve().parents[1] / "pipelines" / "ddpm_trajectory.py"
BATCH, C = 2, 3

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _learned_unet(out_channels: int = 2 * C) -> UNet2DModel:
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=C,
        out_channels=out_channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()
    with torch.no_grad():  # a variance part clearly away from 0, so that reading it or not shows in the images
        unet.conv_out.bias[C:] = 0.7
    return unet


def _mean_only(unet: UNet2DModel) -> UNet2DModel:
    """The same network with only its first C output channels (the mean part)."""
    cut = UNet2DModel.from_config({**unet.config, "out_channels": C}).eval()
    state = unet.state_dict()
    state["conv_out.weight"], state["conv_out.bias"] = state["conv_out.weight"][:C], state["conv_out.bias"][:C]
    cut.load_state_dict(state)
    return cut


def _with_other_variance(unet: UNet2DModel) -> UNet2DModel:
    """The same network whose variance channels say something else (the mean channels are untouched)."""
    other = copy.deepcopy(unet)
    with torch.no_grad():
        other.conv_out.bias[C:] = -0.9
    return other


@pytest.fixture(scope="module")
def pipeline_class(tmp_path_factory):
    """The custom pipeline class, loaded as users load it (from_pretrained with custom_pipeline)."""
    path = tmp_path_factory.mktemp("learned")
    DDPMPipeline(unet=_learned_unet(), scheduler=DDPMScheduler(num_train_timesteps=100, variance_type="learned_range")).save_pretrained(path)
    loaded = DiffusionPipeline.from_pretrained(path, custom_pipeline=str(PIPELINE_FILE), trust_remote_code=True)
    assert type(loaded).__name__ == "DDPMTrajectoryPipeline" and loaded.unet.config.out_channels == 2 * C
    return type(loaded)


def _run(pipeline_class, unet, scheduler, steps=6, seed=0, **kw):
    pipe = pipeline_class(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=BATCH, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps, output_type="pt", return_trajectory=True, **kw)


def _scheduler(cls, prediction_type="epsilon", variance_type="learned_range"):
    trained = DDPMScheduler(num_train_timesteps=100, variance_type=variance_type, prediction_type=prediction_type)
    return cls.from_config(trained.config)


def test_ddpm_reads_the_learned_variance_like_stock_diffusers(pipeline_class):
    """DDPMScheduler gets all 2C channels: the images equal stock DDPMPipeline's, and the variance channels matter."""
    unet = _learned_unet()
    stock = DDPMPipeline(unet=unet, scheduler=_scheduler(DDPMScheduler))
    stock.set_progress_bar_config(disable=True)
    expected = stock(batch_size=BATCH, generator=torch.Generator().manual_seed(0), num_inference_steps=6, output_type="np").images
    out = _run(pipeline_class, unet, _scheduler(DDPMScheduler))
    np.testing.assert_array_equal(out.images.permute(0, 2, 3, 1).numpy(), expected)
    assert torch.isfinite(out.images).all()
    other = _run(pipeline_class, _with_other_variance(unet), _scheduler(DDPMScheduler))
    assert not torch.allclose(other.images, out.images, atol=1e-3), "the variance channels did not reach DDPMScheduler"


@pytest.mark.parametrize(
    "scheduler_cls, prediction_type",
    [(DDIMScheduler, "epsilon"), (DDIMScheduler, "v_prediction"), (DPMSolverMultistepScheduler, "epsilon"), (DPMSolverMultistepScheduler, "v_prediction")],
)
def test_mean_only_schedulers_get_the_first_c_channels(pipeline_class, scheduler_cls, prediction_type):
    """DDIM and DPM-Solver++ sample from the mean alone: a learned-variance model gives the same images (and predicted
    x_0) as the same network cut to its first C channels, whatever its variance channels say. diffusers' DPM-Solver
    slices the channels itself only for epsilon; DDIM never does."""
    unet = _learned_unet()
    learned = _run(pipeline_class, unet, _scheduler(scheduler_cls, prediction_type))
    mean_only = _run(pipeline_class, _mean_only(unet), _scheduler(scheduler_cls, prediction_type))
    other_variance = _run(pipeline_class, _with_other_variance(unet), _scheduler(scheduler_cls, prediction_type))
    assert learned.images.shape == (BATCH, C, 8, 8) and torch.isfinite(learned.images).all()
    torch.testing.assert_close(learned.images, mean_only.images, rtol=0, atol=1e-5)
    torch.testing.assert_close(other_variance.images, learned.images, rtol=0, atol=0)
    for got, expected in zip(learned.trajectory_pred_x0, mean_only.trajectory_pred_x0):
        assert got.shape == (BATCH, C, 8, 8)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_ddpm_set_to_a_fixed_variance_gets_the_first_c_channels(pipeline_class):
    """A DDPMScheduler switched to fixed_large samples from the mean part with sigma_t^2 = beta_t."""
    unet = _learned_unet()
    learned = _run(pipeline_class, unet, _scheduler(DDPMScheduler, variance_type="fixed_large"))
    mean_only = _run(pipeline_class, _mean_only(unet), _scheduler(DDPMScheduler, variance_type="fixed_large"))
    torch.testing.assert_close(learned.images, mean_only.images, rtol=0, atol=1e-5)


def test_predict_x0_uses_the_first_c_channels(pipeline_class):
    unet = _learned_unet()
    pipe = pipeline_class(unet=unet, scheduler=_scheduler(DDIMScheduler))
    sample = torch.randn(BATCH, C, 8, 8, generator=torch.Generator().manual_seed(1))
    output = torch.randn(BATCH, 2 * C, 8, 8, generator=torch.Generator().manual_seed(2))
    abar = pipe.scheduler.alphas_cumprod[40]
    expected = (sample - (1 - abar).sqrt() * output[:, :C]) / abar.sqrt()
    torch.testing.assert_close(pipe.predict_x0(output, 40, sample), expected)


def test_an_output_of_neither_c_nor_2c_channels_is_refused(pipeline_class):
    with pytest.raises(ValueError, match="outputs 5 channels for a 3-channel sample"):
        _run(pipeline_class, _learned_unet(out_channels=5), _scheduler(DDIMScheduler), steps=2)
