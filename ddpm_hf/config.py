"""Every hyper-parameter of a training run, as plain data.

Precedence, lowest first: the dataclass defaults, the chosen `--preset`, a `--config file.yaml`,
then command-line flags. `parse_training_config()` applies it; `TrainingConfig.to_json_dict()` is what
lands in `OUTPUT_DIR/training_config.json` (the Hub token never does).

Everything known about an option sits on its field (see `option`): the help text, the bounds of a number,
whether a continued run may change it, and what kind of path it names. `validate()`, `non_resumable_changes()`
and the README's table (scripts/options_table.py) read it from there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from .arguments import Bounds, writable_location_problem
from .errors import UserError
from .models import LEARNED_VARIANCES, output_channels
from .sampling import SAMPLER_CHOICES

# A dataset name starting with this prefix is a file shipped inside the package (see ddpm_hf/assets/).
BUILTIN_DATASET_PREFIX = "builtin:"


# The kinds of path an option can name. validate() checks "file" (must exist) and "output" (a folder that exists
# or can be created, without creating it); the data, model and checkpoint code check the other kinds when they load.
PATH_KINDS = ("file", "output", "dataset", "pipeline", "checkpoint")

SEED_MAX = 2**32 - 1  # numpy's (hence accelerate's set_seed) limit


def resolved_loss(config: TrainingConfig) -> str:
    """The objective of a run: --loss, with 'auto' read as hybrid for learned variances and simple for fixed ones."""
    if config.loss != "auto":
        return config.loss
    return "hybrid" if config.variance_type in LEARNED_VARIANCES else "simple"


def option(
    help: str,
    *,
    default: Any,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    resumable: bool = False,
    path: str | None = None,
) -> Any:
    """A TrainingConfig field and its metadata, all plain data in `field.metadata`:

    help        the --help text (and the README's table)
    gt/ge/lt/le bounds of a number: greater than, greater or equal, less than, less or equal (None: unbounded)
    resumable   True if a run continued in the same OUTPUT_DIR may change it without becoming another run
    path        what kind of path the option names, one of PATH_KINDS, or None
    """
    if (gt is not None and ge is not None) or (lt is not None and le is not None):
        raise ValueError("give at most one lower bound (gt or ge) and one upper bound (lt or le)")
    if path is not None and path not in PATH_KINDS:
        raise ValueError(f"path must be one of {PATH_KINDS}, got {path!r}")
    metadata = {"help": help, "gt": gt, "ge": ge, "lt": lt, "le": le, "resumable": resumable, "path": path}
    return field(default=default, metadata=metadata)


@dataclass
class TrainingConfig:
    # ---- run ------------------------------------------------------------------------------------
    preset: str = option(
        "Defaults to start from: 'cifar10' (the DDPM paper's run), 'iddpm-cifar10' (Improved DDPM's, learned variances) or 'quickstart'.", default="cifar10"
    )
    config: str | None = option("YAML file of options (keys are these option names); flags override it.", default=None, path="file", resumable=True)
    # Resumable: the folder a run continues in is where its checkpoint is read from; a checkpoint may also continue elsewhere.
    output_dir: str | None = option("Where the pipeline, samples, checkpoints and logs go (default: per preset).", default=None, path="output", resumable=True)
    overwrite: bool = option("Allow writing into an existing OUTPUT_DIR that holds a run of another configuration.", default=False, resumable=True)
    seed: int = option("Seed for data order, noise, timesteps and dropout: the same seed repeats a run.", default=0, ge=0, le=SEED_MAX)

    # ---- data -----------------------------------------------------------------------------------
    dataset: str = option(
        "A Hub dataset id, a folder of parquet files, an image folder, a save_to_disk folder, a parquet file, "
        "or builtin:cifar10-1k (the CIFAR-10 subset shipped with the package).",
        default="uoft-cs/cifar10",
        path="dataset",
    )
    dataset_config: str | None = option("Configuration name of a Hub dataset, if it has several.", default=None)
    split: str = option("Dataset split to train on.", default="train")
    image_column: str | None = option("Column holding the images (default: 'img', 'image', or the only Image column).", default=None)
    resolution: int = option("Training resolution: images are resized on the short side, then center-cropped.", default=32, ge=1)
    random_flip: bool = option("Random horizontal flips (the paper uses them for CIFAR-10).", default=True)
    max_train_samples: int | None = option("Use only the first N images (for quick experiments).", default=None, ge=1)
    on_corrupt_image: Literal["error", "skip"] = option("An image that cannot be decoded: stop naming its row, or skip it and count.", default="error")
    class_conditional: bool = option(
        "Train a class-conditional model with classifier-free guidance (Ho & Salimans 2022) on the dataset's labels: the UNet gets "
        "num_class_embeds = classes + 1, the last being the null label; class names are saved with the pipeline.",
        default=False,
    )
    label_column: str | None = option("Column holding the class labels (default: 'label', or the only ClassLabel column).", default=None)
    label_dropout: float = option(
        "With --class_conditional: the probability p_uncond that a training label is replaced by the null label, which teaches the "
        "unconditional model that guidance needs (Ho & Salimans 2022: 0.1 to 0.2).",
        default=0.1,
        ge=0,
        lt=1,
    )

    # ---- model and noise schedule ---------------------------------------------------------------
    model: str = option(
        "UNet architecture: 'ddpm-cifar10' (35.7M parameters, the paper's), 'iddpm-cifar10' (52.5M, Improved DDPM's) or 'tiny' (~0.9M).",
        default="ddpm-cifar10",
    )
    model_config: str | None = option("JSON file of UNet2DModel arguments; replaces --model.", default=None, path="file")
    dropout: float | None = option(
        "Dropout in the UNet's residual blocks (default: the architecture's own, or that of the --init_from model).", default=None, ge=0, lt=1
    )
    init_from: str | None = option(
        "Start from the UNet weights of a saved pipeline (folder or Hub id), e.g. to fine-tune; it trains with dropout on, at --resolution, "
        "which becomes its saved sample_size.",
        default=None,
        path="pipeline",
    )
    num_train_timesteps: int = option("T, the number of diffusion steps.", default=1000, ge=1)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"] = option(
        "Noise schedule: 'linear' (the paper) or 'squaredcos_cap_v2' (cosine, Nichol & Dhariwal 2021).", default="linear"
    )
    beta_start: float = option("beta_1 of the linear schedule.", default=1e-4, gt=0, lt=1)
    beta_end: float = option("beta_T of the linear schedule.", default=0.02, gt=0, lt=1)
    variance_type: Literal["fixed_large", "fixed_small", "learned_range", "learned"] = option(
        "Reverse-process variance: sigma_t^2 = beta_t (large), beta-tilde_t (small), or learned_range: learned between the two "
        "(Nichol & Dhariwal 2021, Eq. 15): the UNet then outputs twice the image's channels, mean part then v. 'learned' (the variance itself) is refused.",
        default="fixed_large",
    )
    loss: Literal["auto", "simple", "hybrid", "vlb"] = option(
        "Objective: 'simple' is L_simple (Ho et al. 2020, Eq. 14); 'hybrid' is L_simple + vlb_weight x L_vlb (Nichol & Dhariwal 2021, Eq. 16); "
        "'vlb' is L_vlb alone with importance-sampled t (their Eq. 17; its per-process history is not checkpointed: a resumed run restarts "
        "its uniform warm-up). 'auto': hybrid for learned_range, simple for fixed variances.",
        default="auto",
    )
    vlb_weight: float = option(
        "lambda of the hybrid loss, the weight of L_vlb (bits/dim) against L_simple (Nichol & Dhariwal 2021: 0.001). Learned variances only.",
        default=0.001,
        ge=0,
    )
    clip_sample: bool = option("Clip the predicted x_0 to [-1, 1] when sampling.", default=True)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = option("What the network predicts: the noise (paper), v, or x_0.", default="epsilon")
    timestep_spacing: Literal["leading", "trailing", "linspace"] = option("How sampling picks K of the T timesteps.", default="leading")

    # ---- optimisation ---------------------------------------------------------------------------
    train_batch_size: int = option("GLOBAL batch per optimizer step, over all processes and accumulation steps.", default=128, ge=1)
    gradient_accumulation_steps: int = option("Micro-batches per optimizer step.", default=1, ge=1)
    learning_rate: float = option("Peak learning rate.", default=2e-4, gt=0)
    lr_scheduler: Literal["constant_with_warmup", "linear", "cosine", "constant", "cosine_with_restarts", "polynomial"] = option(
        "Learning-rate schedule, counted in optimizer steps.", default="constant_with_warmup"
    )
    lr_warmup_steps: int = option("Optimizer steps of linear warm-up.", default=5000, ge=0)
    adam_beta1: float = option("Adam beta_1.", default=0.9, ge=0, lt=1)
    adam_beta2: float = option("Adam beta_2.", default=0.999, ge=0, lt=1)
    adam_epsilon: float = option("Adam epsilon.", default=1e-8, gt=0)
    weight_decay: float = option("Decoupled weight decay (AdamW); 0 is the paper's Adam.", default=0.0, ge=0)
    max_grad_norm: float = option("Clip the gradient norm to this (0 turns clipping off).", default=1.0, ge=0)
    max_train_steps: int = option("Optimizer steps to train for.", default=800_000, ge=1, resumable=True)
    mixed_precision: Literal["no", "fp16", "bf16"] | None = option(
        "Autocast precision; weights and EMA stay in float32. Unset: Accelerate's configuration decides (`accelerate config`, "
        "`accelerate launch --mixed_precision`), else no; training_config.json records the value used.",
        default=None,
    )
    use_ema: bool = option("Keep an exponential moving average of the weights; samples and the saved pipeline use it.", default=True)
    ema_decay: float = option("EMA decay (the paper: 0.9999).", default=0.9999, ge=0, lt=1)
    ema_warmup: bool = option("Ramp the EMA decay up as 1 - (1 + step/inv_gamma)^-power instead of a fixed decay.", default=False)
    ema_inv_gamma: float = option("inv_gamma of the EMA warm-up.", default=1.0, gt=0)
    ema_power: float = option("power of the EMA warm-up.", default=0.75, gt=0)
    skip_nonfinite_loss: bool = option(
        "On a NaN/inf loss (on any process), skip the whole optimizer step on every process and count it instead of stopping.",
        default=False,
        resumable=True,  # the fix that a run stopped by a NaN loss may resume with
    )

    # ---- speed ----------------------------------------------------------------------------------
    compile: Literal["auto", "yes", "no"] = option("torch.compile the UNet: 'auto' compiles on CUDA only.", default="auto", resumable=True)
    channels_last: Literal["auto", "yes", "no"] = option("channels_last memory format: 'auto' uses it on CUDA only.", default="auto", resumable=True)
    max_in_memory_gb: float = option(
        "The most GB of decoded images a process copies to its device (also at most half the device's free memory; "
        "else batches are gathered from the memory-mapped cache), or holds in memory when the cache cannot be written.",
        default=8.0,
        gt=0,
        resumable=True,
    )

    # ---- logging, samples, checkpoints ----------------------------------------------------------
    report_to: Literal["tensorboard", "wandb", "all", "none"] = option(
        "Where scalars and sample grids are logged, through Accelerate's trackers ('all': TensorBoard and W&B); --logger is the same.",
        default="tensorboard",
        resumable=True,
    )
    logging_dir: str = option("Tracker logs, relative to OUTPUT_DIR (or absolute).", default="logs", resumable=True)
    logging_steps: int = option("Log loss, lr, grad norm and img/s every N optimizer steps (one host sync per N).", default=50, ge=1, resumable=True)
    sample_every: int = option("Write a sample grid every N steps (and at the end); 0 turns sampling off.", default=10_000, ge=0, resumable=True)
    sample_steps: int = option("Denoising steps for the sample grid and --eval_every's FID.", default=100, ge=1, resumable=True)
    sample_scheduler: Literal[SAMPLER_CHOICES] = option(
        "Sampler of the grids and of --eval_every's FID (ddpm_hf.sampling.make_sampler): 'auto' is UniPC on 'trailing' timesteps when --sample_steps < T, else DDPM. Briefly trained models look better with ddpm.",
        default="auto",
    )
    num_sample_images: int = option("Images in the sample grid.", default=64, ge=1, resumable=True)
    sample_seed: int = option("Seed of the sample grid, fixed so grids over training are comparable.", default=0, ge=0, le=SEED_MAX)
    checkpoint_every: int = option("Write a resumable checkpoint every N steps; 0 turns checkpoints off.", default=5000, ge=0, resumable=True)
    checkpoints_total_limit: int | None = option("Keep only the newest N checkpoints.", default=3, ge=1, resumable=True)
    resume_from_checkpoint: str | None = option("'latest' or a checkpoint folder to continue from.", default=None, path="checkpoint", resumable=True)
    save_every: int = option("Also save the pipeline every N steps (it is always saved at the end); 0: only at the end.", default=0, ge=0, resumable=True)
    # The diffusers example counts in epochs; these become the step options above once the dataset size is known.
    num_epochs: int | None = option(
        "Train for N epochs: sets --max_train_steps from the dataset size (the diffusers example's option).", default=None, ge=1, resumable=True
    )
    save_images_epochs: int | None = option(
        "A sample grid every N epochs: sets --sample_every (the diffusers example's option).", default=None, ge=1, resumable=True
    )
    save_model_epochs: int | None = option(
        "Save the pipeline every N epochs: sets --save_every (the diffusers example's option).", default=None, ge=1, resumable=True
    )

    # ---- Hub ------------------------------------------------------------------------------------
    push_to_hub: bool = option("Push the pipeline and a model card to the Hub (checked before training starts).", default=False, resumable=True)
    hub_model_id: str | None = option("Hub repo to push to, 'user/name' (default: your namespace / the output folder name).", default=None, resumable=True)
    hub_private_repo: bool = option("Create the Hub repo as private.", default=False, resumable=True)
    hub_token: str | None = option("Hub token (default: HF_TOKEN or `hf auth login`). Never written to disk.", default=None, resumable=True)
    push_every: int = option("Push in the background every N steps; 0: only at the end.", default=0, ge=0, resumable=True)

    # ---- evaluation during training -------------------------------------------------------------
    eval_every: int = option(
        "Compute FID of the EMA model every N steps and keep the best pipeline in OUTPUT_DIR/best/; 0: never.", default=0, ge=0, resumable=True
    )
    eval_num_samples: int = option("Generated images per FID evaluation during training (FID needs at least 2).", default=10_000, ge=2, resumable=True)

    # ---- processes ------------------------------------------------------------------------------
    ddp_timeout: int = option(
        "Seconds a process waits in a collective for the others (one died or hangs) before the run exits non-zero; checkpoints stay usable.",
        default=1800,
        ge=1,
        resumable=True,
    )

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
    # Nichol & Dhariwal (2021), improved-diffusion's CIFAR-10 flags: --num_channels 128 --num_res_blocks 3 --learn_sigma True
    # --dropout 0.3 --diffusion_steps 4000 --noise_schedule cosine --lr 1e-4 --batch_size 128, and their defaults: attention
    # at 16x16 and 8x8 with 4 heads, scale-shift norm, L_hybrid with lambda = 0.001 (Eq. 16), Adam without warm-up, weight
    # decay or gradient clipping, EMA 0.9999, no flips; 500k steps. What UNet2DModel cannot match: README.md.
    "iddpm-cifar10": dict(
        output_dir="iddpm-cifar10",
        model="iddpm-cifar10",
        num_train_timesteps=4000,
        beta_schedule="squaredcos_cap_v2",
        variance_type="learned_range",
        loss="hybrid",
        vlb_weight=0.001,
        learning_rate=1e-4,
        lr_scheduler="constant",
        lr_warmup_steps=0,
        max_grad_norm=0.0,
        random_flip=False,
        max_train_steps=500_000,
        # Strided ancestral sampling uses the learned variances (their Sec. 4: 100 steps are near-optimal); DDIM ignores them.
        sample_scheduler="ddpm",
    ),
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
_TYPES = typing.get_type_hints(TrainingConfig)

# Options that existed once, with why they went: a YAML file or a command line that still names one is told so.
# A training_config.json of an older run may hold them too; `non_resumable_changes` ignores them.
REMOVED_OPTIONS: dict[str, str] = {
    "dataloader_num_workers": "the data is decoded into one tensor or memory map and batched by index, without DataLoader workers",
}


def value_type(name: str) -> Any:
    """The type of option `name` without Optional: int, float, bool, str or a Literal[...]."""
    hint = _TYPES[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # Optional[X], or X | None (a UnionType before Python 3.14)
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


def field_bounds(name: str) -> Bounds:
    meta = TrainingConfig.__dataclass_fields__[name].metadata
    return Bounds(gt=meta["gt"], ge=meta["ge"], lt=meta["lt"], le=meta["le"])


def bounds_text(name: str) -> str | None:
    """The valid range of a numeric option as written in messages and the README, e.g. '> 0' or 'in [0, 1)'."""
    return field_bounds(name).text()


def resumable_options() -> set[str]:
    """The options marked resumable=True: a run may continue (or restart in the same OUTPUT_DIR) with other values."""
    return {f.name for f in dataclasses.fields(TrainingConfig) if f.metadata["resumable"]}


def non_resumable_changes(previous: dict[str, Any], current: TrainingConfig) -> list[tuple[str, Any, Any]]:
    """(name, previous value, current value) of every option, by name, that `current` sets differently from
    `previous` (a saved training_config.json, or a checkpoint's `fixed_options`) and that a continued run may not
    change. Keys of `previous` that are no option (any more) are ignored, and so are options that `previous` lacks
    (a run of an older version, which had no such option: its behaviour was the default's)."""
    changes = []
    for name, value in sorted(fixed_options(current).items()):
        if name in previous and previous[name] != value:
            changes.append((name, previous[name], value))
    return changes


def fixed_options(config: TrainingConfig) -> dict[str, Any]:
    """The options a continued run may not change (resumable=False), as training_config.json writes them: a
    checkpoint records them, and resuming from it checks them (`non_resumable_changes`)."""
    return {name: value for name, value in config.to_json_dict().items() if not TrainingConfig.__dataclass_fields__[name].metadata["resumable"]}


def _check_option_names(names: Any, where: str) -> None:
    """Refuse removed and unknown option names; `where` starts the message, e.g. '--config run.yaml: '."""
    for name in sorted(names):
        if name in REMOVED_OPTIONS:
            raise UserError(f"{where}option {name} was removed ({REMOVED_OPTIONS[name]}). Delete it.")
    unknown = sorted(set(names) - _FIELD_NAMES)
    if unknown:
        raise UserError(f"{where}unknown option(s) {', '.join(unknown)}. See `train_ddpm.py --help` for the names.")


def load_yaml_options(path: str) -> dict[str, Any]:
    """Read a YAML file of options; unknown or removed keys and invalid YAML are `UserError`s."""
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
    from .diffusers_example_options import translate_keys

    values = translate_keys(values)
    _check_option_names([str(k) for k in values], f"--config {path}: ")
    for name, value in values.items():
        # YAML 1.1 reads a bare yes/no as true/false: give an option whose choices are words its word back.
        choices = typing.get_args(value_type(name)) if typing.get_origin(value_type(name)) is Literal else ()
        if isinstance(value, bool) and ("yes" if value else "no") in choices:
            values[name] = "yes" if value else "no"
    return values


def _preset_defaults(preset: Any, where: str) -> dict[str, Any]:
    """The options preset `preset` sets, with its name; `where` starts the message of an unknown one."""
    if not isinstance(preset, str) or preset not in PRESETS:
        raise UserError(f"{where}{preset!r}: unknown preset. Choose one of: {', '.join(PRESETS)}.")
    return dict(PRESETS[preset], preset=preset)


def _pre_parse(argv: list[str]) -> tuple[str, str | None]:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset", default="cifar10")
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    return known.preset, known.config


def _argument_parser() -> argparse.ArgumentParser:
    """`transformers.HfArgumentParser` of TrainingConfig whose errors are one-line `UserError`s (exit 2)."""
    from transformers import HfArgumentParser

    # HfArgumentParser passes every metadata key of a field to argparse's add_argument, which knows `help` but
    # not our bounds: it gets a copy of TrainingConfig whose fields carry the help text only.
    flags = dataclasses.make_dataclass(
        "TrainingConfigFlags",
        [(f.name, _TYPES[f.name], field(default=f.default, metadata={"help": f.metadata["help"]})) for f in dataclasses.fields(TrainingConfig)],
    )
    parser = HfArgumentParser(
        flags,
        prog="train_ddpm.py",
        allow_abbrev=False,
        description="Train a DDPM (Ho et al. 2020) with Accelerate; the result loads with DDPMPipeline.from_pretrained.",
    )

    def error(message: str):
        raise UserError(f"{message}. Run `train_ddpm.py --help` for the options.")

    parser.error = error
    return parser


def parse_training_config(argv: list[str] | None = None) -> TrainingConfig:
    """Defaults <- preset <- YAML <- flags, then `validate`."""
    import sys

    from .diffusers_example_options import translate_flags

    argv = translate_flags(list(sys.argv[1:] if argv is None else argv))
    preset, config_path = _pre_parse(argv)
    defaults = _preset_defaults(preset, "--preset ")
    if config_path is not None:
        yaml_values = load_yaml_options(config_path)
        if "preset" in yaml_values and yaml_values["preset"] != preset and "--preset" not in argv:
            defaults = _preset_defaults(yaml_values["preset"], f"--config {config_path}: preset ")
        yaml_values.pop("preset", None)
        defaults.update(yaml_values)
        defaults["config"] = config_path

    parser = _argument_parser()
    parser.set_defaults(**defaults)
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [s.split("=", 1)[0][2:].replace("-", "_") for s in unknown if s.startswith("--")]
        _check_option_names([name for name in flags if name in REMOVED_OPTIONS], "")
        raise UserError(f"unrecognized option(s): {' '.join(unknown)}. Run `train_ddpm.py --help` for the options.")
    config = TrainingConfig(**vars(namespace))
    validate(config)
    return config


def config_from_dict(values: dict[str, Any]) -> TrainingConfig:
    """Build a config in code (tests, notebooks): preset defaults <- `values`."""
    _check_option_names(values, "")
    config = TrainingConfig(**{**_preset_defaults(values.get("preset", "cifar10"), "preset "), **values})
    validate(config)
    return config


def _check_output_dir(path: str) -> None:
    """OUTPUT_DIR is a folder we can write into, or can be made. Creates nothing."""
    problem = writable_location_problem(path, folder=True)
    if problem:
        raise UserError(f"--output_dir {problem}. Choose a folder you can write to.")


def validate(config: TrainingConfig) -> None:
    """Check every option against its field's metadata (type, choices, bounds, paths), then the rules between
    options. Needs neither the data nor the process group, and writes nothing."""
    for f in dataclasses.fields(TrainingConfig):
        name, value, meta, kind = f.name, getattr(config, f.name), f.metadata, value_type(f.name)
        if value is None and type(None) in typing.get_args(_TYPES[name]):  # an Optional option left unset
            continue
        if typing.get_origin(kind) is Literal:
            choices = typing.get_args(kind)
            if not isinstance(value, str) or value not in choices:
                raise UserError(f"--{name} {value!r}: invalid choice. Choose one of: {', '.join(choices)}.")
        elif kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise UserError(f"--{name} must be a whole number, got {value!r}.")
        elif kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise UserError(f"--{name} must be a finite number, got {value!r}.")
        elif kind is bool and not isinstance(value, bool):
            raise UserError(f"--{name} must be true or false, got {value!r}.")
        elif kind is str and not isinstance(value, str):  # flags are always text; a YAML file gives numbers, lists and null their own types
            raise UserError(f"--{name} must be text, got {value!r} ({type(value).__name__}). {_text_fix(name, value)}")
        if kind in (int, float) and not field_bounds(name).contains(value):
            raise UserError(f"--{name} must be {bounds_text(name)}, got {value}.")
        if meta["path"] == "file" and not (isinstance(value, str) and os.path.isfile(value)):
            raise UserError(f"--{name} {value}: no such file. Give the path of an existing file.")

    if not config.output_dir:
        raise UserError("--output_dir is required.")
    _check_output_dir(config.output_dir)
    if not config.beta_start < config.beta_end:
        raise UserError(f"need 0 < --beta_start < --beta_end < 1, got {config.beta_start} and {config.beta_end}.")
    _check_objective(config)
    if not config.class_conditional and (config.label_column is not None or config.label_dropout != TrainingConfig.label_dropout):
        given = "--label_column" if config.label_column is not None else "--label_dropout"
        raise UserError(f"{given} only applies to class-conditional training: add --class_conditional, or drop {given}.")
    if config.sample_steps > config.num_train_timesteps:
        raise UserError(f"--sample_steps {config.sample_steps} exceeds --num_train_timesteps {config.num_train_timesteps}.")
    if config.report_to in ("wandb", "all") and config.hub_token is not None:
        raise UserError(
            "--report_to wandb with --hub_token would send the token to Weights & Biases with the run's options. "
            "Log in with `hf auth login` (or set HF_TOKEN) instead of --hub_token."
        )
    if config.sample_every or config.eval_every:  # the grids and FID sample through the one sampler factory: its refusals, now
        from .models import build_scheduler
        from .sampling import make_sampler, resolve_sampler

        resolve_sampler(config.sample_scheduler, config.sample_steps, config.num_train_timesteps, option="--sample_scheduler")
        make_sampler(build_scheduler(config), config.sample_scheduler, config.sample_steps)


def _text_fix(name: str, value: Any) -> str:
    """How to write `value` as the text option `name` in a YAML file."""
    if isinstance(value, bool):
        return "In a YAML file, quote it: unquoted yes, no, true and false are booleans there."
    if isinstance(value, (int, float)):
        return f'In a YAML file, quote it: {name}: "{value}".'
    if value is None:
        return f"Give it a value, or leave {name} out for the default."
    return f"Give one text value, not a {type(value).__name__}."


def _check_objective(config: TrainingConfig) -> None:
    """The variance type, the loss and the network's output channels must fit together (Nichol & Dhariwal 2021, Sec. 3.1)."""
    if config.variance_type == "learned":
        raise UserError(
            "--variance_type learned (the network outputs sigma_t^2 itself, unbounded) is not trainable here. "
            "Use --variance_type learned_range: log sigma_t^2 interpolated between log beta_t and log beta-tilde_t (Nichol & Dhariwal 2021, Eq. 15)."
        )
    learned, loss = config.variance_type in LEARNED_VARIANCES, resolved_loss(config)
    if learned and loss == "simple":
        raise UserError(
            f"--loss simple with --variance_type {config.variance_type}: L_simple does not depend on the variance, which would stay untrained. "
            "Use --loss hybrid (or vlb), or a fixed variance."
        )
    if not learned and loss in ("hybrid", "vlb"):
        raise UserError(
            f"--loss {loss} trains a learned variance, but --variance_type is {config.variance_type}. "
            "Add --variance_type learned_range, or use --loss simple (the same as hybrid for a fixed variance)."
        )
    if learned and loss == "hybrid" and config.vlb_weight == 0:
        raise UserError(
            f"--vlb_weight 0 with --variance_type {config.variance_type}: only L_vlb trains the variance, which would stay untrained. "
            "Use a positive weight (the paper's: 0.001)."
        )
    if config.model_config is not None:
        channels = _model_config_channels(config.model_config)
        if channels is not None and channels[1] != output_channels(channels[0], config.variance_type):
            in_channels, out_channels = channels
            raise UserError(
                f"--model_config {config.model_config} has out_channels {out_channels}, but --variance_type {config.variance_type} needs "
                f"{output_channels(in_channels, config.variance_type)} ({in_channels} for a fixed variance, {2 * in_channels} for learned_range: mean, then v). "
                "Fix out_channels or --variance_type."
            )


def _model_config_channels(path: str) -> tuple[int, int] | None:
    """(in_channels, out_channels) of a --model_config JSON file (UNet2DModel's default is 3 for both); None if it cannot
    be read, which `models.unet_arguments` reports."""
    try:
        with open(path) as f:
            values = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(values, dict):
        return None
    return values.get("in_channels", 3), values.get("out_channels", 3)
