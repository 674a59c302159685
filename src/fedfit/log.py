"""fedfit's one way to tell the user what is going on: a line on stderr, flushed at once
(stdout stays for what a command prints as its result)."""

from __future__ import annotations

import sys


def log(message: str) -> None:
    """``message`` as one line on stderr."""
    print(message, file=sys.stderr, flush=True)
