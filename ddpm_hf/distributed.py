"""Heavy work spread over Accelerate's processes: which items are this process's, and merging the results.

Every heavy command (training's FID, `ddpm-hf sample`, `ddpm-hf evaluate`) is written for N processes:

* Items (images to generate, images to score) are cut into fixed-size chunks by index, and chunk k goes to
  process k mod N. A chunk is computed the same way whichever process gets it, and every random number of item i
  comes from its own generator seeded with (seed, i), so 1 process and 8 make the same images.
* The processes meet in rounds: in round r process p handles chunk r N + p (or nothing when the chunks run out),
  so a collective after each round never waits for more than one chunk of work.
* Statistics are merged (sums), small results gathered; one process (the main one) writes.

Launched as one plain process, nothing here joins a process group: it runs exactly as a single process does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from datetime import timedelta

import numpy as np
import torch

from .errors import UserError

DEFAULT_TIMEOUT_S = 1800  # how long a collective waits for a process that died or hangs, before all exit


def process_state(device: str | None = None, timeout_s: float | None = None):
    """Accelerate's PartialState for a `ddpm-hf` command: joins the process group of a torchrun /
    `accelerate launch` run (gloo on CPU-only machines), with a timeout after which a collective gives up."""
    from accelerate import PartialState

    cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    kwargs = {"timeout": timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S)} if int(os.environ.get("WORLD_SIZE", "1")) > 1 else {}
    state = PartialState(cpu=cpu, **kwargs)
    launched = int(os.environ.get("WORLD_SIZE", state.num_processes))
    if launched != state.num_processes:
        raise UserError(f"launched as {launched} processes, but Accelerate sees {state.num_processes}. Launch with `accelerate launch` or torchrun.")
    return state


def process_device(device: str | None, state) -> torch.device:
    """The device this process works on: --device as given with one process; with several, each its own
    (state.device, e.g. cuda:<local rank>) unless --device cpu; without --device, CUDA when there is one."""
    if state is None or state.num_processes == 1 or device == "cpu":
        if device:
            return torch.device(device)
        return state.device if state is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return state.device


def leave_process_group() -> None:
    """End of a multi-process command: every process leaves the group together. Left to the interpreter's exit,
    a gloo group's destructor can wait forever on a peer that has already gone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def item_seed(seed: int, index: int) -> int:
    """The seed of item `index`'s own generator: a function of (seed, index) only."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]) >> 1  # < 2**63: a torch seed


def item_generators(seed: int, indices: range) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(item_seed(seed, i)) for i in indices]


def num_chunks(num_items: int, chunk_size: int) -> int:
    return math.ceil(num_items / chunk_size)


def rounds(num_items: int, chunk_size: int, process_index: int, num_processes: int) -> Iterator[range | None]:
    """For each round, the item indices this process handles (None when it has no chunk in that round)."""
    if num_items < num_processes:
        raise UserError(f"{num_items} items cannot be shared by {num_processes} processes; ask for at least {num_processes}, or launch fewer processes.")
    total = num_chunks(num_items, chunk_size)
    for round_index in range(math.ceil(total / num_processes)):
        chunk = round_index * num_processes + process_index
        yield range(chunk * chunk_size, min(num_items, (chunk + 1) * chunk_size)) if chunk < total else None


def items_in_round(num_items: int, chunk_size: int, num_processes: int, round_index: int) -> int:
    """How many items all processes together handle in a round: what the one progress bar advances by."""
    first = round_index * num_processes * chunk_size
    return max(0, min(num_items, first + num_processes * chunk_size) - first)


def gather_objects(value, state) -> list:
    """Every process's `value`, in process order, on every process (a plain list with one process)."""
    if state.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def all_reduce_sum(tensor: torch.Tensor, state) -> torch.Tensor:
    """The sum over processes (on each); float64 sums stay float64."""
    if state.num_processes == 1:
        return tensor
    from accelerate.utils import reduce

    return reduce(tensor, reduction="sum")


def all_reduce_extreme(tensor: torch.Tensor, op: str, state) -> torch.Tensor:
    """The minimum (op="min") or maximum ("max") over processes, on each. torch.distributed's own ReduceOp, because
    Accelerate's `reduce(..., "max")` sums in the Accelerate releases that setup.cfg allows (and it has no min)."""
    if state.num_processes == 1:
        return tensor
    import torch.distributed as dist

    reduced = tensor.clone()
    dist.all_reduce(reduced, op={"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return reduced


# Words of the errors gloo and NCCL raise when a peer process died (connection reset/closed) or hangs (timed out).
_COLLECTIVE_FAILURES = ("Connection reset", "Connection closed", "Connection refused", "Timed out", "timed out", "NCCL", "Broken pipe", "ProcessGroup")


def collective_failure(error: BaseException) -> str | None:
    """The one-line explanation of an error raised by a collective whose peer died or hangs, or None for any other
    error. Checkpoints are written atomically, so what is on disk stays usable."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    if not isinstance(error, (dist.DistError, RuntimeError)) or not any(word in str(error) for word in _COLLECTIVE_FAILURES):
        return None
    first_line = " ".join(str(error).split())[:300]
    return (
        f"error: process {dist.get_rank()} of {dist.get_world_size()} lost the others ({first_line}): another process of this run "
        "died or stopped answering within the timeout (--ddp_timeout). Complete checkpoints are intact: relaunch the same command "
        "with --resume_from_checkpoint latest to continue a training run."
    )
