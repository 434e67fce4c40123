"""Training: it learns, resumes exactly, saves a pipeline stock diffusers loads, and runs on two processes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, SHARED_CIFAR10, offline_env, quick_options
from PIL import Image
from safetensors.torch import load_file

from ddpm_hf.errors import UserError


@pytest.fixture(scope="module")
def trained_output(tmp_path_factory):
    """One short run shared by the tests that only read its output (in a subprocess, as a user would run it)."""
    tmp = tmp_path_factory.mktemp("trained")
    (tmp / "unet.json").write_text(json.dumps(__import__("conftest").MICRO_UNET))
    output_dir = tmp / "out"
    command = [
        sys.executable,
        os.path.join(REPO_ROOT, "train_ddpm.py"),
        "--preset",
        "quickstart",
        "--output_dir",
        str(output_dir),
        "--model_config",
        str(tmp / "unet.json"),
        "--resolution",
        "16",
        "--max_train_samples",
        "64",
        "--train_batch_size",
        "8",
        "--max_train_steps",
        "6",
        "--sample_every",
        "3",
        "--sample_steps",
        "5",
        "--num_sample_images",
        "4",
        "--checkpoint_every",
        "3",
        "--logging_steps",
        "3",
        "--hub_token",
        "hf_never_written_anywhere",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=offline_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def test_output_dir_has_pipeline_samples_config_checkpoints_and_logs(trained_output):
    names = set(os.listdir(trained_output))
    assert {"model_index.json", "unet", "scheduler", "training_config.json", "samples", "checkpoints", "logs"} <= names
    assert sorted(os.listdir(trained_output / "samples")) == ["step_0000003.png", "step_0000006.png"]
    assert os.path.isfile(trained_output / "unet" / "diffusion_pytorch_model.safetensors")
    config = json.loads((trained_output / "training_config.json").read_text())
    assert config["max_train_steps"] == 6 and config["preset"] == "quickstart"
    state = json.loads((trained_output / "checkpoints" / "checkpoint-0000006" / "training_state.json").read_text())
    assert state["step"] == 6 and state["lr_scheduler"]["last_epoch"] == 6
    for root, _, files in os.walk(trained_output):
        for name in files:
            assert b"hf_never_written_anywhere" not in open(os.path.join(root, name), "rb").read()


@pytest.mark.parametrize("pipeline_class", ["DDPMPipeline", "DDIMPipeline"])
def test_stock_diffusers_pipelines_load_the_output(trained_output, pipeline_class):
    import diffusers

    pipeline = getattr(diffusers, pipeline_class).from_pretrained(str(trained_output))
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(batch_size=2, num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


def test_saved_unet_is_the_ema_of_the_trained_weights(trained_output):
    checkpoint = trained_output / "checkpoints" / "checkpoint-0000006"
    saved = load_file(str(trained_output / "unet" / "diffusion_pytorch_model.safetensors"))
    ema = load_file(str(checkpoint / "ema_unet.safetensors"))
    raw = load_file(str(checkpoint / "model.safetensors"))
    assert all(torch.equal(saved[k], ema[k]) for k in saved)
    assert any(not torch.equal(saved[k], raw[k]) for k in saved)


def test_sample_cli_writes_a_grid(trained_output, tmp_path):
    out = tmp_path / "grid.png"
    command = [
        sys.executable,
        "-m",
        "ddpm_hf.cli",
        "sample",
        "--model",
        str(trained_output),
        "--num_images",
        "4",
        "--steps",
        "5",
        "--scheduler",
        "ddim",
        "--out",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=offline_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    from PIL import Image

    assert Image.open(out).size == (32, 32)  # 2 x 2 grid of 16 x 16
    bad = subprocess.run(
        [sys.executable, "-m", "ddpm_hf.cli", "sample", "--model", str(tmp_path), "--out", str(out)], capture_output=True, text=True, env=offline_env()
    )
    assert bad.returncode == 2 and "not a saved pipeline" in bad.stderr


def test_resume_continues_exactly(tmp_path, micro_unet_config, train_in_process):
    options = dict(dropout=0.1, checkpoint_every=3, random_flip=True)
    train_in_process(**quick_options(tmp_path / "straight", micro_unet_config, max_train_steps=6, **options))
    train_in_process(**quick_options(tmp_path / "split", micro_unet_config, max_train_steps=3, **options))
    result = train_in_process(**quick_options(tmp_path / "split", micro_unet_config, max_train_steps=6, resume_from_checkpoint="latest", **options))
    assert result.step == 6
    straight = tmp_path / "straight" / "checkpoints" / "checkpoint-0000006"
    split = tmp_path / "split" / "checkpoints" / "checkpoint-0000006"
    for name in ("model.safetensors", "ema_unet.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(split / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((straight / "training_state.json").read_text()) == json.loads((split / "training_state.json").read_text())
    # and the weights moved from the first half's
    first_half = (
        load_file(str(tmp_path / "split" / "checkpoints" / "checkpoint-0000003" / "model.safetensors"))
        if (tmp_path / "split" / "checkpoints" / "checkpoint-0000003").exists()
        else None
    )
    if first_half is not None:
        assert any(not torch.equal(first_half[k], load_file(str(split / "model.safetensors"))[k]) for k in first_half)


def test_same_seed_same_run_other_seed_other_run(tmp_path, micro_unet_config, train_in_process):
    weights = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        train_in_process(**quick_options(tmp_path / name, micro_unet_config, seed=seed, max_train_steps=2))
        weights.append(load_file(str(tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors")))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert any(not torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_global_batch_must_divide(tmp_path, micro_unet_config, train_in_process):
    with pytest.raises(UserError, match="does not divide by 1 processes x 3 accumulation steps"):
        train_in_process(**quick_options(tmp_path / "x", micro_unet_config, train_batch_size=8, gradient_accumulation_steps=3))
    assert not (tmp_path / "x").exists()  # nothing written for a bad option


def test_gradient_accumulation_counts_optimizer_steps(tmp_path, micro_unet_config, train_in_process):
    result = train_in_process(**quick_options(tmp_path / "acc", micro_unet_config, gradient_accumulation_steps=2, max_train_steps=3, checkpoint_every=3))
    state = json.loads((tmp_path / "acc" / "checkpoints" / "checkpoint-0000003" / "training_state.json").read_text())
    assert result.step == 3 and state["lr_scheduler"]["last_epoch"] == 3


@pytest.mark.parametrize("prediction_type, beta_schedule", [("v_prediction", "squaredcos_cap_v2"), ("sample", "linear")])
def test_scheduler_variants_train_and_are_saved(tmp_path, micro_unet_config, train_in_process, prediction_type, beta_schedule):
    train_in_process(**quick_options(tmp_path / "v", micro_unet_config, prediction_type=prediction_type, beta_schedule=beta_schedule, max_train_steps=2))
    saved = json.loads((tmp_path / "v" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == prediction_type and saved["beta_schedule"] == beta_schedule


@pytest.mark.slow
def test_two_processes_keep_identical_weights_and_write_one_output(tmp_path, micro_unet_config):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    output_dir = tmp_path / "ddp"
    command = [
        torchrun,
        "--standalone",  # a free port, not 29500: another test may run torchrun at the same time (pytest-xdist)
        "--nproc_per_node",
        "2",
        os.path.join(REPO_ROOT, "train_ddpm.py"),
        "--preset",
        "quickstart",
        "--output_dir",
        str(output_dir),
        "--model_config",
        micro_unet_config,
        "--resolution",
        "16",
        "--max_train_samples",
        "64",
        "--train_batch_size",
        "8",
        "--max_train_steps",
        "4",
        "--lr_warmup_steps",
        "2",
        "--sample_every",
        "0",
        "--checkpoint_every",
        "4",
        "--logging_steps",
        "2",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=offline_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Weights are identical on all 2 processes." in result.stdout
    assert "2 processes x 1 accumulation x 4" in result.stdout
    state = json.loads((output_dir / "checkpoints" / "checkpoint-0000004" / "training_state.json").read_text())
    assert state["lr_scheduler"]["last_epoch"] == 4  # counted in optimizer steps, not x processes
    assert sorted(os.listdir(output_dir / "checkpoints" / "checkpoint-0000004")) == sorted(
        ["ema_unet.safetensors", "model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl", "training_state.json"]
    )
    assert len(os.listdir(output_dir / "logs" / "ddpm")) >= 1 and os.path.isfile(output_dir / "model_index.json")


@pytest.mark.skipif(not os.path.isdir(SHARED_CIFAR10), reason="needs ../shared/data/cifar10")
def test_short_run_on_real_cifar10(tmp_path, micro_unet_config, train_in_process):
    result = train_in_process(
        **quick_options(tmp_path / "real", micro_unet_config, dataset=SHARED_CIFAR10, split="test", resolution=32, max_train_samples=256, max_train_steps=2)
    )
    assert result.step == 2 and os.path.isfile(tmp_path / "real" / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.slow
def test_eval_every_logs_fid_and_keeps_the_best_pipeline(tmp_path, micro_unet_config, train_in_process):
    output_dir = tmp_path / "eval"
    train_in_process(**quick_options(output_dir, micro_unet_config, max_train_steps=4, eval_every=2, eval_num_samples=8, sample_steps=3, max_train_samples=32))
    best = json.loads((output_dir / "best" / "eval.json").read_text())
    assert best["step"] in (2, 4) and np.isfinite(best["fid"]) and best["fid"] > 0
    # The schema `ddpm-hf evaluate` writes (ddpm_hf/run_folder.py), so a card pushed from best/ names its sampler.
    from ddpm_hf.run_folder import FID_RESULT_KEYS

    assert set(FID_RESULT_KEYS) <= set(best)
    assert (best["scheduler"], best["steps"], best["nfe"], best["num_samples"]) == ("ddpm", 3, 3, 8)  # the quickstart grids' sampler
    from diffusers import DDPMPipeline

    assert DDPMPipeline.from_pretrained(str(output_dir / "best")).unet.config.sample_size == 16


def test_training_writes_loss_and_progress_figures(trained_output):
    from PIL import Image

    for name in ("loss.png", "progress.png"):
        image = np.asarray(Image.open(trained_output / name).convert("L"), dtype=np.float64)
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.var() > 10


def test_sample_grid_is_the_same_whatever_the_batch_size(trained_output, tmp_path):
    """Image i depends on (seed, i) only: its noise comes from its own generator (ddpm_hf/distributed.py)."""
    from ddpm_hf.cli import main

    common = ["sample", "--model", str(trained_output), "--num_images", "4", "--steps", "5", "--device", "cpu"]
    grids = {}
    for batch_size in ("1", "3", "4"):
        out = tmp_path / f"batch{batch_size}.png"
        assert main([*common, "--batch_size", batch_size, "--out", str(out)]) == 0
        grids[batch_size] = np.asarray(Image.open(out), dtype=np.int16)
    assert np.abs(grids["1"] - grids["4"]).max() <= 1 and np.abs(grids["3"] - grids["4"]).max() <= 1  # batch numerics may round one level apart
    assert grids["4"].std() > 10


def test_training_compile_failure_falls_back_with_a_warning(tmp_path, micro_unet_config, train_in_process, monkeypatch):
    options = dict(max_train_steps=2, dropout=0.0)
    train_in_process(**quick_options(tmp_path / "plain", micro_unet_config, compile="no", **options))

    def failing_compile(fn, *args, **kwargs):
        def compiled(*a, **k):
            from torch._inductor.exc import InductorError

            raise InductorError(RuntimeError("no C++ compiler found"), None)  # what Inductor raises without a compiler

        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        train_in_process(**quick_options(tmp_path / "fallback", micro_unet_config, compile="yes", **options))
    a = load_file(str(tmp_path / "plain" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "fallback" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_resolution_the_unet_cannot_take_fails_before_any_image_is_decoded(tmp_path, micro_unet_config, train_in_process, monkeypatch):
    from ddpm_hf import data

    def decode_images(*args, **kwargs):
        raise AssertionError("decoded the dataset before checking the resolution")

    monkeypatch.setattr(data, "decode_images", decode_images)
    with pytest.raises(UserError, match="--resolution 17 does not divide by 2"):
        train_in_process(**quick_options(tmp_path / "run", micro_unet_config, resolution=17, sample_steps=3))  # MICRO_UNET: 2 levels
    assert not (tmp_path / "run").exists()
