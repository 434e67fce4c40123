"""The fast training paths (issue 5) run on the CPU and fall back cleanly where unsupported: bf16 autocast,
channels_last and compile="yes". (Sampling has one engine, ddpm_hf.sampling.generate_images: tests/test_sampling.py.)
"""

import json
import os

import numpy as np
import pytest
import torch
from conftest import quick_options

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


# ---- training: fast paths on CPU ------------------------------------------------------------------


def _losses(output_dir):
    with open(os.path.join(output_dir, "loss_history.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_bf16_training_step_on_cpu(tmp_path, micro_unet_config, train_in_process):
    result = train_in_process(**quick_options(tmp_path / "bf16", micro_unet_config, mixed_precision="bf16", max_train_steps=2, logging_steps=1))
    losses = _losses(result.output_dir)
    assert result.step == 2 and len(losses) == 2 and all(np.isfinite(losses))
    assert os.path.isfile(os.path.join(result.output_dir, "unet", "diffusion_pytorch_model.safetensors"))


def test_channels_last_training_matches_contiguous(tmp_path, micro_unet_config, train_in_process):
    options = dict(max_train_steps=2, logging_steps=1, dropout=0.0)
    plain = _losses(train_in_process(**quick_options(tmp_path / "nchw", micro_unet_config, channels_last="no", **options)).output_dir)
    nhwc = _losses(train_in_process(**quick_options(tmp_path / "nhwc", micro_unet_config, channels_last="yes", **options)).output_dir)
    np.testing.assert_allclose(nhwc, plain, rtol=1e-4)


def test_training_with_compile_yes_runs_on_cpu(tmp_path, micro_unet_config, train_in_process, monkeypatch):
    """compile="yes" goes through torch.compile on CPU too (Dynamo with the 'eager' backend here, to keep
    it to seconds) and trains like the plain run."""
    import functools

    options = dict(max_train_steps=2, logging_steps=1, dropout=0.0)
    plain = _losses(train_in_process(**quick_options(tmp_path / "plain", micro_unet_config, compile="no", **options)).output_dir)
    calls = []
    real_compile = torch.compile

    def eager_compile(*args, **kwargs):
        calls.append(kwargs)
        return real_compile(*args, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", functools.wraps(real_compile)(eager_compile))
    torch._dynamo.reset()
    compiled = _losses(train_in_process(**quick_options(tmp_path / "compiled", micro_unet_config, compile="yes", **options)).output_dir)
    assert calls, "compile='yes' did not call torch.compile"
    np.testing.assert_allclose(compiled, plain, rtol=1e-4)
