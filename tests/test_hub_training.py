"""Training with --push_to_hub against the local Hub (tests/hub_server.py), and --init_from a Hub pipeline.

The training runs are real subprocesses of train_ddpm.py talking to the server through HF_ENDPOINT.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import MICRO_UNET, REPO_ROOT
from safetensors.torch import load_file


def _train(hub_server, output_dir, unet_json, *extra, timeout=600, env=None):
    env = dict(hub_server.env, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT, **(env or {}))
    command = [
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
        "4",
        "--lr_warmup_steps",
        "2",
        "--logging_steps",
        "2",
        "--sample_every",
        "2",
        "--sample_steps",
        "3",
        "--num_sample_images",
        "4",
        "--checkpoint_every",
        "2",
        *extra,
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture
def unet_json(tmp_path):
    path = tmp_path / "unet.json"
    path.write_text(json.dumps(MICRO_UNET))
    return path


@pytest.mark.slow
def test_training_pushes_periodically_despite_a_5xx_and_round_trips_bit_identical(hub_server, tmp_path, unet_json):
    repo_id = f"{hub_server.user}/trained"
    hub_server.fail_next(1, status=503, path_prefix=f"/api/models/{repo_id}/commit")  # the periodic push at step 2
    output_dir = tmp_path / "run"
    result = _train(hub_server, output_dir, unet_json, "--push_to_hub", "--hub_model_id", repo_id, "--hub_token", hub_server.token, "--push_every", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    files = set(hub_server.repo_files(repo_id))
    assert {
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "README.md",
        "training_config.json",
    } <= files
    assert [f for f in files if f.startswith("samples/")] == ["samples/step_0000004.png"]
    assert not any(f.startswith(("checkpoints", "logs")) or f.endswith(".bin") for f in files)
    for name, content in hub_server.repo_files(repo_id).items():
        assert hub_server.token.encode() not in content, name

    # pull it back in a fresh process with an empty cache: bit-identical weights, identical images
    script = f"""
import json, sys, torch
from diffusers import DDPMPipeline
pipeline = DDPMPipeline.from_pretrained({repo_id!r})
pipeline.set_progress_bar_config(disable=True)
images = pipeline(batch_size=2, num_inference_steps=5, output_type="np", generator=torch.Generator().manual_seed(0)).images
from safetensors.torch import save_file
save_file(dict(pipeline.unet.state_dict()), sys.argv[1])
import numpy as np; np.save(sys.argv[2], images)
"""
    env = dict(hub_server.env, HF_HOME=str(tmp_path / "fresh_home"), HF_TOKEN=hub_server.token, PYTHONPATH=REPO_ROOT)
    pulled = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "pulled.safetensors"), str(tmp_path / "images.npy")], capture_output=True, text=True, env=env, timeout=300
    )
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    local = load_file(str(output_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    remote = load_file(str(tmp_path / "pulled.safetensors"))
    assert local.keys() == remote.keys() and all(torch.equal(local[k], remote[k]) for k in local)
    from diffusers import DDPMPipeline

    pipeline = DDPMPipeline.from_pretrained(str(output_dir))
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(batch_size=2, num_inference_steps=5, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert np.array_equal(images, np.load(tmp_path / "images.npy"))


@pytest.mark.parametrize("option, value, message", [("--hub_token", "hf_not_a_real_token", "token"), ("--hub_model_id", "bad repo id!", "hub_model_id")])
def test_bad_token_or_repo_id_fails_before_training(hub_server, tmp_path, unet_json, option, value, message):
    arguments = {"--hub_token": hub_server.token, "--hub_model_id": f"{hub_server.user}/x"}
    arguments[option] = value
    started = time.monotonic()
    result = _train(hub_server, tmp_path / "run", unet_json, "--push_to_hub", *[x for kv in arguments.items() for x in kv])
    assert result.returncode == 2
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: ") and message in last
    assert "Training" not in result.stdout and not (tmp_path / "run").exists()
    assert time.monotonic() - started < 120


@pytest.mark.slow
def test_failed_final_push_exits_nonzero_keeps_output_and_says_how_to_retry(hub_server, tmp_path, unet_json):
    repo_id = f"{hub_server.user}/final"
    hub_server.fail_next(100, status=500, path_prefix=f"/api/models/{repo_id}/commit")
    env_extra = ["--push_to_hub", "--hub_model_id", repo_id, "--hub_token", hub_server.token]
    result = _train(hub_server, tmp_path / "run", unet_json, *env_extra, env={"DDPM_HF_PUSH_RETRIES": "2"})  # 2 + 4 s of backoff, not 62
    assert result.returncode == 2
    assert "retry 2/2" in result.stderr and "retry 3/" not in result.stderr
    assert "ddpm-hf push" in result.stderr and repo_id in result.stderr
    assert (tmp_path / "run" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.slow
def test_init_from_a_hub_pipeline(hub_server, tmp_path, unet_json):
    """Fine-tuning starts from the weights of a pushed pipeline (step 0 = the pulled weights)."""
    repo_id = f"{hub_server.user}/base"
    result = _train(hub_server, tmp_path / "base", unet_json, "--push_to_hub", "--hub_model_id", repo_id, "--hub_token", hub_server.token)
    assert result.returncode == 0, result.stderr[-3000:]
    tuned = _train(
        hub_server,
        tmp_path / "tuned",
        unet_json,
        "--init_from",
        repo_id,
        "--max_train_steps",
        "1",
        "--learning_rate",
        "1e-12",
        "--lr_warmup_steps",
        "0",
        "--no_use_ema",
    )
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    base = load_file(str(tmp_path / "base" / "unet" / "diffusion_pytorch_model.safetensors"))
    start = load_file(str(tmp_path / "tuned" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.allclose(base[k], start[k], atol=1e-6) for k in base)
