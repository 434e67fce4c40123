"""One exception type for mistakes a user can fix.

Every `UserError` message names the problem and the fix in one line. The entry points
(`train_ddpm.py`, `ddpm-hf ...`) print it without a traceback and exit with status 2.
"""

from __future__ import annotations

import sys

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A bad option, a missing file, an unusable dataset: something the user can fix."""


def exit_with(error: UserError) -> None:
    """Print `error` as one line on stderr and exit non-zero."""
    message = " ".join(str(error).split())
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
