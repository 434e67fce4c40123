"""Every hyper-parameter of a training run, as plain data.

Precedence, lowest first: the dataclass defaults, the chosen `--preset`, a `--config file.yaml`,
then command-line flags. `parse_training_config()` applies it; `TrainingConfig.to_json_dict()` is what
lands in `OUTPUT_DIR/training_config.json` (the Hub token never does).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from .errors import UserError

# A dataset name starting with this prefix is a file shipped inside the package (see ddpm_hf/assets/).
BUILTIN_DATASET_PREFIX = "builtin:"


def _help(text: str, **kwargs) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainingConfig:
    # ---- run ------------------------------------------------------------------------------------
    preset: str = _help("Defaults to start from: 'cifar10' (the DDPM paper's run) or 'quickstart'.", default="cifar10")
    config: Optional[str] = _help("YAML file of options (keys are these option names); flags override it.", default=None)
    output_dir: Optional[str] = _help("Where the pipeline, samples, checkpoints and logs go (default: per preset).", default=None)
    overwrite: bool = _help("Allow writing into an existing OUTPUT_DIR that holds a run of another configuration.", default=False)
    seed: int = _help("Seed for data order, noise, timesteps and dropout: the same seed repeats a run.", default=0)

    # ---- data -----------------------------------------------------------------------------------
    dataset: str = _help(
        "A Hub dataset id, a folder of parquet files, an image folder, a save_to_disk folder, a parquet file, "
        "or builtin:cifar10-1k (the CIFAR-10 subset shipped with the package).",
        default="uoft-cs/cifar10",
    )
    dataset_config: Optional[str] = _help("Configuration name of a Hub dataset, if it has several.", default=None)
    split: str = _help("Dataset split to train on.", default="train")
    image_column: Optional[str] = _help("Column holding the images (default: 'img', 'image', or the only Image column).", default=None)
    resolution: int = _help("Training resolution: images are resized on the short side, then center-cropped.", default=32)
    random_flip: bool = _help("Random horizontal flips (the paper uses them for CIFAR-10).", default=True)
    max_train_samples: Optional[int] = _help("Use only the first N images (for quick experiments).", default=None)
    on_corrupt_image: Literal["error", "skip"] = _help("An image that cannot be decoded: stop naming its row, or skip it and count.", default="error")

    # ---- model and noise schedule ---------------------------------------------------------------
    model: str = _help("UNet architecture: 'ddpm-cifar10' (35.7M parameters, the paper's) or 'tiny' (~0.9M).", default="ddpm-cifar10")
    model_config: Optional[str] = _help("JSON file of UNet2DModel arguments; replaces --model.", default=None)
    dropout: Optional[float] = _help("Dropout in the UNet's residual blocks (default: the architecture's own).", default=None)
    init_from: Optional[str] = _help("Start from the UNet weights of a saved pipeline (folder or Hub id), e.g. to fine-tune.", default=None)
    num_train_timesteps: int = _help("T, the number of diffusion steps.", default=1000)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"] = _help(
        "Noise schedule: 'linear' (the paper) or 'squaredcos_cap_v2' (cosine, Nichol & Dhariwal 2021).", default="linear"
    )
    beta_start: float = _help("beta_1 of the linear schedule.", default=1e-4)
    beta_end: float = _help("beta_T of the linear schedule.", default=0.02)
    variance_type: Literal["fixed_large", "fixed_small"] = _help("Reverse-process variance: sigma_t^2 = beta_t (large) or beta-tilde_t (small).", default="fixed_large")
    clip_sample: bool = _help("Clip the predicted x_0 to [-1, 1] when sampling.", default=True)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = _help("What the network predicts: the noise (paper), v, or x_0.", default="epsilon")
    timestep_spacing: Literal["leading", "trailing", "linspace"] = _help("How sampling picks K of the T timesteps.", default="leading")

    # ---- optimisation ---------------------------------------------------------------------------
    train_batch_size: int = _help("GLOBAL batch per optimizer step, over all processes and accumulation steps.", default=128)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1)
    learning_rate: float = _help("Peak learning rate.", default=2e-4)
    lr_scheduler: Literal["constant_with_warmup", "linear", "cosine", "constant"] = _help("Learning-rate schedule, counted in optimizer steps.", default="constant_with_warmup")
    lr_warmup_steps: int = _help("Optimizer steps of linear warm-up.", default=5000)
    adam_beta1: float = _help("Adam beta_1.", default=0.9)
    adam_beta2: float = _help("Adam beta_2.", default=0.999)
    adam_epsilon: float = _help("Adam epsilon.", default=1e-8)
    weight_decay: float = _help("Decoupled weight decay (AdamW); 0 is the paper's Adam.", default=0.0)
    max_grad_norm: float = _help("Clip the gradient norm to this (0 turns clipping off).", default=1.0)
    max_train_steps: int = _help("Optimizer steps to train for.", default=800_000)
    mixed_precision: Literal["no", "fp16", "bf16"] = _help("Autocast precision; weights and EMA stay in float32.", default="no")
    use_ema: bool = _help("Keep an exponential moving average of the weights; samples and the saved pipeline use it.", default=True)
    ema_decay: float = _help("EMA decay (the paper: 0.9999).", default=0.9999)
    ema_warmup: bool = _help("Ramp the EMA decay up as 1 - (1 + step/inv_gamma)^-power instead of a fixed decay.", default=False)
    ema_inv_gamma: float = _help("inv_gamma of the EMA warm-up.", default=1.0)
    ema_power: float = _help("power of the EMA warm-up.", default=0.75)
    skip_nonfinite_loss: bool = _help("On a NaN/inf loss, skip the step and count it instead of stopping.", default=False)

    # ---- speed ----------------------------------------------------------------------------------
    compile: Literal["auto", "yes", "no"] = _help("torch.compile the UNet: 'auto' compiles on CUDA only.", default="auto")
    channels_last: Literal["auto", "yes", "no"] = _help("channels_last memory format: 'auto' uses it on CUDA only.", default="auto")
    dataloader_num_workers: int = _help("Workers for datasets too large to hold in memory.", default=4)
    max_in_memory_gb: float = _help("Hold the decoded dataset as a uint8 tensor if it is smaller than this.", default=8.0)

    # ---- logging, samples, checkpoints ----------------------------------------------------------
    logging_steps: int = _help("Log loss, lr, grad norm and img/s every N optimizer steps (one host sync per N).", default=50)
    sample_every: int = _help("Write a sample grid every N steps (and at the end); 0 turns sampling off.", default=10_000)
    sample_steps: int = _help("Denoising steps for the sample grid (DDIM when fewer than T).", default=100)
    sample_scheduler: Literal["auto", "ddpm", "ddim"] = _help(
        "Sampler of the grids: 'auto' is DDIM when --sample_steps < T, else DDPM. Briefly trained models look better with ddpm.", default="auto"
    )
    num_sample_images: int = _help("Images in the sample grid.", default=64)
    sample_seed: int = _help("Seed of the sample grid, fixed so grids over training are comparable.", default=0)
    checkpoint_every: int = _help("Write a resumable checkpoint every N steps; 0 turns checkpoints off.", default=5000)
    checkpoints_total_limit: Optional[int] = _help("Keep only the newest N checkpoints.", default=3)
    resume_from_checkpoint: Optional[str] = _help("'latest' or a checkpoint folder to continue from.", default=None)
    save_every: int = _help("Also save the pipeline every N steps (it is always saved at the end); 0: only at the end.", default=0)

    # ---- Hub ------------------------------------------------------------------------------------
    push_to_hub: bool = _help("Push the pipeline and a model card to the Hub (checked before training starts).", default=False)
    hub_model_id: Optional[str] = _help("Hub repo to push to, 'user/name' (default: your namespace / the output folder name).", default=None)
    hub_private_repo: bool = _help("Create the Hub repo as private.", default=False)
    hub_token: Optional[str] = _help("Hub token (default: HF_TOKEN or `hf auth login`). Never written to disk.", default=None)
    push_every: int = _help("Push in the background every N steps; 0: only at the end.", default=0)

    # ---- evaluation during training -------------------------------------------------------------
    eval_every: int = _help("Compute FID of the EMA model every N steps and keep the best pipeline in OUTPUT_DIR/best/; 0: never.", default=0)
    eval_num_samples: int = _help("Generated images per FID evaluation during training.", default=10_000)

    def to_json_dict(self) -> dict:
        """The resolved configuration without secrets, as written to training_config.json."""
        values = dataclasses.asdict(self)
        values.pop("hub_token")
        return values

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json_dict(), f, indent=2, sort_keys=True)


# The settings a preset changes; everything else keeps the dataclass default.
PRESETS: dict[str, dict[str, Any]] = {
    # Ho, Jain & Abbeel (2020), Appendix B: CIFAR-10. 35.7M-parameter UNet, linear betas 1e-4..0.02,
    # T = 1000, Adam 2e-4 with 5,000 warm-up steps, batch 128, EMA 0.9999, dropout 0.1, flips, 800k steps.
    "cifar10": dict(output_dir="ddpm-cifar10"),
    # Minutes on a laptop CPU, no network: a ~0.9M-parameter UNet on the 1,000-image CIFAR-10 subset
    # shipped in ddpm_hf/assets/. Same noise schedule and objective as the paper.
    "quickstart": dict(
        output_dir="ddpm-cifar10-quickstart",
        dataset="builtin:cifar10-1k",
        model="tiny",
        train_batch_size=16,
        learning_rate=1e-3,
        lr_warmup_steps=50,
        max_train_steps=400,
        ema_warmup=True,
        ema_decay=0.999,
        logging_steps=20,
        sample_every=200,
        sample_steps=100,
        # A model trained for minutes predicts noise too roughly for deterministic DDIM, whose grids come out
        # grey; the paper's stochastic sampler turns the same model into colourful images.
        sample_scheduler="ddpm",
        num_sample_images=16,
        checkpoint_every=200,
        checkpoints_total_limit=1,
    ),
}

_FIELD_NAMES = {f.name for f in dataclasses.fields(TrainingConfig)}


def load_yaml_options(path: str) -> dict[str, Any]:
    """Read a YAML file of options; unknown keys and invalid YAML are `UserError`s."""
    if not os.path.isfile(path):
        raise UserError(f"--config {path}: no such file. Give the path of a YAML file of options.")
    try:
        with open(path) as f:
            values = yaml.safe_load(f)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise UserError(f"--config {path} is not valid YAML{line}: {getattr(e, 'problem', e)}. Fix the file.") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"--config {path} must be a mapping of option: value, not a {type(values).__name__}.")
    unknown = sorted(set(values) - _FIELD_NAMES - {"config"})
    if unknown:
        raise UserError(f"--config {path}: unknown option(s) {', '.join(unknown)}. See `train_ddpm.py --help` for the names.")
    return values


def _pre_parse(argv: list[str]) -> tuple[str, Optional[str]]:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset", default="cifar10")
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    return known.preset, known.config


class _ArgumentParser:
    """`transformers.HfArgumentParser` whose errors are one line and exit 2, like every error of ours."""

    def __init__(self):
        from transformers import HfArgumentParser

        self.parser = HfArgumentParser(
            TrainingConfig,
            prog="train_ddpm.py",
            allow_abbrev=False,
            description="Train a DDPM (Ho et al. 2020) with Accelerate; the result loads with DDPMPipeline.from_pretrained.",
        )

        def error(message: str):
            raise UserError(f"{message}. Run `train_ddpm.py --help` for the options.")

        self.parser.error = error


def parse_training_config(argv: Optional[list[str]] = None) -> TrainingConfig:
    """Defaults <- preset <- YAML <- flags, then `validate`."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    preset, config_path = _pre_parse(argv)
    if preset not in PRESETS:
        raise UserError(f"--preset {preset}: unknown preset. Choose one of: {', '.join(PRESETS)}.")
    defaults = dict(PRESETS[preset], preset=preset)
    if config_path is not None:
        yaml_values = load_yaml_options(config_path)
        if "preset" in yaml_values and yaml_values["preset"] != preset and "--preset" not in argv:
            preset = yaml_values["preset"]
            if preset not in PRESETS:
                raise UserError(f"--config {config_path}: unknown preset {preset!r}. Choose one of: {', '.join(PRESETS)}.")
            defaults = dict(PRESETS[preset], preset=preset)
        yaml_values.pop("preset", None)
        defaults.update(yaml_values)
        defaults["config"] = config_path

    parser = _ArgumentParser().parser
    parser.set_defaults(**defaults)
    config, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        raise UserError(f"unrecognized option(s): {' '.join(unknown)}. Run `train_ddpm.py --help` for the options.")
    validate(config)
    return config


def config_from_dict(values: dict[str, Any]) -> TrainingConfig:
    """Build a config in code (tests, notebooks): preset defaults <- `values`."""
    unknown = sorted(set(values) - _FIELD_NAMES)
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(unknown)}.")
    preset = values.get("preset", "cifar10")
    if preset not in PRESETS:
        raise UserError(f"preset {preset!r}: unknown preset. Choose one of: {', '.join(PRESETS)}.")
    config = TrainingConfig(**{**PRESETS[preset], "preset": preset, **values})
    validate(config)
    return config


def validate(config: TrainingConfig) -> None:
    """Range checks that do not need the data or the process group."""
    positive = ["train_batch_size", "gradient_accumulation_steps", "max_train_steps", "num_train_timesteps", "resolution", "logging_steps", "sample_steps", "num_sample_images"]
    for name in positive:
        if getattr(config, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(config, name)}.")
    non_negative = ["sample_every", "checkpoint_every", "save_every", "push_every", "eval_every", "lr_warmup_steps", "max_grad_norm", "weight_decay"]
    for name in non_negative:
        if getattr(config, name) < 0:
            raise UserError(f"--{name} must be >= 0 (0 turns it off), got {getattr(config, name)}.")
    if not 0.0 <= config.ema_decay < 1.0:
        raise UserError(f"--ema_decay must be in [0, 1), got {config.ema_decay}.")
    if not 0.0 < config.beta_start < config.beta_end < 1.0:
        raise UserError(f"need 0 < --beta_start < --beta_end < 1, got {config.beta_start} and {config.beta_end}.")
    if config.sample_steps > config.num_train_timesteps:
        raise UserError(f"--sample_steps {config.sample_steps} exceeds --num_train_timesteps {config.num_train_timesteps}.")
    if config.checkpoints_total_limit is not None and config.checkpoints_total_limit < 1:
        raise UserError("--checkpoints_total_limit must be at least 1 (or left unset to keep all).")
    if config.output_dir is None:
        raise UserError("--output_dir is required.")
