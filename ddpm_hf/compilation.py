"""What a failed torch.compile means, for the two places that compile the UNet.

Training compiles it in a warm-up step (training.py) and sampling through `compile_for_sampling` (sampling.py).
Both fall back to the eager model with one warning when compiling fails (no Triton or C++ compiler, a Dynamo or
backend error), and both must not mistake a full device for a compiler failure: Dynamo wraps the out-of-memory
error of a backend in its own exceptions, so it is looked for among the causes.
"""

from __future__ import annotations

import warnings

import torch


def out_of_memory_in(error: BaseException | None) -> BaseException | None:
    """The out-of-memory error that `error` is or was caused by (Dynamo wraps a backend's errors), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, torch.OutOfMemoryError):
            return error
        seen.add(id(error))
        error = getattr(error, "inner_exception", None) or error.__cause__ or error.__context__
    return None


def warn_compile_failed(error: BaseException, going_on: str) -> None:
    """One RuntimeWarning naming the compiler's error (its text on one line) and what goes on without it."""
    reason = " ".join(str(error).split())[:300]
    warnings.warn(f"torch.compile failed ({type(error).__name__}: {reason}); {going_on}", RuntimeWarning, stacklevel=3)
