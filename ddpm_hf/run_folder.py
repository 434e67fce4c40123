"""The run folder (OUTPUT_DIR): its layout, and the one place that reads and writes each file in it.

Training writes a run folder; sampling, evaluation, pictures and the Hub read it. They all go through
`RunFolder`, so a file name or the schema of eval.json is decided here and nowhere else:

    model_index.json, unet/, scheduler/   the EMA pipeline: DDPMPipeline.from_pretrained(OUTPUT_DIR)
    ddpm_class_conditional.py             class-conditional runs: the pipeline model_index.json names (see conditioning.py)
    training_config.json                  the resolved configuration (never the token)
    eval.json                             the latest FID at the top level; "nll", "sweep", "frontier" and "guidance_sweep" sections
    loss_history.jsonl                    one {"step", "loss"} line per logging interval
    loss.png, progress.png                pictures of the loss and of the sample grids over training
    samples/step_XXXXXXX.png              fixed-seed sample grids from the EMA model
    checkpoints/checkpoint-XXXXXXX/       resumable state (model, optimizer, EMA, step, RNG)
    best/                                 the pipeline with the best FID so far, with its own eval.json
    logs/                                 tracker logs (TensorBoard)

This module imports nothing else of ddpm_hf but files.py: every other module may use it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

from . import files

# The saved pipeline; a class-conditional one also holds the custom pipeline file its model_index.json names.
PIPELINE_PARTS = ("model_index.json", "unet", "scheduler", "ddpm_class_conditional.py")
TRAINING_CONFIG = "training_config.json"
EVAL_FILE = "eval.json"
LOSS_HISTORY = "loss_history.jsonl"
LOSS_FIGURE = "loss.png"
PROGRESS_FIGURE = "progress.png"
SAMPLES = "samples"
SAMPLE_GRID_GLOB = "samples/step_*.png"
CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_STATE = "training_state.json"  # written last into a checkpoint: its presence marks it complete
BEST = "best"
LOGS = "logs"

_SAMPLE_GRID_NAME = re.compile(r"step_(\d+)\.png")

# eval.json: the latest FID run at the top level, the latest bound and sweep in their own sections.
# Every FID result carries these keys, whoever computed it (`ddpm-hf evaluate` or --eval_every): the model
# card reads them.
EVAL_SECTIONS = ("nll", "sweep", "frontier", "guidance_sweep")
FID_RESULT_KEYS = ("fid", "num_samples", "scheduler", "steps", "nfe", "seed", "reference")


class RunFolder:
    """Paths and files of one run folder. Creating it touches nothing on disk."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def __repr__(self) -> str:
        return f"RunFolder({self.path!r})"

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    # ---- the pipeline ------------------------------------------------------------------------------

    def has_pipeline(self) -> bool:
        return os.path.isfile(self.file("model_index.json"))

    @property
    def best(self) -> RunFolder:
        """best/: the pipeline with the lowest FID so far, a run folder of its own (pipeline + eval.json)."""
        return RunFolder(self.file(BEST))

    # ---- training_config.json ----------------------------------------------------------------------

    def read_training_config(self) -> dict[str, Any] | None:
        return read_json(self.file(TRAINING_CONFIG))

    def write_training_config(self, values: dict[str, Any]) -> None:
        _write_json_atomically(self.file(TRAINING_CONFIG), values, sort_keys=True)

    # ---- eval.json ---------------------------------------------------------------------------------

    def read_eval(self) -> dict[str, Any]:
        """eval.json, or {} when there is none (or it is damaged)."""
        return read_json(self.file(EVAL_FILE)) or {}

    def write_eval(self, result: dict[str, Any], section: str | None = None) -> str:
        """Write one part of eval.json and keep the others: `section` None is a FID result (top level),
        "nll", "sweep", "frontier" or "guidance_sweep" their sections."""
        if section is None:
            missing = [k for k in FID_RESULT_KEYS if k not in result]
            if missing:
                raise ValueError(f"a FID result for eval.json lacks {missing}")
            contents = dict(result, **{k: v for k, v in self.read_eval().items() if k in EVAL_SECTIONS})
        elif section in EVAL_SECTIONS:
            contents = dict(self.read_eval(), **{section: result})
        else:
            raise ValueError(f"unknown eval.json section {section!r}; use one of {EVAL_SECTIONS}")
        os.makedirs(self.path, exist_ok=True)
        _write_json_atomically(self.file(EVAL_FILE), contents)
        return self.file(EVAL_FILE)

    def best_fid(self) -> float | None:
        """The FID in this folder's eval.json, if any."""
        fid = self.read_eval().get("fid")
        return None if fid is None else float(fid)

    # ---- loss history ------------------------------------------------------------------------------

    def append_loss(self, step: int, loss: float) -> None:
        with open(self.file(LOSS_HISTORY), "a") as f:
            f.write(json.dumps({"step": step, "loss": loss}) + "\n")

    def loss_history(self) -> list[tuple[int, float]]:
        """(step, loss) by step; [] when nothing was logged. A resumed run repeats steps: the last line wins.
        Unreadable lines (a run killed mid-write) are skipped."""
        by_step: dict[int, float] = {}
        if os.path.isfile(self.file(LOSS_HISTORY)):
            with open(self.file(LOSS_HISTORY)) as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        by_step[int(entry["step"])] = float(entry["loss"])
                    except (ValueError, KeyError, TypeError):
                        continue
        return sorted(by_step.items())

    def forget_losses_after(self, step: int) -> None:
        """A resumed run logs the steps after its checkpoint again: drop the interrupted run's copies."""
        kept = [(s, loss) for s, loss in self.loss_history() if s <= step]
        with open(self.file(LOSS_HISTORY), "w") as f:
            f.writelines(json.dumps({"step": s, "loss": loss}) + "\n" for s, loss in kept)

    # ---- sample grids ------------------------------------------------------------------------------

    def sample_grid_path(self, step: int) -> str:
        return os.path.join(self.path, SAMPLES, f"step_{step:07d}.png")

    def sample_grids(self) -> list[tuple[int, str]]:
        """(step, path) of every samples/step_XXXXXXX.png, by step."""
        folder = os.path.join(self.path, SAMPLES)
        if not os.path.isdir(folder):
            return []
        found = []
        for name in os.listdir(folder):
            match = _SAMPLE_GRID_NAME.fullmatch(name)
            if match and os.path.isfile(os.path.join(folder, name)):
                found.append((int(match.group(1)), os.path.join(folder, name)))
        return sorted(found)

    def latest_sample_grid(self) -> str | None:
        grids = self.sample_grids()
        return grids[-1][1] if grids else None

    # ---- checkpoints -------------------------------------------------------------------------------

    @property
    def checkpoints_dir(self) -> str:
        return self.file(CHECKPOINTS)

    def checkpoint_path(self, step: int) -> str:
        return os.path.join(self.checkpoints_dir, f"{CHECKPOINT_PREFIX}{step:07d}")

    def checkpoints(self) -> list[str]:
        """Complete checkpoints, oldest first. An incomplete one never carries the final name."""
        if not os.path.isdir(self.checkpoints_dir):
            return []
        names = [
            n
            for n in os.listdir(self.checkpoints_dir)
            if n.startswith(CHECKPOINT_PREFIX)
            and n[len(CHECKPOINT_PREFIX) :].isdigit()
            and os.path.isfile(os.path.join(self.checkpoints_dir, n, CHECKPOINT_STATE))
        ]
        return [os.path.join(self.checkpoints_dir, n) for n in sorted(names, key=lambda n: int(n[len(CHECKPOINT_PREFIX) :]))]

    # ---- starting over -----------------------------------------------------------------------------

    def clear_training_outputs(self) -> None:
        """What --overwrite removes: an old run's checkpoints, samples, logs, best/, loss history and figures."""
        for name in (CHECKPOINTS, SAMPLES, LOGS, BEST):
            shutil.rmtree(self.file(name), ignore_errors=True)
        for name in (LOSS_HISTORY, LOSS_FIGURE, PROGRESS_FIGURE, EVAL_FILE):
            if os.path.isfile(self.file(name)):
                os.remove(self.file(name))


def read_json(path: str | os.PathLike) -> dict[str, Any] | None:
    """A JSON object from `path`, or None when it is missing, damaged or not an object."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _write_json_atomically(path: str, values: dict[str, Any], sort_keys: bool = False) -> None:
    """Readers (a push in the background, another process) never see half a file."""
    with files.atomic_write(path, "w") as f:
        json.dump(values, f, indent=2, sort_keys=sort_keys)
        f.write("\n")
