"""Fitting the habits of diffusers users (issue 14): trackers through Accelerate, the diffusers example's option
names, Accelerate's own mixed-precision configuration."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, as_flags, offline_env, quick_options

from ddpm_hf.config import parse_training_config
from ddpm_hf.diffusers_example_options import ALIASES, ALREADY_SO, MAPPED, REFUSED
from ddpm_hf.errors import UserError


def test_wandb_offline_gets_the_scalars_and_the_sample_grid(tmp_path, micro_unet_config, train_in_process, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-home").mkdir()
    train_in_process(**quick_options(tmp_path / "run", micro_unet_config, report_to="wandb", max_train_steps=4, logging_steps=2, sample_every=2))
    (run_dir,) = glob.glob(str(tmp_path / "wandb-home" / "wandb" / "offline-run-*"))
    images = glob.glob(os.path.join(run_dir, "files", "media", "images", "samples_*.png"))
    assert len(images) >= 2  # steps 2 and 4
    # wandb keeps an offline run's history in its binary run file (protobuf records: keys and values as JSON text).
    (run_file,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    records = open(run_file, "rb").read()
    history = [json.loads(line) for line in (tmp_path / "run" / "loss_history.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in history] == [2, 4]
    for key in (b"loss", b"lr", b"grad_norm", b"img_per_s", b"samples"):
        assert key in records, key
    assert repr(history[-1]["loss"]).encode()[:8] in records  # the value logged at step 4
    assert not (tmp_path / "run" / "logs").exists()  # TensorBoard was not asked for


def test_logging_dir_and_no_tracker(tmp_path, micro_unet_config, train_in_process):
    train_in_process(**quick_options(tmp_path / "tb", micro_unet_config, logging_dir="my-logs", max_train_steps=2))
    assert glob.glob(str(tmp_path / "tb" / "my-logs" / "ddpm" / "events.out.tfevents.*"))
    train_in_process(**quick_options(tmp_path / "none", micro_unet_config, report_to="none", max_train_steps=2))
    assert not (tmp_path / "none" / "logs").exists() and (tmp_path / "none" / "model_index.json").is_file()


def test_tracker_mistakes_are_one_line_errors(tmp_path, micro_unet_config, train_in_process, monkeypatch):
    with pytest.raises(UserError, match="token to Weights & Biases"):
        parse_training_config(["--preset", "quickstart", "--output_dir", str(tmp_path / "a"), "--logger", "wandb", "--hub_token", "hf_x"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match="needs the wandb package: pip install wandb"):
        train_in_process(**quick_options(tmp_path / "b", micro_unet_config, report_to="all"))
    assert not (tmp_path / "b").exists()


def test_the_diffusers_example_readme_command_line_parses_with_our_meanings(tmp_path, micro_unet_config, train_in_process):
    """The example README's command, with --dataset_name pointing at local data (the built-in subset's file)."""
    from ddpm_hf.data import builtin_datasets

    dataset = builtin_datasets()["cifar10-1k"]
    argv = [
        f"--dataset_name={dataset}", "--resolution=64", "--center_crop", "--random_flip", f"--output_dir={tmp_path / 'ddpm-ema-flowers-64'}",
        "--train_batch_size=16", "--num_epochs=100", "--gradient_accumulation_steps=1", "--use_ema", "--learning_rate=1e-4",
        "--lr_warmup_steps=500", "--mixed_precision=no", "--push_to_hub", "--logger=tensorboard", "--ddpm_num_steps", "1000",
        "--ddpm_beta_schedule", "linear", "--checkpointing_steps=500", "--adam_weight_decay=1e-6", "--ema_max_decay", "0.9999",
        "--save_images_epochs=10", "--save_model_epochs=10", "--logging_dir", "logs",
    ]  # fmt: skip
    config = parse_training_config(argv)
    assert (config.dataset, config.resolution, config.random_flip, config.train_batch_size) == (dataset, 64, True, 16)
    assert (config.num_epochs, config.save_images_epochs, config.save_model_epochs) == (100, 10, 10)
    assert (config.learning_rate, config.lr_warmup_steps, config.mixed_precision, config.push_to_hub) == (1e-4, 500, "no", True)
    assert (config.num_train_timesteps, config.beta_schedule, config.checkpoint_every, config.weight_decay) == (1000, "linear", 500, 1e-6)
    assert (config.ema_decay, config.ema_warmup, config.report_to) == (0.9999, True, "tensorboard")
    # Epochs become steps once the data is known: 64 images at batch 16 are 4 steps an epoch.
    result = train_in_process(
        **quick_options(tmp_path / "epochs", micro_unet_config, num_epochs=2, save_images_epochs=1, max_train_samples=64, train_batch_size=16)
    )
    assert result.step == 8
    recorded = json.loads((tmp_path / "epochs" / "training_config.json").read_text())
    assert (recorded["max_train_steps"], recorded["sample_every"], recorded["num_epochs"]) == (8, 4, 2)
    assert sorted(p.name for p in (tmp_path / "epochs" / "samples").iterdir()) == ["step_0000004.png", "step_0000008.png"]


EXAMPLE_OPTIONS = {  # every option of the example's parse_args, with a value that is valid for it
    "dataset_name": "user/data", "dataset_config_name": "default", "model_config_name_or_path": None, "train_data_dir": "FOLDER",
    "output_dir": "OUT", "overwrite_output_dir": True, "cache_dir": "c", "resolution": "32", "center_crop": True, "random_flip": True,
    "train_batch_size": "16", "eval_batch_size": "16", "dataloader_num_workers": "0", "num_epochs": "1", "save_images_epochs": "1",
    "save_model_epochs": "1", "gradient_accumulation_steps": "1", "learning_rate": "1e-4", "lr_scheduler": "cosine", "lr_warmup_steps": "5",
    "adam_beta1": "0.95", "adam_beta2": "0.999", "adam_weight_decay": "1e-6", "adam_epsilon": "1e-8", "use_ema": True, "ema_inv_gamma": "1.0",
    "ema_power": "0.75", "ema_max_decay": "0.9999", "push_to_hub": True, "hub_token": "hf_x", "hub_model_id": "user/m", "hub_private_repo": True,
    "logger": "tensorboard", "logging_dir": "logs", "local_rank": "0", "mixed_precision": "bf16", "prediction_type": "epsilon",
    "ddpm_num_steps": "1000", "ddpm_num_inference_steps": "100", "ddpm_beta_schedule": "linear", "checkpointing_steps": "500",
    "checkpoints_total_limit": "2", "resume_from_checkpoint": "latest", "enable_xformers_memory_efficient_attention": True,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(EXAMPLE_OPTIONS))
def test_every_option_of_the_diffusers_example_is_accepted_or_refused_naming_ours(name, tmp_path, micro_unet_config):
    value = EXAMPLE_OPTIONS[name]
    if name == "model_config_name_or_path":
        value = micro_unet_config
    if value == "FOLDER":
        value = str(tmp_path)
    if value == "OUT":
        value = str(tmp_path / "out")
    argv = ["--preset", "quickstart", "--output_dir", str(tmp_path / "run"), f"--{name}"] + ([] if value is True else [value])
    if name in REFUSED or name == "dataloader_num_workers":
        with pytest.raises(UserError, match=f"--{name}|{name}") as error:
            parse_training_config(argv)
        assert "HF_DATASETS_CACHE" in str(error.value) or "drop the flag" in str(error.value) or "removed" in str(error.value)
        return
    config = parse_training_config(argv)
    if name in ALREADY_SO:  # what this trainer does anyway: accepted, nothing to set
        return
    ours = ALIASES.get(name, MAPPED.get(name, (name,))[0])
    got = getattr(config, ours)
    assert got == value or str(got) == value or (isinstance(got, float) and got == float(value)), (ours, got, value)  # it landed in ours


@pytest.mark.slow
@pytest.mark.parametrize("flag, expected", [([], "bf16"), (["--mixed_precision", "no"], "no")])
def test_accelerate_config_decides_mixed_precision_unless_the_flag_is_given(tmp_path, micro_unet_config, flag, expected):
    config_file = tmp_path / "accelerate.yaml"
    config_file.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nmixed_precision: bf16\nnum_processes: 1\nuse_cpu: true\n")
    output_dir = tmp_path / "run"
    options = quick_options(output_dir, micro_unet_config, max_train_steps=1)
    command = [
        os.path.join(os.path.dirname(sys.executable), "accelerate"),
        "launch",
        "--config_file",
        str(config_file),
        os.path.join(REPO_ROOT, "train_ddpm.py"),
    ]
    command += as_flags(options) + flag
    result = subprocess.run(command, capture_output=True, text=True, env=offline_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((output_dir / "training_config.json").read_text())["mixed_precision"] == expected
