"""What an option's value may be, for train_ddpm.py (config.py) and every `ddpm-hf` subcommand alike:
the bounds of a number, the kinds of path, and whether a name is a local path or a Hub id.

An argparse option declares its bounds in its type, e.g. `type=bounded(int, ge=1)`, and its kind of path
with `type=output_file` (or another type below): a bad value is then refused while parsing, before any work,
with the one-line error of every other mistake. The `.bounds` and `.path_kind` attributes of these types let
tests walk every option of every command.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

# A Hub repo id: "name" or "namespace/name", letters, digits, '-', '_', '.'; never a path (no './', '~', '/x/y').
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@dataclass(frozen=True)
class Bounds:
    """gt/ge/lt/le: greater than, greater or equal, less than, less or equal (None: unbounded on that side)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def contains(self, value: float) -> bool:
        """False for NaN too, which fails every comparison."""
        return (
            (self.gt is None or value > self.gt)
            and (self.ge is None or value >= self.ge)
            and (self.lt is None or value < self.lt)
            and (self.le is None or value <= self.le)
        )

    def text(self) -> str | None:
        """As messages and the README write it: '> 0', '>= 1' or 'in [0, 1)'."""
        low = ("(", self.gt) if self.gt is not None else ("[", self.ge) if self.ge is not None else None
        high = (")", self.lt) if self.lt is not None else ("]", self.le) if self.le is not None else None
        if low and high:
            return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
        if low:
            return f"{'>' if low[0] == '(' else '>='} {low[1]}"
        if high:
            return f"{'<' if high[0] == ')' else '<='} {high[1]}"
        return None

    def outside(self) -> float | None:
        """A value just outside the bounds (for tests), or None when unbounded."""
        for edge, step in ((self.gt, 0), (self.ge, -1), (self.lt, 0), (self.le, 1)):
            if edge is not None:
                return edge + step
        return None


def bounded(kind: type, **bounds: float) -> callable:
    """An argparse type: a number of `kind` (int or float) within `Bounds(**bounds)`."""
    limits = Bounds(**bounds)

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'a whole number' if kind is int else 'a number'}, got {text!r}") from None
        if kind is float and not math.isfinite(value) or not limits.contains(value):
            raise argparse.ArgumentTypeError(f"must be {limits.text() or 'finite'}, got {text}")
        return value

    parse.bounds = limits
    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def nearest_existing(path: str) -> str:
    ancestor = os.path.abspath(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    return ancestor


def writable_location_problem(path: str, folder: bool) -> str | None:
    """Why `path` (a folder, or a file when folder=False) cannot be written, or None. Creates nothing."""
    if folder and os.path.exists(path) and not os.path.isdir(path):
        return f"{path} is a file, not a folder"
    if not folder and os.path.isdir(path):
        return f"{path} is a folder, not a file"
    ancestor = nearest_existing(path if folder else os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(ancestor):
        return f"{path} cannot be created: {ancestor} is a file"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{path} cannot be written: {ancestor} is not writable"
    return None


def output_file(text: str) -> str:
    """An argparse type: a file we can write (its folder exists or can be made)."""
    problem = writable_location_problem(text, folder=False)
    if problem:
        raise argparse.ArgumentTypeError(f"{problem}. Choose a path you can write to")
    return text


def output_folder(text: str) -> str:
    """An argparse type: a folder that exists or can be made, and can be written into."""
    problem = writable_location_problem(text, folder=True)
    if problem:
        raise argparse.ArgumentTypeError(f"{problem}. Choose a folder you can write to")
    return text


def _search_folders(run_dir: str | os.PathLike | None) -> list[Path]:
    """Where a relative path recorded in a run folder may have been resolved from.

    Training ran in some folder we do not know; it is usually one above the run folder (the default OUTPUT_DIR
    is relative to it), so those count, whatever folder the push runs from. The current folder counts too: a
    path that exists from here is not a Hub id.
    """
    folders = [Path.cwd()]
    if run_dir is not None:
        folders += Path(run_dir).resolve().parents
    return folders


def last_part(path: str) -> str:
    parts = [p for p in re.split(r"[\\/]+", os.path.expanduser(path)) if p]
    return parts[-1] if parts else path


def local_path_name(value: str, run_dir: str | os.PathLike | None = None) -> str | None:
    """The last part of `value` ("imgs" for "data/imgs") when `value` is a path on this machine, else None.

    A path is absolute, starts with ~, ./ or ../, holds a backslash, or exists relative to a folder of
    `_search_folders(run_dir)`. A relative path that exists nowhere any more is not recognised.
    """
    text = value.strip()
    if not text:
        return None
    if text.startswith(("/", "~", "./", "../")) or "\\" in text or re.match(r"[A-Za-z]:[\\/]", text):
        return last_part(text)
    for folder in _search_folders(run_dir):
        try:
            if (folder / text).exists():
                return last_part(text)
        except (OSError, ValueError):  # a name the file system cannot hold is no path here
            pass
    return None


def is_hub_id(name: str, run_dir: str | os.PathLike | None = None) -> bool:
    """True when `name` can only mean a Hub repo: it has a repo id's form and is no path on this machine
    (`local_path_name`; `run_dir`: the run folder a value was recorded in). The one rule the package uses
    wherever a value may be either: datasets, models, FID references, the model card."""
    return _HUB_ID.fullmatch(name) is not None and local_path_name(name, run_dir) is None


def local_path_or_hub_id(text: str) -> str:
    """An argparse type: an existing local path, or a Hub id (checked when it is loaded)."""
    if not os.path.exists(os.path.expanduser(text)) and not is_hub_id(text) and ":" not in text:  # "builtin:...", aliases pass
        raise argparse.ArgumentTypeError(f"{text}: no such file or folder. Check the path, or give a Hub id like user/name")
    return text


def existing_folder(text: str) -> str:
    """An argparse type: a local folder that exists."""
    if not os.path.isdir(os.path.expanduser(text)):
        raise argparse.ArgumentTypeError(f"{text}: no such folder" + (" (it is a file)" if os.path.isfile(text) else ""))
    return text


def device(text: str) -> str:
    """An argparse type: a torch device that exists here (cpu, cuda, cuda:1, mps)."""
    import torch

    try:
        chosen = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu or cuda") from None
    if chosen.type == "cuda" and (not torch.cuda.is_available() or (chosen.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s); use --device cpu")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available here; use --device cpu")
    return text


output_file.path_kind = "output_file"
output_folder.path_kind = "output_folder"
local_path_or_hub_id.path_kind = "input"
existing_folder.path_kind = "input"
device.kind = "device"
