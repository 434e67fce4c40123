"""What a run's Hub repo holds, and nothing of the machine it was trained on.

A push uploads what a user needs to load and judge the model (`ALLOWED`): the pipeline (`model_index.json`,
`unet/`, `scheduler/`), the model card `README.md` (model_card.py), the latest sample grid, `training_config.json`,
`eval.json` when an evaluation has run, the custom pipeline file `ddpm_trajectory.py`, and, for a class-conditional
run, the pipeline file its `model_index.json` names, `ddpm_class_conditional.py` (both from the package:
`conditioning.packaged_pipeline_file`). Checkpoints, optimizer state, logs and tokens never leave the machine, and
neither do the machine's paths: `training_config.json`, `eval.json` and the card carry only the names of local files
and folders (`public_training_config`, `public_eval`), and `hub_id` is the one test of "Hub id or local path" for
what they name. hub.py pushes these files; model_card.py describes them.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import Any

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .arguments import is_hub_id, last_part, local_path_name
from .conditioning import CONDITIONAL_PIPELINE_FILENAME, MODEL_INDEX, is_conditional_index, packaged_pipeline_file
from .errors import UserError
from .run_folder import EVAL_FILE, SAMPLE_GRID_GLOB, TRAINING_CONFIG, RunFolder, read_json

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

# The machine's paths stay on the machine. In training_config.json and eval.json, the values of the *_LOCAL_KEYS
# are always files or folders there: only their last part goes up. The values of the *_HUB_OR_LOCAL_KEYS are a
# Hub id, a local path or a plain name (`cifar10-train`): a local path goes up as LOCAL_PREFIX + its last part, so
# that nobody takes it for a Hub id. Paths in any other text go the same way.
CONFIG_LOCAL_KEYS = ("output_dir", "config", "model_config", "resume_from_checkpoint", "logging_dir")
CONFIG_HUB_OR_LOCAL_KEYS = ("dataset", "init_from")
EVAL_LOCAL_KEYS = ("file",)
EVAL_HUB_OR_LOCAL_KEYS = ("model", "reference", "spec", "dataset", "source")
LOCAL_PREFIX = "local:"

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


def local_files(output_dir: Path, custom_pipeline_file: Path | None) -> dict[str, Path]:
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
    return sorted([*local_files(Path(output_dir), custom), "README.md"])


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
