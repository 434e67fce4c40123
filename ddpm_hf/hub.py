"""Share a trained pipeline on the Hugging Face Hub: what is uploaded, the model card, and the pusher.

What goes up is what a user needs to load and judge the model, and nothing else (`ALLOWED`): the pipeline
(`model_index.json`, `unet/`, `scheduler/`), the model card `README.md`, the latest sample grid,
`training_config.json`, `eval.json` when an evaluation has run, the custom pipeline file `ddpm_trajectory.py`,
and, for a class-conditional run, the pipeline file its `model_index.json` names, `ddpm_class_conditional.py`
(both from the package: `conditioning.packaged_pipeline_file`). Checkpoints, optimizer state, logs and tokens
never leave the machine, and neither do the machine's paths: `training_config.json`, `eval.json` and the card
carry only the names of local files and folders (`public_training_config`, `public_eval`). A push makes the
repo's `ALLOWED` files exactly those of the run pushed: an unconditional run pushed over a conditional one
removes `ddpm_class_conditional.py`.

An unconditional run's repo stays a stock diffusers repo: `DDPMPipeline.from_pretrained("user/name")` and
`DDIMPipeline.from_pretrained("user/name")` load it with no extra code, and
`DiffusionPipeline.from_pretrained("user/name", custom_pipeline="ddpm_trajectory", trust_remote_code=True)`
loads the trajectory pipeline shipped beside it (diffusers looks for `<custom_pipeline>.py` in the repo and
loads it at the same revision as the weights). A class-conditional run's repo (conditioning.py) loads only with
its own pipeline, `DiffusionPipeline.from_pretrained("user/name", custom_pipeline="ddpm_class_conditional",
trust_remote_code=True)`; stock `DDPMPipeline.from_pretrained` refuses it, and its card says so.

`HubPusher` is what training and `ddpm-hf push` use:

    pusher = HubPusher(repo_id, token, private, output_dir)
    pusher.check()                  # before the first training step: token, repo id, create the repo
    pusher.push_in_background(step) # every --push_every steps, after saving the pipeline: never waits on the network
    pusher.push_final(step)         # at the end: blocking, retried; a failure, Ctrl-C or SIGTERM is a `UserError`

The run folder's file names and the reading of its JSON files belong to `run_folder.RunFolder`.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import logging
import os
import re
import shlex
import shutil
import signal
import struct
import tempfile
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from .arguments import existing_folder, is_hub_id, last_part, local_path_name
from .conditioning import (
    CONDITIONAL_PIPELINE_CLASS,
    CONDITIONAL_PIPELINE_FILENAME,
    CONDITIONAL_PIPELINE_NAME,
    MODEL_INDEX,
    class_names_of,
    is_conditional_index,
    packaged_pipeline_file,
)
from .errors import UserError
from .run_folder import EVAL_FILE, SAMPLE_GRID_GLOB, TRAINING_CONFIG, RunFolder, read_json

logger = logging.getLogger(__name__)

# The custom pipeline ships at the repo root under this name, so that
# `DiffusionPipeline.from_pretrained(repo, custom_pipeline=CUSTOM_PIPELINE_NAME, trust_remote_code=True)` finds it.
CUSTOM_PIPELINE_NAME = "ddpm_trajectory"
CUSTOM_PIPELINE_FILENAME = f"{CUSTOM_PIPELINE_NAME}.py"
CUSTOM_PIPELINE_CLASS = "DDPMTrajectoryPipeline"

# Everything a push may put in the repo. A push deletes from the repo every file matching these that it does not
# upload itself (an older sample grid, the eval.json of another run), and leaves other files alone.
ALLOWED = (
    "model_index.json",
    "unet/config.json",
    "unet/*.safetensors",
    "unet/*.safetensors.index.json",
    "scheduler/scheduler_config.json",
    "README.md",
    SAMPLE_GRID_GLOB,
    TRAINING_CONFIG,
    EVAL_FILE,
    CUSTOM_PIPELINE_FILENAME,
    CONDITIONAL_PIPELINE_FILENAME,  # class-conditional runs only: a later unconditional push deletes it
)

# The files `save_pretrained` writes that a pipeline cannot load without.
REQUIRED = ("model_index.json", "unet/config.json", "unet/*.safetensors", "scheduler/scheduler_config.json")

# The hub datasets that our built-in datasets are subsets of, for the card's `datasets` metadata.
BUILTIN_DATASET_SOURCES = {"builtin:cifar10-1k": "uoft-cs/cifar10"}

# The machine's paths stay on the machine. In training_config.json and eval.json, the values of the *_LOCAL_KEYS
# are always files or folders there: only their last part goes up. The values of the *_HUB_OR_LOCAL_KEYS are a
# Hub id, a local path or a plain name (`cifar10-train`): a local path goes up as LOCAL_PREFIX + its last part, so
# that nobody takes it for a Hub id. Paths in any other text go the same way.
CONFIG_LOCAL_KEYS = ("output_dir", "config", "model_config", "resume_from_checkpoint", "logging_dir")
CONFIG_HUB_OR_LOCAL_KEYS = ("dataset", "init_from")
EVAL_LOCAL_KEYS = ("file",)
EVAL_HUB_OR_LOCAL_KEYS = ("model", "reference", "spec", "dataset", "source")
LOCAL_PREFIX = "local:"

DEFAULT_LICENSE = "apache-2.0"
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
DEFAULT_REPO_NAME = "ddpm"  # when nothing of the output folder's name is usable

# "namespace/name" with the characters the Hub allows; `hub_id` adds the rest of the rules.
# A word of free text that may be a path: it holds a slash, a backslash or a ~.
_PATH_TOKEN = re.compile(r"[^\s()\[\]{},;'\"`]*[/\\~][^\s()\[\]{},;'\"`]*")


# ---- what is uploaded -----------------------------------------------------------------------------


def default_custom_pipeline_file() -> Path | None:
    """The custom pipeline file `ddpm_trajectory.py` of the package (`conditioning.packaged_pipeline_file`:
    `ddpm_hf/pipelines/` in an installed wheel, `pipelines/` in a checkout); None if it has none."""
    return packaged_pipeline_file(CUSTOM_PIPELINE_FILENAME)


def is_conditional_folder(output_dir: str | os.PathLike) -> bool:
    """Whether the pipeline in `output_dir` is class-conditional: its model_index.json names ddpm_class_conditional.py."""
    return is_conditional_index(read_json(Path(output_dir) / MODEL_INDEX))


def conditional_pipeline_file(output_dir: str | os.PathLike) -> Path:
    """The `ddpm_class_conditional.py` a push of the class-conditional `output_dir` uploads: the package's, else the
    copy training saved beside the pipeline. `UserError` if neither exists: the repo could not be loaded."""
    found = packaged_pipeline_file(CONDITIONAL_PIPELINE_FILENAME)
    if found is None and (Path(output_dir) / CONDITIONAL_PIPELINE_FILENAME).is_file():
        found = Path(output_dir) / CONDITIONAL_PIPELINE_FILENAME
    if found is None:
        raise UserError(
            f"{output_dir} holds a class-conditional pipeline, but neither it nor the package has {CONDITIONAL_PIPELINE_FILENAME}, "
            "without which the repo cannot be loaded: reinstall ddpm-hf."
        )
    return found


def _local_files(output_dir: Path, custom_pipeline_file: Path | None) -> dict[str, Path]:
    """Repo path -> local file for everything uploaded from disk (the card, README.md, is generated)."""
    files: dict[str, Path] = {}
    for pattern in ALLOWED:
        if pattern in ("README.md", SAMPLE_GRID_GLOB, CUSTOM_PIPELINE_FILENAME, CONDITIONAL_PIPELINE_FILENAME):
            continue
        for path in sorted(output_dir.glob(pattern)):
            if path.is_file():
                files[path.relative_to(output_dir).as_posix()] = path
    sample = RunFolder(output_dir).latest_sample_grid()
    if sample is not None:
        files[Path(sample).relative_to(output_dir).as_posix()] = Path(sample)
    if custom_pipeline_file is not None:
        files[CUSTOM_PIPELINE_FILENAME] = Path(custom_pipeline_file)
    if is_conditional_folder(output_dir):  # the pipeline its model_index.json names
        files[CONDITIONAL_PIPELINE_FILENAME] = conditional_pipeline_file(output_dir)
    return files


def is_allowed(repo_path: str) -> bool:
    """Whether `repo_path` is one of the files a push manages (`ALLOWED`)."""
    return any(fnmatch.fnmatchcase(repo_path, pattern) for pattern in ALLOWED)


def files_to_upload(output_dir: str | os.PathLike, custom_pipeline_file: str | os.PathLike | None = None) -> list[str]:
    """The repo paths a push of `output_dir` uploads, sorted: `ALLOWED` applied to the folder, plus README.md.

    `custom_pipeline_file` defaults to the package's `pipelines/ddpm_trajectory.py`. A class-conditional folder
    also uploads `ddpm_class_conditional.py` (`conditional_pipeline_file`).
    """
    custom = Path(custom_pipeline_file) if custom_pipeline_file is not None else default_custom_pipeline_file()
    return sorted([*_local_files(Path(output_dir), custom), "README.md"])


def check_pipeline_folder(output_dir: str | os.PathLike) -> None:
    """Raise `UserError` unless `output_dir` holds a saved pipeline (what `DDPMPipeline.save_pretrained` writes)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise UserError(f"{output_dir}: no such folder. Give the OUTPUT_DIR of a training run.")
    missing = [pattern for pattern in REQUIRED if not any(p.is_file() for p in output_dir.glob(pattern))]
    if missing:
        raise UserError(
            f"{output_dir} is not a saved pipeline: missing {', '.join(missing)}. Give the OUTPUT_DIR of a finished "
            "training run (the pipeline is saved at the end of training, or every --save_every steps)."
        )


# ---- Hub ids and local paths ----------------------------------------------------------------------


def hub_id(value: Any, run_dir: str | os.PathLike | None = None) -> str | None:
    """`value` if it is a Hub repo id, "namespace/name", and not a path on this machine; else None.

    The one test in this module for "Hub id or local path". `run_dir` is the run folder the value was recorded
    in: a relative path is recognised from it and the folders above it, where training usually ran, so that
    pushing from another folder does not turn `data/imgs` into a Hub id.
    """
    if not isinstance(value, str) or "/" not in value or not is_hub_id(value, run_dir):  # the card wants namespace/name
        return None
    try:
        validate_repo_id(value)
    except HFValidationError:
        return None
    return value


def _without_paths(values: dict[str, Any], run_dir, local_keys: tuple[str, ...], hub_or_local_keys: tuple[str, ...]) -> dict[str, Any]:
    """A copy of `values` in which the training machine's paths are reduced to their last part (see the keys above)."""

    def public_text(text: str) -> str:
        def replace(match: re.Match) -> str:
            name = local_path_name(match.group(0), run_dir)
            return match.group(0) if name is None else LOCAL_PREFIX + name

        return _PATH_TOKEN.sub(replace, text)

    def public(key: str | None, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: public(k, v) for k, v in value.items() if k != "hub_token"}  # the token never goes up
        if isinstance(value, list):
            return [public(key, v) for v in value]
        if not isinstance(value, str):
            return value
        if key in local_keys:
            return last_part(value)
        if key in hub_or_local_keys and hub_id(value, run_dir) is None:
            name = local_path_name(value, run_dir)
            if name is not None:
                return LOCAL_PREFIX + name
        return public_text(value)

    return public(None, values)


def public_training_config(values: dict[str, Any], run_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """training_config.json as uploaded: `--output_dir /home/me/runs/a` becomes "a", `--dataset data/imgs` (a local
    folder) "local:imgs"; a Hub id stays. `run_dir` is the run folder it was read from. Never the token."""
    return _without_paths(values, run_dir, CONFIG_LOCAL_KEYS, CONFIG_HUB_OR_LOCAL_KEYS)


def public_eval(values: dict[str, Any], run_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """eval.json as uploaded: the evaluated model, the reference and its statistics file without their paths."""
    return _without_paths(values, run_dir, EVAL_LOCAL_KEYS, EVAL_HUB_OR_LOCAL_KEYS)


def _hub_datasets(dataset: str | None, run_dir: str | os.PathLike | None = None) -> list[str]:
    """The Hub dataset ids a training dataset refers to (none for a local folder or file)."""
    if dataset in BUILTIN_DATASET_SOURCES:
        return [BUILTIN_DATASET_SOURCES[dataset]]
    found = hub_id(dataset, run_dir)
    return [found] if found is not None else []


# ---- model card -----------------------------------------------------------------------------------


def count_parameters(unet_dir: str | os.PathLike) -> int:
    """Parameters in the safetensors files of `unet_dir`, from their headers (no weights are read)."""
    total = 0
    for path in sorted(Path(unet_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_size))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for dim in info["shape"]:
                    count *= dim
                total += count
    return total


def _architecture(unet: dict) -> str:
    size = unet.get("sample_size")
    channels = tuple(unet.get("block_out_channels", ()))
    attention = []
    resolution = size if isinstance(size, int) else None
    for block in unet.get("down_block_types", ()):
        if "Attn" in block and resolution is not None:
            attention.append(f"{resolution}x{resolution}")
        if resolution is not None:
            resolution //= 2
    text = (
        f"`UNet2DModel`, {size}x{size}x{unet.get('in_channels', 3)} images, channels {channels}, "
        f"{unet.get('layers_per_block')} residual block(s) per resolution"
    )
    text += f", self-attention at {', '.join(attention)}" if attention else ", no self-attention"
    if unet.get("dropout"):
        text += f", dropout {unet['dropout']}"
    return text


def _learns_variance(scheduler: dict) -> bool:
    """Whether the scheduler reads a variance from the UNet's output (2 x C channels: mean part, then v)."""
    return scheduler.get("variance_type") in ("learned_range", "learned")


def _variance_text(scheduler: dict) -> str:
    variance = scheduler.get("variance_type")
    if variance == "learned_range":
        return "variance learned_range (the network's Sigma_theta, between beta-tilde_t and beta_t: Nichol & Dhariwal 2021, Eq. 15)"
    if variance == "learned":
        return "variance learned (the network outputs Sigma_theta itself)"
    return f"variance {variance}"


def _objective(config: dict, scheduler: dict) -> str:
    """The training objective, from training_config.json (`loss`, `vlb_weight`; a run from before they existed trained L_simple)."""
    loss = config.get("loss", "auto")
    if loss == "auto":
        loss = "hybrid" if _learns_variance(scheduler) else "simple"
    if loss == "hybrid":
        return f"L_hybrid = L_simple + lambda L_vlb with lambda = {config.get('vlb_weight')} (Nichol & Dhariwal 2021, Eq. 16)"
    if loss == "vlb":
        return "L_vlb, importance-sampled timesteps (Nichol & Dhariwal 2021, Eq. 17)"
    return "L_simple, the noise-prediction MSE (Ho et al. 2020, Eq. 14)"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "not recorded" if value is None else str(value)


def fid_setup(evaluation: dict[str, Any]) -> str:
    """How a FID of eval.json was measured, e.g. "ddpm 100 steps" (with the network evaluations when they differ,
    and the guidance scale of a class-conditional model's samples: "ddim 50 steps, guidance scale 1.5")."""
    sampler, steps, nfe = evaluation.get("scheduler"), evaluation.get("steps"), evaluation.get("nfe")
    if sampler is None and steps is None:
        text = "sampler not recorded"
    else:
        text = " ".join(part for part in (sampler, f"{steps} steps" if steps is not None else None) if part is not None)
        if nfe is not None and nfe != steps:
            text += f" ({nfe} network evaluations)"
    guidance = evaluation.get("guidance_scale")
    if guidance is not None:
        text += f", guidance scale {guidance:g}" if isinstance(guidance, (int, float)) else f", guidance scale {guidance}"
    return text


# ---- class-conditional models ---------------------------------------------------------------------


def _cell(text: Any) -> str:
    """`text` for one cell of a markdown table: one line, its '|' escaped (class names come from the dataset)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _class_text(class_id: int, names: list[str] | None) -> str:
    """'0 (cat)', or '0' for a model without class names."""
    return f"{class_id} ({_cell(names[class_id])})" if names and class_id < len(names) else str(class_id)


def _classes_section(count: int, names: list[str] | None) -> str:
    null = f"Id {count} is the null label of classifier-free guidance, not a class."
    if not names:
        return f"## Classes\n\n{count} classes: ids 0..{count - 1}, no names (the training labels were bare integers). {null}"
    rows = "\n".join(f"| {i} | {_cell(name)} |" for i, name in enumerate(names))
    return f"## Classes\n\n{count} classes; `class_labels` takes a name or an id. {null}\n\n| Id | Name |\n|---|---|\n{rows}"


def _example_labels(count: int, names: list[str] | None) -> list[int | str]:
    """The classes the card's usage samples: the model's first two names, or ids 0 and 1 when it has none."""
    return list(names[:2]) if names else list(range(min(2, count)))


def _cli_class_labels(count: int, names: list[str] | None) -> str:
    """`--class_labels` of the same classes for `ddpm-hf sample` (which splits at commas): a name it could not read
    back is given by id."""
    labels = [
        label if isinstance(label, str) and "," not in label and label == label.strip() and label else str(i)
        for i, label in enumerate(_example_labels(count, names))
    ]
    return shlex.quote(",".join(labels))


def _per_class_fid_rows(per_class: dict[str, Any], names: list[str] | None) -> list[tuple[str, str]]:
    """(class, FID) cells of eval.json's `per_class_fid` (keyed by class name or id), by class id; other keys last."""
    lookup = {name: i for i, name in enumerate(names or [])}
    keyed = []
    for key, value in per_class.items():
        class_id = lookup.get(str(key))
        if class_id is None and str(key).strip().isdigit():
            class_id = int(str(key).strip())
        fid = f"{float(value):.2f}" if isinstance(value, (int, float)) else "not recorded"
        text = _class_text(class_id, names) if class_id is not None else _cell(key)
        keyed.append(((class_id is None, class_id if class_id is not None else 0, str(key)), text, fid))
    return [(text, fid) for _, text, fid in sorted(keyed)]


def _dataset_text(dataset: Any, hub_datasets: list[str]) -> str:
    if isinstance(dataset, str) and dataset.startswith(LOCAL_PREFIX):
        return f"`{dataset[len(LOCAL_PREFIX) :]}` (a local dataset, not on the Hub)"
    if isinstance(dataset, str) and dataset in hub_datasets:
        return f"[`{dataset}`](https://huggingface.co/datasets/{dataset})"
    return f"`{dataset}`"


def load_arguments(repo_id: str, revision: str | None = None) -> str:
    """The arguments of `from_pretrained` that load `repo_id` at `revision`: '"user/name", revision="dev"'."""
    return f'"{repo_id}"' + (f', revision="{revision}"' if revision and revision != "main" else "")


def build_model_card(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    step: int | None = None,
    hardware: str | None = None,
    license: str = DEFAULT_LICENSE,
    custom_pipeline: bool = True,
    revision: str | None = None,
    run_dir: str | os.PathLike | None = None,
) -> ModelCard:
    """The model card (README.md) of the pipeline in `output_dir` as pushed to `repo_id` at `revision`.

    Reads `unet/config.json`, `scheduler/scheduler_config.json`, `model_index.json`, training_config.json and
    eval.json when present, without the machine's paths (`public_training_config`, `public_eval`). `step` is the
    training step of the weights (default: the step eval.json's FID was measured at, as in best/, else the
    configured `max_train_steps`); `hardware` is a free text such as "1 x NVIDIA A100". `run_dir` is where the run
    folder lives when `output_dir` is a snapshot of it. `custom_pipeline`: the repo holds ddpm_trajectory.py.

    A class-conditional model (its model_index.json names ddpm_class_conditional.py) gets a card of its own: its
    classes, the grid's rows, usage through that pipeline with classifier-free guidance, and no stock
    `DDPMPipeline` or trajectory-pipeline usage, neither of which can run it.
    """
    output_dir = Path(output_dir)
    run_dir = Path(run_dir) if run_dir is not None else output_dir
    folder = RunFolder(output_dir)
    unet = read_json(output_dir / "unet" / "config.json") or {}
    scheduler = read_json(output_dir / "scheduler" / "scheduler_config.json") or {}
    index = read_json(output_dir / MODEL_INDEX)
    config = public_training_config(folder.read_training_config() or {}, run_dir)
    evaluation = public_eval(folder.read_eval(), run_dir)
    fid = evaluation if "fid" in evaluation else None
    grids = folder.sample_grids()
    datasets = _hub_datasets(config.get("dataset"), run_dir)
    name = repo_id.split("/")[-1]
    load = load_arguments(repo_id, revision)
    learned_variance, channels = _learns_variance(scheduler), unet.get("in_channels", 3)
    conditional = is_conditional_index(index)
    class_names = class_names_of(index) if conditional else None
    if conditional:  # K classes: the UNet's last class embedding is the null label
        embeds = unet.get("num_class_embeds")
        num_classes = embeds - 1 if isinstance(embeds, int) and embeds > 1 else len(class_names or [])

    eval_results = None
    if fid is not None:
        reference = str(fid.get("reference", "unknown"))
        eval_results = [
            EvalResult(
                # The Hub has no class-conditional task; a free task type keeps the result off the unconditional leaderboard.
                task_type="class-conditional-image-generation" if conditional else "unconditional-image-generation",
                task_name="Class-conditional Image Generation" if conditional else "Unconditional Image Generation",
                dataset_type=datasets[0] if datasets else reference,
                dataset_name=reference,
                metric_type="fid",
                metric_name=f"FID ({_count(fid.get('num_samples'))} samples, {fid_setup(fid)})",
                metric_value=float(fid["fid"]),
            )
        ]
    card_data = ModelCardData(
        library_name="diffusers",
        # No Hub pipeline tag fits a class-conditional model (unconditional-image-generation would be wrong): none.
        pipeline_tag=None if conditional else "unconditional-image-generation",
        tags=["ddpm", "diffusers", "pytorch"] + (["class-conditional", "classifier-free-guidance"] if conditional else ["unconditional-image-generation"]),
        datasets=datasets or None,
        license=license,
        model_name=name,
        eval_results=eval_results,
    )

    if step is None and fid is not None and isinstance(fid.get("step"), int):
        step = fid["step"]  # best/: the weights are those the FID was measured on
    steps_text = f"{step:,}" if step is not None else f"{config['max_train_steps']:,} (configured)" if "max_train_steps" in config else "unknown"
    label_dropout = config.get("label_dropout")
    rows = [
        ("Architecture", _architecture(unet) if unet else "`UNet2DModel`"),
        ("Parameters", f"{count_parameters(output_dir / 'unet'):,}"),
        (
            "Scheduler",
            f"`{scheduler.get('_class_name', 'DDPMScheduler')}`, T = {scheduler.get('num_train_timesteps')}, "
            f"{scheduler.get('beta_schedule')} betas {scheduler.get('beta_start')}..{scheduler.get('beta_end')}, "
            f"{_variance_text(scheduler)}, predicts {scheduler.get('prediction_type')}",
        ),
        ("Training steps", steps_text),
    ]
    if conditional:
        rows.append(
            (
                "Conditioning",
                f"{num_classes} classes (`num_class_embeds` = {num_classes + 1}, the last the null label), label dropout p_uncond = {_count(label_dropout)}",
            )
        )
    if config:
        rows += [
            ("Objective", _objective(config, scheduler)),
            (
                "Dataset",
                _dataset_text(config.get("dataset"), datasets)
                + (f" (split {config.get('split')}, {config.get('resolution')}px)" if config.get("split") else ""),
            ),
            ("Batch size", f"{config.get('train_batch_size')} (global)"),
            (
                "Optimizer",
                (f"AdamW (weight decay {config['weight_decay']})" if config.get("weight_decay") else "Adam")
                + f", lr {config.get('learning_rate')}, {config.get('lr_scheduler')} schedule with {config.get('lr_warmup_steps')} warm-up steps",
            ),
            ("EMA", f"decay {config.get('ema_decay')}" if config.get("use_ema") else "off"),
            ("Mixed precision", str(config.get("mixed_precision") or "no")),  # unset: Accelerate's default, no
        ]
    if hardware:
        rows.append(("Hardware", hardware))
    table = "\n".join(["| | |", "|---|---|"] + [f"| {key} | {value} |" for key, value in rows])

    variance_text = (
        " Its UNet also learns the reverse-process variances ([Nichol & Dhariwal, 2021](https://arxiv.org/abs/2102.09672)): "
        f"it outputs {2 * channels} channels, the {scheduler.get('prediction_type')} prediction and then the variance, which `DDPMScheduler` reads."
        if learned_variance
        else ""
    )
    if conditional:
        dropout_text = f"p = {label_dropout}" if label_dropout is not None else "a probability p that was not recorded"
        intro = (
            "A class-conditional denoising diffusion probabilistic model ([Ho et al., 2020](https://arxiv.org/abs/2006.11239)) "
            "with classifier-free guidance ([Ho & Salimans, 2022](https://arxiv.org/abs/2207.12598)), trained with ddpm-hf "
            f"(diffusers + Accelerate) on {num_classes} classes. It was trained with label dropout {dropout_text}: each training "
            "label was replaced by the null label with that probability, so that the one UNet is also the unconditional model "
            f"that guidance mixes in. It runs with the custom pipeline `{CONDITIONAL_PIPELINE_FILENAME}` in this repo (see Usage): "
            "stock diffusers `DDPMPipeline` cannot run it (it has no class labels to give the UNet), and "
            "`DDPMPipeline.from_pretrained` refuses this repo, asking for `trust_remote_code`." + variance_text
        )
    else:
        intro = (
            "A denoising diffusion probabilistic model ([Ho et al., 2020](https://arxiv.org/abs/2006.11239)) for "
            "unconditional image generation, trained with ddpm-hf (diffusers + Accelerate). It is a stock diffusers "
            "`DDPMPipeline`: no code from this repo is needed to use it." + variance_text
        )
    sections = [f"# {name}", intro, "## Training\n\n" + table]
    if conditional:
        sections.append(_classes_section(num_classes, class_names))
    if grids:
        sample_step, sample = grids[-1]
        if conditional:
            order = ", ".join(_class_text(i, class_names) for i in range(num_classes))
            rows_text = f" (plain conditional sampling, guidance scale 1), one row per class, top to bottom: {order}"
        else:
            rows_text = ""
        sections.append(f"## Samples\n\nSamples at training step {sample_step:,}{rows_text}:\n\n![samples]({Path(sample).relative_to(output_dir).as_posix()})")
    cli_revision = f" --revision {revision}" if revision and revision != "main" else ""
    if conditional:
        labels = (
            "["
            + ", ".join(json.dumps(label, ensure_ascii=False) if isinstance(label, str) else str(label) for label in _example_labels(num_classes, class_names))
            + "]"
        )
        usage = (
            "## Usage\n\n```python\nimport torch\nfrom diffusers import DDIMScheduler, DiffusionPipeline\n\n"
            f'pipeline = DiffusionPipeline.from_pretrained({load}, custom_pipeline="{CONDITIONAL_PIPELINE_NAME}", trust_remote_code=True)\n'
            "print(pipeline.class_names)  # class id i is named pipeline.class_names[i]"
            + (" (None: this model has ids only)" if not class_names else "")
            + "\n\n# 50 DDIM steps instead of T ancestral DDPM steps\n"
            "pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)\n"
            f"images = pipeline(class_labels={labels}, guidance_scale=2.0, num_inference_steps=50, num_images_per_label=4, "
            "generator=torch.Generator().manual_seed(0)).images\n```\n\n"
            f"`class_labels` takes class names and/or ids, one image per entry (times `num_images_per_label`); `{CONDITIONAL_PIPELINE_FILENAME}` "
            f"is the `{CONDITIONAL_PIPELINE_CLASS}` that `trust_remote_code=True` runs from this repo, at the revision of the weights. "
            "`guidance_scale` is s = 1 + w, where w is the guidance weight of Ho & Salimans (2022) in "
            "(1 + w) eps(x_t, c) - w eps(x_t, null): s = 1 is plain conditional sampling, s = 0 unconditional, and s > 1 "
            "follows the class more closely at the cost of diversity."
            + (" With DDIM the pipeline samples from the mean channels of this learned-variance model." if learned_variance else "")
            + f"\n\nor from the command line: `ddpm-hf sample --model {repo_id}{cli_revision} --class_labels {_cli_class_labels(num_classes, class_names)} "
            "--guidance_scale 2.0`."
        )
    elif learned_variance:
        # Stock DDIMPipeline passes all 6 channels to DDIMScheduler, which has no use for the variance and fails.
        usage = (
            "## Usage\n\n```python\nimport torch\nfrom diffusers import DDPMPipeline\n\n"
            f"pipeline = DDPMPipeline.from_pretrained({load})\n"
            "images = pipeline(batch_size=16, generator=torch.Generator().manual_seed(0)).images\n\n"
            "# faster: 100 strided steps, which learned variances keep good (Nichol & Dhariwal 2021, Sec. 4)\n"
            "images = pipeline(batch_size=16, num_inference_steps=100, generator=torch.Generator().manual_seed(0)).images\n```\n\n"
            f"or from the command line: `ddpm-hf sample --model {repo_id}{cli_revision} --steps 100`. Stock `DDIMPipeline` "
            f"does not split the {2 * channels}-channel output into mean and variance"
            + ("; for DDIM or DPM-Solver use the trajectory pipeline below, which gives those schedulers the mean channels." if custom_pipeline else ".")
        )
    else:
        usage = (
            "## Usage\n\n```python\nimport torch\nfrom diffusers import DDIMPipeline, DDPMPipeline\n\n"
            f"pipeline = DDPMPipeline.from_pretrained({load})\n"
            "images = pipeline(batch_size=16, generator=torch.Generator().manual_seed(0)).images\n\n"
            "# faster: DDIM with 50 steps on the same weights\n"
            f"pipeline = DDIMPipeline.from_pretrained({load})\n"
            "images = pipeline(batch_size=16, num_inference_steps=50, generator=torch.Generator().manual_seed(0)).images\n```\n\n"
            f"or from the command line: `ddpm-hf sample --model {repo_id}{cli_revision}`."
        )
    sections.append(usage)
    if custom_pipeline and not conditional:  # the trajectory pipeline gives the UNet no class labels
        sections.append(
            "### The denoising trajectory\n\n"
            f"`{CUSTOM_PIPELINE_FILENAME}` in this repo is a custom pipeline ({CUSTOM_PIPELINE_CLASS}) that also returns every "
            "step of the reverse process:\n\n```python\nfrom diffusers import DiffusionPipeline\n\n"
            f'pipeline = DiffusionPipeline.from_pretrained({load}, custom_pipeline="{CUSTOM_PIPELINE_NAME}", trust_remote_code=True)\n'
            "output = pipeline(batch_size=4, num_inference_steps=50, return_trajectory=True)\n"
            "output.trajectory_x_t  # one tensor per step\n```"
            + (
                "\n\nWith DDIM (or DPM-Solver) it samples from the mean channels of this learned-variance model:\n\n```python\n"
                "from diffusers import DDIMScheduler\n\npipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)\n"
                "images = pipeline(batch_size=16, num_inference_steps=50).images\n```"
                if learned_variance
                else ""
            )
        )
    if fid is not None:
        measured_at = f"step {fid['step']:,}" if isinstance(fid.get("step"), int) else "these weights"
        evaluation_text = (
            "## Evaluation\n\n| Metric | Value | Samples | Sampler | Seed | Reference | Weights |\n|---|---|---|---|---|---|---|\n"
            f"| FID | {float(fid['fid']):.2f} | {_count(fid.get('num_samples'))} | {fid_setup(fid)} | {_count(fid.get('seed'))} | "
            f"{fid.get('reference', 'not recorded')} | {measured_at} |"
        )
        if fid.get("class_balanced"):
            evaluation_text += "\n\nThe samples are class-balanced: every class has the same share of them (within one)."
        per_class = fid.get("per_class_fid")
        if isinstance(per_class, dict) and per_class:
            evaluation_text += "\n\nFID of each class's samples:\n\n| Class | FID |\n|---|---|\n" + "\n".join(
                f"| {text} | {value} |" for text, value in _per_class_fid_rows(per_class, class_names)
            )
        sections.append(evaluation_text)
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    return ModelCard(content)


def describe_hardware(num_processes: int = 1) -> str:
    """'2 x NVIDIA H100 80GB HBM3', or 'CPU' when no accelerator is visible: for the card's Hardware row."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"{num_processes} x {torch.cuda.get_device_name(0)}"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "Apple silicon (MPS)"
    except Exception:  # the card is still useful without it
        pass
    return f"CPU ({num_processes} process{'es' if num_processes > 1 else ''})"


# ---- errors ---------------------------------------------------------------------------------------


def _causes(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def is_transient(error: BaseException) -> bool:
    """A 408/429/5xx answer or a network failure (connection refused/reset, timeout): worth retrying."""
    for e in _causes(error):
        if isinstance(e, HfHubHTTPError) and e.response is not None:
            return e.response.status_code in TRANSIENT_STATUS
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        # The HTTP library's network errors (httpx's TransportError, requests' ConnectionError/Timeout).
        if any(c.__name__ in ("TransportError", "ConnectionError", "Timeout", "TimeoutException") for c in type(e).__mro__):
            return True
    return False


def _status(error: BaseException) -> int | None:
    for e in _causes(error):
        if isinstance(e, HfHubHTTPError) and e.response is not None:
            return e.response.status_code
    return None


def _describe(error: BaseException) -> str:
    """One line about what went wrong, for messages."""
    for e in _causes(error):
        if isinstance(e, HfHubHTTPError) and e.response is not None:
            detail = e.server_message or str(e).strip().splitlines()[0]
            return f"HTTP {e.response.status_code} from {e.response.request.method} {e.response.url}: {' '.join(detail.split())}"
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


# ---- pushing --------------------------------------------------------------------------------------


def default_repo_name(output_dir: str | os.PathLike) -> str:
    """A valid repo name from the output folder's name: "my run (v2)" -> "my-run-v2".

    Letters are reduced to ASCII, every other run of characters the Hub refuses becomes one '-', '--' and '..'
    are collapsed, and the ends are trimmed; "ddpm" when nothing is left.
    """
    name = unicodedata.normalize("NFKD", Path(output_dir).resolve().name).encode("ascii", "ignore").decode()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)
    name = re.sub(r"-{2,}", "-", re.sub(r"\.{2,}", ".", name))
    name = name[:96].strip("-._")
    if name.endswith(".git"):
        name = name[: -len(".git")].strip("-._")
    return name or DEFAULT_REPO_NAME


class _Terminated(BaseException):
    """SIGTERM during a blocking push. Raised in the main thread instead of dying at once, so that `finally`
    removes the snapshot folders (a full pipeline copy each). A BaseException, like KeyboardInterrupt."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    # Only the main thread may set handlers, and a handler someone else installed (training's graceful stop) wins.
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handle(signum, frame):
        raise _Terminated()

    signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@dataclass
class _Upload:
    """What one push sends: repo path -> local file or content. `folder` is a snapshot to delete afterwards."""

    step: int | None
    contents: dict[str, Path | bytes]
    folder: Path | None = None

    def cleanup(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


class HubPusher:
    """Pushes the pipeline in `output_dir` to the Hub repo `repo_id`, with the same token for every call.

    Args:
        repo_id: "user/name" or "org/name"; None: "<your user name>/<output_dir's name made valid>".
        token: a Hub token; None: `HF_TOKEN`, then the token saved by `hf auth login`.
        private: create the repo as private (an existing repo keeps its visibility).
        output_dir: the training run's OUTPUT_DIR.
        revision: the branch to push to (created if missing); None: main.
        commit_message: default "Upload pipeline (step N)".
        hardware: free text for the model card, e.g. `describe_hardware(accelerator.num_processes)`.
        license: the `license` of the card's metadata.
        endpoint: the Hub URL; None: `HF_ENDPOINT` or https://huggingface.co.
        max_retries, backoff: the final push retries transient errors `max_retries` times, waiting
            `backoff`, 2 * `backoff`, 4 * `backoff`... seconds.
        custom_pipeline_file: the custom pipeline uploaded as `ddpm_trajectory.py`; None: the package's. A
            class-conditional run's `ddpm_class_conditional.py` always comes from the package (`conditional_pipeline_file`).
        command: "training" (train_ddpm.py --push_to_hub) or "push" (`ddpm-hf push`): what error messages advise.
        repo_flag, token_flag: the option names that error messages tell the user to change; None: those of `command`.
    """

    def __init__(
        self,
        repo_id: str | None,
        token: str | None,
        private: bool,
        output_dir: str | os.PathLike,
        *,
        revision: str | None = None,
        commit_message: str | None = None,
        hardware: str | None = None,
        license: str = DEFAULT_LICENSE,
        endpoint: str | None = None,
        max_retries: int = 5,
        backoff: float = 2.0,
        custom_pipeline_file: str | os.PathLike | None = None,
        command: str = "training",
        repo_flag: str | None = None,
        token_flag: str | None = None,
    ):
        if command not in ("training", "push"):
            raise ValueError(f"command must be 'training' or 'push', not {command!r}")
        self.repo_id = repo_id
        self.token = token
        self.private = private
        self.output_dir = Path(output_dir)
        self.revision = revision or "main"
        self.commit_message = commit_message
        self.hardware = hardware
        self.license = license
        self.max_retries = max_retries
        self.backoff = backoff
        self.command = command
        self.repo_flag = repo_flag or ("--repo_id" if command == "push" else "--hub_model_id")
        self.token_flag = token_flag or ("--token" if command == "push" else "--hub_token")
        self.custom_pipeline_file = Path(custom_pipeline_file) if custom_pipeline_file is not None else default_custom_pipeline_file()
        if self.custom_pipeline_file is None:
            logger.warning(f"{CUSTOM_PIPELINE_FILENAME} was not found in the package: the push will not include the custom pipeline.")
        self.api = HfApi(endpoint=endpoint)
        self.user: str | None = None
        self._token_source = "given with " + self.token_flag if token else None
        self._checked = False
        self._cond = threading.Condition()
        self._pending: _Upload | None = None
        self._worker: threading.Thread | None = None
        # Every snapshot of a background push lives in this one temporary folder, so that one rmtree removes them all.
        self._snapshots: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        return f"{self.api.endpoint}/{self.repo_id}"

    def retry_command(self) -> str:
        """The `ddpm-hf push` command that pushes `output_dir` again, for messages."""
        command = ["ddpm-hf", "push", str(self.output_dir)]
        if self.repo_id is not None:
            command += ["--repo_id", self.repo_id]
        if self.revision != "main":
            command += ["--revision", self.revision]
        if self.license != DEFAULT_LICENSE:
            command += ["--license", self.license]
        return shlex.join(command)

    # ---- before training ------------------------------------------------------------------------
    def check(self) -> str:
        """Resolve the token, reject a bad one, validate the repo id and create the repo (or check it exists).

        Takes seconds; call it before the first training step. Returns the full repo id. Raises `UserError`.
        """
        if self.token is None:
            self.token = get_token()
            if self.token is None:
                raise UserError(
                    f"pushing to the Hub needs a token with write access: pass {self.token_flag}, set HF_TOKEN, "
                    "or run `hf auth login` (create a token at https://huggingface.co/settings/tokens)."
                )
            self._token_source = "from HF_TOKEN" if os.environ.get("HF_TOKEN") == self.token else "saved by `hf auth login`"

        whoami = self._check_call(lambda: self.api.whoami(token=self.token), "checking the token")
        self.user = whoami["name"]
        namespaces = [self.user] + [org["name"] for org in whoami.get("orgs", []) if "name" in org]
        role = ((whoami.get("auth") or {}).get("accessToken") or {}).get("role")
        if role == "read":
            raise UserError(
                f"the token {self._token_source} is read-only, so it cannot push. Create a token with write access at "
                f"https://huggingface.co/settings/tokens and pass it with {self.token_flag} or HF_TOKEN."
            )

        if self.repo_id is None:
            self.repo_id = f"{self.user}/{default_repo_name(self.output_dir)}"
        elif "/" not in self.repo_id:
            self.repo_id = f"{self.user}/{self.repo_id}"
        try:
            validate_repo_id(self.repo_id)
            if self.repo_id.count("/") != 1:
                raise HFValidationError("it must be 'namespace/name'")
        except HFValidationError as e:
            raise UserError(
                f"{self.repo_flag} {self.repo_id!r} is not a valid repo id ({' '.join(str(e).split())}). "
                f"Use 'user/name', e.g. '{self.user}/ddpm-cifar10': letters, digits, '-', '_' and '.', at most 96 characters."
            ) from None
        namespace = self.repo_id.split("/")[0]
        if namespace not in namespaces:
            raise UserError(
                f"{self.repo_flag} {self.repo_id}: the token {self._token_source} belongs to '{self.user}', who cannot "
                f"push to the namespace '{namespace}' (yours: {', '.join(namespaces)}). Use {self.repo_flag} "
                f"{self.user}/{self.repo_id.split('/')[1]}, or a token of an account that may write to '{namespace}'."
            )

        self._check_call(
            lambda: self.api.create_repo(self.repo_id, token=self.token, private=self.private, exist_ok=True),
            f"creating {self.repo_id}",
        )
        info = self._check_call(lambda: self.api.repo_info(self.repo_id, token=self.token), f"reading {self.repo_id}")
        if self.private and not info.private:
            logger.warning(
                f"{self.repo_id} already exists and is public: --private does not change it. Make it private in the repo's settings on the Hub if you meant to."
            )
        if self.revision != "main":
            self._check_call(
                lambda: self.api.create_branch(self.repo_id, branch=self.revision, token=self.token, exist_ok=True),
                f"creating the branch {self.revision}",
            )
        self._checked = True
        logger.info(f"Hub: pushing to {self.url} as {self.user}.")
        return self.repo_id

    def _check_call(self, fn: Callable[[], Any], what: str):
        # A check should fail in seconds: two retries at most for a network blip.
        return self._with_retries(fn, what, self._explain_check, retries=min(self.max_retries, 2))

    def _explain_check(self, error: BaseException) -> UserError:
        status = _status(error)
        if status == 401:
            return UserError(
                f"the Hub rejected the token {self._token_source} ({_describe(error)}). Pass a valid token with "
                f"{self.token_flag}, set HF_TOKEN, or run `hf auth login`; create one with write access at "
                "https://huggingface.co/settings/tokens."
            )
        if status in (403, 404):
            return UserError(
                f"'{self.user}' may not create or write to {self.repo_id} ({_describe(error)}). Choose a repo you own "
                f"with {self.repo_flag} {self.user}/NAME, or use a token with write access to it."
            )
        if status == 400:
            return UserError(f"the Hub refused {self.repo_flag} {self.repo_id} ({_describe(error)}). Choose another name.")
        # What to do meanwhile depends on the command: a training run can go on without the Hub, a push cannot.
        if self.command == "push":
            later = f"then run `{self.retry_command()}` again"
        else:
            later = "or train without --push_to_hub and push later with `ddpm-hf push OUTPUT_DIR`"
        if is_transient(error):
            return UserError(f"cannot reach the Hub at {self.api.endpoint} ({_describe(error)}). Check the network (and HF_ENDPOINT), {later}.")
        return UserError(f"the Hub check for {self.repo_id or 'the repo'} failed ({_describe(error)}). Fix the cause, {later}.")

    # ---- pushes ---------------------------------------------------------------------------------
    def push_in_background(self, step: int) -> None:
        """Snapshot the pipeline as it is now and push it from a worker thread; returns at once.

        Call it after the pipeline (and sample grid) of `step` are saved. The files are copied first, so training
        may overwrite them while the upload runs. If a push is still running, this one waits and replaces any
        older waiting one. A failure is logged as a warning and training goes on: the next push sends everything.
        """
        self._require_checked()
        try:
            upload = self._snapshot(step)
        except (UserError, OSError) as error:
            logger.warning(f"Hub: cannot push step {step} ({error}). Training goes on.")
            return
        with self._cond:
            if self._pending is not None:
                logger.info(f"Hub: skipping the push of step {self._pending.step}, superseded by step {step}.")
                self._pending.cleanup()
            self._pending = upload
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="hub-push", daemon=True)
                self._worker.start()

    def wait(self) -> None:
        """Block until background pushes are done."""
        with self._cond:
            while self._worker is not None:
                self._cond.wait()

    def push_final(self, step: int | None = None) -> str:
        """Push the pipeline in `output_dir` and wait for it, retrying transient errors; returns the commit sha.

        Waits for background pushes first. Raises `UserError` when the push fails for good, or is stopped by Ctrl-C
        or SIGTERM: the local output is untouched and the message says how to push it again. The snapshots of
        background pushes are gone when it returns or raises.
        """
        with _sigterm_raises():
            try:
                self.wait()
                if not self._checked:
                    self.check()
                check_pipeline_folder(self.output_dir)
                upload = _Upload(step, self._contents(self.output_dir, step))
                try:
                    return self._with_retries(lambda: self._commit(upload), f"pushing to {self.repo_id}", None)
                except UserError:
                    raise
                except Exception as error:
                    raise UserError(
                        f"pushing to {self.url} failed ({_describe(error)}). The local output in {self.output_dir} is "
                        f"intact; push it again with `{self.retry_command()}`."
                    ) from error
            except (KeyboardInterrupt, _Terminated) as stop:
                # One line that says how to finish the job, instead of a traceback.
                by = "Ctrl-C" if isinstance(stop, KeyboardInterrupt) else "SIGTERM"
                raise UserError(
                    f"the push to {self.url} was stopped by {by}. The local output in {self.output_dir} is intact; push it again with `{self.retry_command()}`."
                ) from None
            finally:
                self._discard_snapshots()

    # ---- internals ------------------------------------------------------------------------------
    def _require_checked(self) -> None:
        if not self._checked:
            raise RuntimeError("HubPusher.check() must run (before training starts) before pushing.")

    def _contents(self, folder: Path, step: int | None) -> dict[str, Path | bytes]:
        """Repo path -> file or content of a push of `folder` (the output folder or a snapshot of it)."""
        contents: dict[str, Path | bytes] = dict(_local_files(folder, self.custom_pipeline_file))
        run = RunFolder(folder)
        # The JSON files go up without the machine's paths; paths are judged from where the run lives.
        for name, read, public in ((TRAINING_CONFIG, run.read_training_config, public_training_config), (EVAL_FILE, run.read_eval, public_eval)):
            if name in contents:
                values = read()
                if values:
                    contents[name] = (json.dumps(public(values, self.output_dir), indent=2, sort_keys=True) + "\n").encode()
                else:
                    logger.warning(f"Hub: {name} in {folder} is not a JSON object; it is not uploaded.")
                    del contents[name]
        card = build_model_card(
            folder,
            self.repo_id,
            step=step,
            hardware=self.hardware,
            license=self.license,
            custom_pipeline=self.custom_pipeline_file is not None,
            revision=self.revision,
            run_dir=self.output_dir,
        )
        contents["README.md"] = str(card).encode()
        return contents

    def _snapshot(self, step: int) -> _Upload:
        check_pipeline_folder(self.output_dir)
        with self._cond:
            if self._snapshots is None:
                self._snapshots = tempfile.TemporaryDirectory(prefix="ddpm-hf-push-")
            root = Path(tempfile.mkdtemp(prefix=f"step-{step}-", dir=self._snapshots.name))
        upload = _Upload(step, {}, root)
        try:
            for repo_path, source in _local_files(self.output_dir, None).items():
                target = root / repo_path
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
            upload.contents = self._contents(root, step)
        except BaseException:
            upload.cleanup()
            raise
        return upload

    def _discard_snapshots(self) -> None:
        """Remove every snapshot, the one a background push may still be sending included (it then fails)."""
        with self._cond:
            if self._pending is not None:
                self._pending.cleanup()
                self._pending = None
            snapshots, self._snapshots = self._snapshots, None
        if snapshots is not None:
            snapshots.cleanup()

    def _work(self) -> None:
        while True:
            with self._cond:
                upload, self._pending = self._pending, None
                if upload is None:
                    self._worker = None
                    self._cond.notify_all()
                    return
            try:
                self._commit(upload)
            except Exception as error:
                logger.warning(
                    f"Hub: the background push of step {upload.step} to {self.repo_id} failed ({_describe(error)}). "
                    "Training goes on; the next push sends everything again."
                )
            finally:
                upload.cleanup()

    def _commit(self, upload: _Upload) -> str:
        operations = [
            CommitOperationAdd(path_in_repo=path, path_or_fileobj=value if isinstance(value, bytes) else str(value))
            for path, value in sorted(upload.contents.items())
        ]
        # The repo's ALLOWED files become exactly this push's: an older grid, or the eval.json and
        # training_config.json of another run, would describe other weights. Files added by hand stay.
        remote = self.api.list_repo_files(self.repo_id, revision=self.revision, token=self.token)
        operations += [CommitOperationDelete(path_in_repo=path) for path in remote if is_allowed(path) and path not in upload.contents]
        message = self.commit_message or (f"Upload pipeline (step {upload.step})" if upload.step is not None else "Upload pipeline")
        info = self.api.create_commit(self.repo_id, operations, commit_message=message, revision=self.revision, token=self.token)
        logger.info(f"Hub: pushed step {upload.step} to {self.url} ({info.oid[:7]}).")
        return info.oid

    def _with_retries(self, fn: Callable[[], Any], what: str, explain: Callable[[BaseException], UserError] | None, retries: int | None = None):
        """Run `fn`, retrying transient errors with exponential backoff; `explain` turns a final error into a UserError."""
        retries = self.max_retries if retries is None else retries
        delay = self.backoff
        for attempt in range(retries + 1):
            try:
                return fn()
            except Exception as error:
                if not is_transient(error) or attempt == retries:
                    if explain is not None:
                        raise explain(error) from error
                    raise
                logger.warning(f"Hub: {what} failed ({_describe(error)}); retry {attempt + 1}/{retries} in {delay:g}s.")
                time.sleep(delay)
                delay *= 2


# ---- ddpm-hf push ---------------------------------------------------------------------------------


def run_push(args: argparse.Namespace) -> None:
    check_pipeline_folder(args.output_dir)
    pusher = HubPusher(
        args.repo_id,
        args.token,
        args.private,
        args.output_dir,
        revision=args.revision,
        commit_message=args.commit_message,
        license=args.license,
        command="push",
    )
    try:
        pusher.check()
    except KeyboardInterrupt:
        raise UserError(f"stopped by Ctrl-C before anything was pushed. Push with `{pusher.retry_command()}`.") from None
    sha = pusher.push_final()
    load = load_arguments(pusher.repo_id, pusher.revision)
    cli_revision = f" --revision {pusher.revision}" if pusher.revision != "main" else ""
    print(
        f"Pushed {args.output_dir} to {pusher.url} (revision {pusher.revision}, commit {sha[:7]}): {len(files_to_upload(args.output_dir, pusher.custom_pipeline_file))} files."
    )
    if is_conditional_folder(args.output_dir):
        print(
            f'Load it with DiffusionPipeline.from_pretrained({load}, custom_pipeline="{CONDITIONAL_PIPELINE_NAME}", trust_remote_code=True) '
            f"or `ddpm-hf sample --model {pusher.repo_id}{cli_revision} --class_labels ... --guidance_scale 2.0`."
        )
    else:
        print(f"Load it with DDPMPipeline.from_pretrained({load}) or `ddpm-hf sample --model {pusher.repo_id}{cli_revision}`.")


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "push",
        help="Upload a finished run's pipeline, model card and latest samples to the Hugging Face Hub.",
        description=(
            "Upload OUTPUT_DIR to a Hub model repo: model_index.json, unet/, scheduler/, a model card (README.md), the "
            "latest sample grid, training_config.json, eval.json and the custom pipeline ddpm_trajectory.py (and, for a "
            "class-conditional run, ddpm_class_conditional.py), without the machine's paths. Those files of an earlier push that this one does not have are deleted from the repo. "
            "Checkpoints and logs are never uploaded."
        ),
    )
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", type=existing_folder, help="The training run's output folder (holds model_index.json).")
    parser.add_argument("--repo_id", default=None, help="Hub repo, 'user/name' (default: your user name / the folder name).")
    parser.add_argument("--private", action="store_true", help="Create the repo as private.")
    parser.add_argument("--token", default=None, help="Hub token with write access (default: HF_TOKEN or `hf auth login`).")
    parser.add_argument("--revision", default=None, help="Branch to push to, created if missing (default: main).")
    parser.add_argument("--commit_message", default=None, help="Commit message (default: 'Upload pipeline').")
    parser.add_argument("--license", default=DEFAULT_LICENSE, help=f"License in the model card's metadata (default: {DEFAULT_LICENSE}).")
    parser.set_defaults(func=run_push)
