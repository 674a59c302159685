"""Where fedfit keeps converted models and tokenised data on this machine."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    """The user cache directory for fedfit (``$FEDFIT_CACHE`` overrides it); created on demand."""
    root = os.environ.get("FEDFIT_CACHE")
    path = Path(root) if root else Path(platformdirs.user_cache_dir("fedfit"))
    path.mkdir(parents=True, exist_ok=True)
    return path
