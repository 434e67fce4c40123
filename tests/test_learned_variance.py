"""Learned variances (Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", arXiv:2102.09672):
the training options, the saved pipeline, the model card, and evidence that the variance learns.

With --variance_type learned_range the UNet outputs 2 x C channels, the mean part then v, and
Sigma_theta = exp(frac log beta_t + (1 - frac) log beta-tilde_t), frac = (v + 1) / 2 (Eq. 15); the loss is
L_hybrid = L_simple + lambda L_vlb (Eq. 16). The math of the loss and of the bound: tests/test_improved_ddpm_math.py;
the trajectory pipeline: tests/test_learned_variance_pipeline.py.
"""

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import MICRO_UNET, REPO_ROOT, quick_options

from ddpm_hf.config import PRESETS, config_from_dict, parse_training_config, resolved_loss
from ddpm_hf.errors import UserError
from ddpm_hf.models import build_unet, count_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def learned_unet_config(tmp_path):
    """--model_config of MICRO_UNET with its output channels doubled: eps, then v."""
    path = tmp_path / "micro_unet_learned.json"
    path.write_text(json.dumps(dict(MICRO_UNET, out_channels=6)))
    return str(path)


def _refusal(argv: list[str]) -> str:
    with pytest.raises(UserError) as error:
        parse_training_config(argv)
    message = str(error.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Options: what is accepted, what is refused
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--variance_type", "learned"], "Use --variance_type learned_range"),
        (["--variance_type", "learned_range", "--loss", "simple"], "--loss simple with --variance_type learned_range"),
        (["--loss", "hybrid"], "--loss hybrid trains a learned variance, but --variance_type is fixed_large"),
        (["--variance_type", "fixed_small", "--loss", "vlb"], "--loss vlb trains a learned variance, but --variance_type is fixed_small"),
        (["--variance_type", "learned_range", "--vlb_weight", "0"], "--vlb_weight 0 with --variance_type learned_range"),
        (["--preset", "iddpm-cifar10", "--vlb_weight", "0"], "--vlb_weight 0 with --variance_type learned_range"),
        (["--vlb_weight", "-0.001"], "--vlb_weight must be >= 0"),
    ],
)
def test_configurations_that_make_no_sense_are_one_line_errors(flags, expected, tmp_path):
    assert expected in _refusal([*flags, "--output_dir", str(tmp_path / "run")])


@pytest.mark.parametrize("variance_type, out_channels", [("learned_range", 3), ("fixed_large", 6), ("fixed_small", 6)])
def test_a_model_config_whose_output_channels_disagree_with_the_variance_is_refused(variance_type, out_channels, tmp_path):
    path = tmp_path / "unet.json"
    path.write_text(json.dumps(dict(MICRO_UNET, out_channels=out_channels)))
    message = _refusal(["--model_config", str(path), "--variance_type", variance_type, "--output_dir", str(tmp_path / "run")])
    assert f"has out_channels {out_channels}, but --variance_type {variance_type} needs {9 - out_channels}" in message


def test_the_cli_refuses_variance_type_learned_with_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "train_ddpm.py"), "--variance_type", "learned", "--output_dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--variance_type learned_range" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_learned_range_takes_every_prediction_type(prediction_type, tmp_path, learned_unet_config):
    """HybridLoss and the bound read x_0 from eps, v or x_0 alike (tests/test_improved_ddpm_math.py)."""
    config = config_from_dict(dict(output_dir=str(tmp_path), variance_type="learned_range", prediction_type=prediction_type, model_config=learned_unet_config))
    assert resolved_loss(config) == "hybrid"


def test_the_loss_follows_the_variance(tmp_path):
    """'auto' is L_simple for fixed variances (the runs of before, unchanged) and L_hybrid for learned ones; --loss vlb
    does not use --vlb_weight, so 0 is fine there."""
    from ddpm_hf.losses import DDPMLoss, HybridLoss, VLBLoss
    from ddpm_hf.models import build_scheduler
    from ddpm_hf.training import SummedLossTerms, build_loss

    def loss_of(**options):
        config = config_from_dict(dict(output_dir=str(tmp_path), model="tiny", resolution=8, **options))
        unet = build_unet(config.model, config.resolution, variance_type=config.variance_type)
        return build_loss(config, build_scheduler(config), unet, torch.device("cpu"))

    fixed = loss_of(variance_type="fixed_small", prediction_type="v_prediction")
    assert type(fixed) is DDPMLoss and fixed.prediction_type == "v_prediction"
    hybrid = loss_of(variance_type="learned_range", vlb_weight=0.01)
    assert isinstance(hybrid, SummedLossTerms) and type(hybrid.loss) is HybridLoss and hybrid.loss.vlb_weight == 0.01
    vlb = loss_of(variance_type="learned_range", loss="vlb", vlb_weight=0)
    assert isinstance(vlb, SummedLossTerms) and type(vlb.loss) is VLBLoss


@pytest.mark.parametrize("model", ["tiny", "ddpm-cifar10", "iddpm-cifar10"])
def test_learned_range_doubles_the_output_channels_of_every_architecture(model):
    from ddpm_hf.models import unet_arguments

    assert unet_arguments(model, 32, variance_type="learned_range")["out_channels"] == 6
    assert unet_arguments(model, 32, variance_type="fixed_large")["out_channels"] == 3


def test_a_new_learned_variance_unet_starts_with_v_at_0(micro_unet_config):
    """v = 0 for every pixel at the start: Sigma_theta at the middle of its range (Eq. 15), as improved-diffusion's
    zero-initialised output layer starts; the mean channels keep diffusers' initialisation."""
    unet = build_unet("tiny", 16, variance_type="learned_range")
    output = unet(torch.randn(2, 3, 16, 16), torch.tensor([10, 900])).sample
    assert output.shape == (2, 6, 16, 16) and torch.all(output[:, 3:] == 0) and output[:, :3].std() > 0
    assert torch.all(build_unet("tiny", 16, variance_type="fixed_large").conv_out.weight != 0)


@pytest.mark.parametrize("saved, wanted", [("fixed_large", "learned_range"), ("learned_range", "fixed_large")])
def test_init_from_a_model_of_the_other_variance_type_is_refused(saved, wanted, tmp_path, train_in_process):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    channels = 6 if saved == "learned_range" else 3
    source = tmp_path / "source"
    unet = UNet2DModel(**dict(MICRO_UNET, out_channels=channels), sample_size=16)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(variance_type=saved)).save_pretrained(source, safe_serialization=True)
    output_dir = tmp_path / "never-created"
    with pytest.raises(UserError, match=rf"--init_from .*source outputs {channels} channels .* --variance_type {wanted} needs {9 - channels}") as error:
        train_in_process(**quick_options(output_dir, None, init_from=str(source), variance_type=wanted))
    assert "\n" not in str(error.value)
    assert not output_dir.exists()


# ---------------------------------------------------------------------------------------------
# The iddpm-cifar10 preset
# ---------------------------------------------------------------------------------------------


def test_iddpm_cifar10_preset_is_improved_diffusions_cifar10_run(tmp_path):
    config = config_from_dict(dict(preset="iddpm-cifar10", output_dir=str(tmp_path)))
    expected = dict(
        num_train_timesteps=4000,
        beta_schedule="squaredcos_cap_v2",
        variance_type="learned_range",
        vlb_weight=0.001,
        learning_rate=1e-4,
        train_batch_size=128,
        lr_warmup_steps=0,
        max_grad_norm=0.0,
        ema_decay=0.9999,
        random_flip=False,
        prediction_type="epsilon",
    )
    assert {name: getattr(config, name) for name in expected} == expected
    assert resolved_loss(config) == "hybrid"
    arguments = build_unet(config.model, config.resolution, config.model_config, config.dropout, config.variance_type).config
    assert (arguments.layers_per_block, tuple(arguments.block_out_channels), arguments.dropout) == (3, (128, 256, 256, 256), 0.3)
    assert arguments.down_block_types == ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D")  # attention at 16x16 and 8x8
    assert 256 // arguments.attention_head_dim == 4 and arguments.resnet_time_scale_shift == "scale_shift"
    assert arguments.out_channels == 6


def test_iddpm_cifar10_parameter_count_is_the_readmes():
    count = count_parameters(build_unet(PRESETS["iddpm-cifar10"]["model"], 32, variance_type="learned_range"))
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("## Improved DDPM") :]
    assert f"**{count:,} parameters**" in section, f"the README's iddpm-cifar10 section should say **{count:,} parameters**"


# ---------------------------------------------------------------------------------------------
# A learned-variance run: what it saves and logs
# ---------------------------------------------------------------------------------------------


def _scalars(output_dir) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for events in glob.glob(os.path.join(output_dir, "logs", "**", "events.out.tfevents.*"), recursive=True):
        accumulator = EventAccumulator(events)
        accumulator.Reload()
        scalars.update({tag: [event.value for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]})
    return scalars


def test_a_learned_variance_run_saves_a_pipeline_that_stock_diffusers_samples(tmp_path, learned_unet_config, train_in_process):
    from diffusers import DDPMPipeline

    from ddpm_hf.hub import build_model_card

    run = tmp_path / "run"
    train_in_process(**quick_options(run, learned_unet_config, variance_type="learned_range"))
    assert json.loads((run / "scheduler" / "scheduler_config.json").read_text())["variance_type"] == "learned_range"
    assert json.loads((run / "unet" / "config.json").read_text())["out_channels"] == 6

    pipeline = DDPMPipeline.from_pretrained(run)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(batch_size=2, num_inference_steps=100, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()

    # The log has both parts of the loss: loss = l_simple + lambda l_vlb, each averaged over the logging interval.
    scalars = _scalars(run)
    assert len(scalars["l_simple"]) == len(scalars["l_vlb"]) == len(scalars["loss"]) == 2
    for loss, l_simple, l_vlb in zip(scalars["loss"], scalars["l_simple"], scalars["l_vlb"]):
        assert loss == pytest.approx(l_simple + 0.001 * l_vlb, rel=1e-5) and l_vlb > 0

    # The model card says the variance is learned and names the objective.
    card = str(build_model_card(run, "alice/learned"))
    assert "variance learned_range" in card and "learns the reverse-process variances" in card
    assert "| Objective | L_hybrid = L_simple + lambda L_vlb with lambda = 0.001 (Nichol & Dhariwal 2021, Eq. 16) |" in card
    assert "DDIMPipeline.from_pretrained" not in card  # stock DDIM cannot take the 6 channels
    assert "num_inference_steps=100" in card and "DDIMScheduler.from_config" in card

    # The card of a fixed-variance run (here: one from before --loss existed) names L_simple.
    fixed = tmp_path / "fixed"
    shutil.copytree(run, fixed)
    scheduler = json.loads((fixed / "scheduler" / "scheduler_config.json").read_text())
    (fixed / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(scheduler, variance_type="fixed_large")))
    config = json.loads((fixed / "training_config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("loss", "vlb_weight")}
    (fixed / "training_config.json").write_text(json.dumps(dict(config, variance_type="fixed_large")))
    card = str(build_model_card(fixed, "alice/fixed"))
    assert "| Objective | L_simple, the noise-prediction MSE (Ho et al. 2020, Eq. 14) |" in card and "variance fixed_large" in card
    assert "learns the reverse-process variances" not in card and "DDIMPipeline.from_pretrained" in card


def test_a_vlb_run_logs_l_vlb(tmp_path, learned_unet_config, train_in_process):
    """--loss vlb: L_vlb alone with importance-sampled timesteps (Nichol & Dhariwal 2021, Eq. 17)."""
    run = tmp_path / "run"
    train_in_process(**quick_options(run, learned_unet_config, variance_type="learned_range", loss="vlb"))
    scalars = _scalars(run)
    assert "l_simple" not in scalars and scalars["loss"] == pytest.approx(scalars["l_vlb"], rel=1e-6)
    assert all(np.isfinite(scalars["loss"]))


# ---------------------------------------------------------------------------------------------
# Evidence that it learns
# ---------------------------------------------------------------------------------------------

HELD_OUT = 32  # the last images of the built-in subset: never trained on
LEARNING_STEPS = 300
STRIDE = 20  # the bound from t = 1..20 exactly and every 20th term after: ~70 network evaluations per image


class ConstantVariance(torch.nn.Module):
    """A learned-variance UNet whose v channels are replaced by a constant: the variance output ignored."""

    def __init__(self, unet, v: float):
        super().__init__()
        self.unet, self.v, self.config = unet, v, unet.config

    def forward(self, x_t, t):
        from diffusers.models.unets.unet_2d import UNet2DOutput

        output = self.unet(x_t, t).sample.clone()
        output[:, output.shape[1] // 2 :] = self.v
        return UNet2DOutput(sample=output)


@pytest.mark.slow
def test_learned_variances_reach_a_lower_bound_than_fixed_large(tmp_path, micro_unet_config, learned_unet_config, train_in_process):
    """Same tiny UNet (but for its output channels), data, steps and seed: L_hybrid with learned_range reaches a lower
    bits/dim on held-out images than L_simple with fixed_large (Nichol & Dhariwal 2021, Sec. 3.1: learning Sigma_theta
    improves the likelihood). The controls, which must score worse, ignore the learned variance: the same weights
    evaluated as fixed_large, and with v held at 0 (the middle of the range, about where an untrained network starts)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    from ddpm_hf import data, nll

    common = dict(
        preset="quickstart",
        resolution=16,
        max_train_samples=1000 - HELD_OUT,
        train_batch_size=8,
        max_train_steps=LEARNING_STEPS,
        learning_rate=4e-3,
        lr_warmup_steps=20,
        ema_decay=0.995,
        logging_steps=LEARNING_STEPS,
        sample_every=0,
        checkpoint_every=0,
    )
    train_in_process(output_dir=str(tmp_path / "fixed"), model_config=micro_unet_config, variance_type="fixed_large", **common)
    train_in_process(output_dir=str(tmp_path / "learned"), model_config=learned_unet_config, variance_type="learned_range", **common)
    fixed, learned = (DDPMPipeline.from_pretrained(tmp_path / name) for name in ("fixed", "learned"))

    decoded = data.decode_images(data.load_image_dataset("builtin:cifar10-1k"), 16, None, "error", 1.0, progress=False)
    held_out = torch.as_tensor(np.asarray(decoded.images[-HELD_OUT:]))

    def bits_per_dim(unet, scheduler) -> float:  # the same seed: the same x_t for every model, so the differences are paired
        return nll.bits_per_dim(unet, scheduler, held_out, batch_size=HELD_OUT, timestep_stride=STRIDE, seed=0, progress=False)["bits_per_dim"]

    results = {
        "fixed_large run": bits_per_dim(fixed.unet, fixed.scheduler),
        "learned_range run": bits_per_dim(learned.unet, learned.scheduler),
        "learned weights as fixed_large": bits_per_dim(learned.unet, DDPMScheduler.from_config(learned.scheduler.config, variance_type="fixed_large")),
        "learned weights with v = 0": bits_per_dim(ConstantVariance(learned.unet, 0.0), learned.scheduler),
    }
    shown = ", ".join(f"{name} {value:.4f}" for name, value in results.items())
    print(f"bits/dim on {HELD_OUT} held-out images: {shown}")
    learned_bpd = results["learned_range run"]
    assert learned_bpd < results["fixed_large run"] - 0.03, shown
    assert learned_bpd < results["learned weights as fixed_large"] - 0.03, shown
    assert learned_bpd < results["learned weights with v = 0"] - 0.02, shown
