"""Files on disk: the one cache folder of ddpm-hf, and the one way a file is written so that no reader sees half of it.

The cache folder holds what is computed once and reused across runs: decoded datasets (data.py), FID reference
statistics (fid.py) and the Inception network file (inception_weights.py).

A file is written under a name of its own, `<path>.partial-<host>-<pid>-<random>`, and renamed onto `path` when
complete (`os.replace` is atomic): a reader sees the old file or the new one, never half of either, and writers
on several hosts, processes or threads never write into one another's file. A writer that dies leaves its partial
file behind; `remove_orphans` removes those of dead processes of this host.

This module imports nothing else of ddpm_hf: every other module may use it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import socket

_PARTIAL = re.compile(r"\.partial-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def cache_root() -> str:
    """`$DDPM_HF_CACHE`, else `$HF_HOME/ddpm_hf` (i.e. ~/.cache/huggingface/ddpm_hf)."""
    from huggingface_hub.constants import HF_HOME

    return os.environ.get("DDPM_HF_CACHE", os.path.join(HF_HOME, "ddpm_hf"))


def partial_name(path: str) -> str:
    """A name beside `path` that no other writer uses: `<path>.partial-<host>-<pid>-<random>`."""
    return f"{path}.partial-{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}"


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb"):
    """Open a file to write `path` through: it takes the name `path` when the block ends without an error, and is
    removed when it raises (Ctrl-C included). Raise inside the block to refuse what was written."""
    partial = partial_name(path)
    try:
        with open(partial, mode) as f:
            yield f
        os.replace(partial, path)
    except BaseException:
        remove_quietly(partial)
        raise


def remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def remove_orphans(path: str) -> None:
    """Remove the partial files of `path` that dead processes of this host left (a run killed while writing): with
    unique names, nothing else would ever overwrite them. Files of other hosts and of live processes stay."""
    if os.name != "posix":
        return
    for partial in glob.glob(glob.escape(path) + ".partial-*"):
        match = _PARTIAL.search(partial)
        if match is None or match.group("host") != socket.gethostname():
            continue
        try:
            os.kill(int(match.group("pid")), 0)
        except ProcessLookupError:
            remove_quietly(partial)
        except OSError:
            pass  # alive, another user's
