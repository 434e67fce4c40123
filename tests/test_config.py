"""Configuration: presets, YAML and flag precedence, the paper's architecture and schedule."""

import json

import pytest

from ddpm_hf.config import PRESETS, TrainingConfig, config_from_dict, parse_training_config
from ddpm_hf.errors import UserError
from ddpm_hf.models import build_scheduler, build_unet, count_parameters


def test_cifar10_preset_is_the_papers_unet_and_schedule():
    config = parse_training_config([])
    assert config.preset == "cifar10" and config.output_dir == "ddpm-cifar10"
    unet = build_unet(config.model, config.resolution, config.model_config, config.dropout)
    assert count_parameters(unet) == 35_746_307
    c = unet.config
    assert c.sample_size == 32 and c.in_channels == 3 and c.out_channels == 3 and c.layers_per_block == 2
    assert tuple(c.block_out_channels) == (128, 256, 256, 256)
    assert tuple(c.down_block_types) == ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    assert tuple(c.up_block_types) == ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    assert (c.downsample_padding, c.flip_sin_to_cos, c.freq_shift, c.norm_num_groups, c.norm_eps) == (0, False, 1, 32, 1e-6)
    assert c.act_fn == "silu" and c.attention_head_dim is None and c.dropout == 0.1

    s = build_scheduler(config).config
    assert (s.num_train_timesteps, s.beta_schedule, s.beta_start, s.beta_end) == (1000, "linear", 1e-4, 0.02)
    assert (s.variance_type, s.clip_sample, s.prediction_type) == ("fixed_large", True, "epsilon")

    assert (config.learning_rate, config.lr_warmup_steps, config.lr_scheduler) == (2e-4, 5000, "constant_with_warmup")
    assert (config.train_batch_size, config.max_grad_norm, config.ema_decay, config.ema_warmup) == (128, 1.0, 0.9999, False)
    assert (config.random_flip, config.max_train_steps, config.dataset, config.weight_decay) == (True, 800_000, "uoft-cs/cifar10", 0.0)


def test_quickstart_preset_is_small_and_offline():
    config = parse_training_config(["--preset", "quickstart"])
    assert config.output_dir == "ddpm-cifar10-quickstart" and config.dataset.startswith("builtin:")
    assert 500_000 < count_parameters(build_unet(config.model, config.resolution)) < 1_500_000


def test_flags_override_yaml_which_overrides_the_preset(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: quickstart\nlearning_rate: 0.005\nmax_train_steps: 7\nbeta_schedule: squaredcos_cap_v2\n")
    config = parse_training_config(["--config", str(path), "--max_train_steps", "9"])
    assert config.preset == "quickstart" and config.train_batch_size == PRESETS["quickstart"]["train_batch_size"]
    assert config.learning_rate == 0.005 and config.max_train_steps == 9
    assert build_scheduler(config).config.beta_schedule == "squaredcos_cap_v2"


@pytest.mark.parametrize("flags", [["--prediction_type", "v_prediction"], ["--prediction_type", "sample"], ["--timestep_spacing", "trailing"]])
def test_scheduler_variants_reach_the_scheduler(flags):
    config = parse_training_config(flags)
    assert build_scheduler(config).config[flags[0][2:]] == flags[1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--learning_rat", "1"], "unrecognized"),
        (["--preset", "nope"], "unknown preset"),
        (["--beta_schedule", "cubic"], "invalid choice"),
        (["--train_batch_size", "0"], "--train_batch_size must be >= 1, got 0"),
        (["--sample_steps", "2000"], "exceeds"),
    ],
)
def test_bad_options_are_one_line_user_errors(argv, message):
    with pytest.raises(UserError, match=message):
        parse_training_config(argv)


def test_invalid_yaml_and_unknown_yaml_keys_are_user_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        parse_training_config(["--config", str(bad)])
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("learning_rat: 1\n")
    with pytest.raises(UserError, match="unknown option.*learning_rat"):
        parse_training_config(["--config", str(unknown)])
    with pytest.raises(UserError, match="no such file"):
        parse_training_config(["--config", str(tmp_path / "missing.yaml")])


def test_saved_config_has_no_token(tmp_path):
    config = config_from_dict({"preset": "quickstart", "hub_token": "hf_secret_value"})
    path = tmp_path / "training_config.json"
    config.save(str(path))
    text = path.read_text()
    assert "hf_secret_value" not in text and "hub_token" not in text
    assert json.loads(text)["learning_rate"] == config.learning_rate


def test_every_option_has_help():
    import dataclasses

    assert all(f.metadata.get("help") for f in dataclasses.fields(TrainingConfig))


def test_readme_options_table_matches_the_code():
    """The README's option table is generated from TrainingConfig: regenerate it with scripts/options_table.py --write."""
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("options_table", os.path.join(root, "scripts", "options_table.py"))
    options_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(options_table)
    readme = open(os.path.join(root, "README.md")).read()
    assert options_table.readme_with_table(readme) == readme
