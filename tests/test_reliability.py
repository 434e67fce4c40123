"""Reliability: SIGKILL and SIGTERM at chosen moments, non-finite losses, bad input, full disks, secrets.

The kill tests run the real training script in a subprocess, interrupt it, resume it, and compare the
result with an uninterrupted run of the same command: they must be bit-identical.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import MICRO_UNET, REPO_ROOT, offline_env, quick_options
from safetensors.torch import load_file

from ddpm_hf.errors import UserError

STEPS = 8


def _command(output_dir, unet_json, *extra):
    return [
        sys.executable,
        os.path.join(REPO_ROOT, "train_ddpm.py"),
        "--preset",
        "quickstart",
        "--output_dir",
        str(output_dir),
        "--model_config",
        str(unet_json),
        "--resolution",
        "16",
        "--max_train_samples",
        "64",
        "--train_batch_size",
        "8",
        "--max_train_steps",
        str(STEPS),
        "--lr_warmup_steps",
        "2",
        "--logging_steps",
        "1",
        "--sample_every",
        "0",
        "--checkpoint_every",
        "2",
        "--checkpoints_total_limit",
        "2",
        "--dropout",
        "0.1",
        *extra,
    ]


def _final_weights(output_dir):
    checkpoint = os.path.join(output_dir, "checkpoints", f"checkpoint-{STEPS:07d}")
    return {name: load_file(os.path.join(checkpoint, name)) for name in ("model.safetensors", "ema_unet.safetensors")}


def _assert_same_weights(a, b):
    for name in a:
        assert a[name].keys() == b[name].keys()
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name


def _start_and_signal(command, when, sig, timeout=600):
    """Start training, poll until when() is true, send sig; return the finished process and its output."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=offline_env())
    deadline = time.monotonic() + timeout
    while not when():
        assert process.poll() is None, "training ended before the moment to interrupt it: " + process.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.002)
    process.send_signal(sig)
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted run every interrupted one must match."""
    tmp = tmp_path_factory.mktemp("reference")
    unet_json = tmp / "unet.json"
    unet_json.write_text(json.dumps(MICRO_UNET))
    result = subprocess.run(_command(tmp / "out", unet_json), capture_output=True, text=True, env=offline_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return unet_json, _final_weights(tmp / "out")


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["between_steps", "mid_checkpoint"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, reference_run, moment):
    unet_json, reference = reference_run
    output_dir = tmp_path / "out"
    checkpoints = output_dir / "checkpoints"

    def between_steps():
        return (checkpoints / "checkpoint-0000004").is_dir()

    def mid_checkpoint():  # a checkpoint folder exists under its temporary name, after the first complete one
        return checkpoints.is_dir() and (checkpoints / "checkpoint-0000002").is_dir() and any(n.startswith(".partial-") for n in os.listdir(checkpoints))

    code, _, _ = _start_and_signal(_command(output_dir, unet_json), locals()[moment], signal.SIGKILL)
    assert code == -signal.SIGKILL
    resumed = subprocess.run(
        _command(output_dir, unet_json, "--resume_from_checkpoint", "latest"), capture_output=True, text=True, env=offline_env(), timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout
    _assert_same_weights(_final_weights(output_dir), reference)
    assert not any(n.startswith(".partial-") for n in os.listdir(checkpoints))


@pytest.mark.slow
def test_sigterm_checkpoints_exits_zero_and_resumes_exactly(tmp_path, reference_run):
    unet_json, reference = reference_run
    output_dir = tmp_path / "out"
    history = output_dir / "loss_history.jsonl"

    def after_step_three():
        return history.is_file() and len(history.read_text().splitlines()) >= 3

    code, out, err = _start_and_signal(_command(output_dir, unet_json), after_step_three, signal.SIGTERM)
    assert code == 0, err[-3000:]
    message = [line for line in out.splitlines() if line.startswith("Stopped by SIGTERM")]
    assert len(message) == 1 and "--resume_from_checkpoint latest" in message[0]
    stopped_at = int(message[0].split(" at step ")[1].split(";")[0])
    assert 3 <= stopped_at < STEPS and (output_dir / "checkpoints" / f"checkpoint-{stopped_at:07d}").is_dir()
    resumed = subprocess.run(
        _command(output_dir, unet_json, "--resume_from_checkpoint", "latest"), capture_output=True, text=True, env=offline_env(), timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_weights(_final_weights(output_dir), reference)
    steps_logged = [json.loads(line)["step"] for line in history.read_text().splitlines()]
    assert steps_logged == list(range(1, STEPS + 1))  # no step logged twice after the resume


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, micro_unet_config, train_in_process):
    options = quick_options(
        tmp_path / "nan", micro_unet_config, max_train_steps=40, learning_rate=1e25, lr_warmup_steps=0, logging_steps=1, checkpoint_every=1, max_grad_norm=0.0
    )
    with pytest.raises(UserError, match=r"non-finite at step \d+.*--skip_nonfinite_loss"):
        train_in_process(**options)
    checkpoints = sorted(os.listdir(tmp_path / "nan" / "checkpoints"))
    assert checkpoints, "the checkpoints before the bad step are kept"
    for name in checkpoints:
        weights = load_file(str(tmp_path / "nan" / "checkpoints" / name / "model.safetensors"))
        assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (tmp_path / "nan" / "model_index.json").exists()  # no pipeline of broken weights


def test_skip_nonfinite_loss_counts_and_goes_on(tmp_path, micro_unet_config, train_in_process, monkeypatch):
    import ddpm_hf.losses as losses

    calls = {"n": 0}
    original = losses.DDPMLoss.__call__

    def sometimes_nan(self, network, x_0, generator=None):
        calls["n"] += 1
        loss = original(self, network, x_0, generator)
        return loss * float("nan") if calls["n"] in (2, 3) else loss

    monkeypatch.setattr(losses.DDPMLoss, "__call__", sometimes_nan)
    result = train_in_process(**quick_options(tmp_path / "skip", micro_unet_config, max_train_steps=5, skip_nonfinite_loss=True, logging_steps=5))
    assert result.step == 5
    weights = load_file(str(tmp_path / "skip" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_output_dir_of_another_configuration_is_refused(tmp_path, micro_unet_config, train_in_process):
    train_in_process(**quick_options(tmp_path / "run", micro_unet_config, max_train_steps=1))
    before = (tmp_path / "run" / "training_config.json").read_text()
    with pytest.raises(UserError, match=r"another configuration \(learning_rate.*--overwrite"):
        train_in_process(**quick_options(tmp_path / "run", micro_unet_config, max_train_steps=1, learning_rate=0.5))
    assert (tmp_path / "run" / "training_config.json").read_text() == before
    train_in_process(**quick_options(tmp_path / "run", micro_unet_config, max_train_steps=1, learning_rate=0.5, overwrite=True))
    assert json.loads((tmp_path / "run" / "training_config.json").read_text())["learning_rate"] == 0.5


def test_full_disk_during_checkpoint_is_a_clear_error_and_keeps_the_previous_one(tmp_path, micro_unet_config, train_in_process, monkeypatch):
    import errno

    from accelerate import Accelerator

    original = Accelerator.save_state

    def fail_at_step_four(self, output_dir=None, **kwargs):
        if "0000004" in str(output_dir):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", fail_at_step_four)
    with pytest.raises(UserError, match="could not write checkpoint.*No space left on device.*earlier checkpoints are intact"):
        train_in_process(**quick_options(tmp_path / "disk", micro_unet_config, max_train_steps=6, checkpoint_every=2, checkpoints_total_limit=None))
    assert sorted(os.listdir(tmp_path / "disk" / "checkpoints")) == ["checkpoint-0000002"]
    assert load_file(str(tmp_path / "disk" / "checkpoints" / "checkpoint-0000002" / "model.safetensors"))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(dataset="does/not/exist/here"), "no such file or folder"),
        (dict(resolution=17), "--resolution 17 does not divide by 2"),
        (dict(train_batch_size=10, gradient_accumulation_steps=4), "does not divide"),
        (dict(resume_from_checkpoint="nowhere/checkpoint-0000009"), "not a complete checkpoint"),
        (dict(init_from="not-a-pipeline-dir/"), "--init_from"),
        (dict(image_column="pixels"), "--image_column pixels: no such column"),
    ],
)
def test_bad_input_is_explained_and_writes_nothing(tmp_path, micro_unet_config, train_in_process, options, message):
    output_dir = tmp_path / "never-created"
    with pytest.raises(UserError, match=message):
        train_in_process(**quick_options(output_dir, micro_unet_config, **options))
    assert not output_dir.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--learning_rat", "3"], "unrecognized option"),
        (["--resume_from_checkpoint", "nowhere"], "not a complete checkpoint"),
    ],
)
def test_entry_point_prints_one_line_and_exits_2(tmp_path, argv, message):
    command = [sys.executable, os.path.join(REPO_ROOT, "train_ddpm.py"), "--preset", "quickstart", "--output_dir", str(tmp_path / "out"), *argv]
    result = subprocess.run(command, capture_output=True, text=True, env=offline_env(), timeout=300)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_sampler_and_non_pipeline_model_dir(tmp_path):
    from ddpm_hf.sampling import load_pipeline

    with pytest.raises(UserError, match="unknown sampler. Choose one of: auto, ddpm, ddim, dpmsolver"):
        load_pipeline(str(tmp_path), "nonsense")
    with pytest.raises(UserError, match="not a saved pipeline"):
        load_pipeline(str(tmp_path), "ddpm")


def test_no_pickle_loading_without_weights_only():
    """Every torch.load in the package passes weights_only=True (weights themselves are safetensors)."""
    import pathlib
    import re

    for path in pathlib.Path(REPO_ROOT, "ddpm_hf").rglob("*.py"):
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert "pickle.load" not in path.read_text(), path
