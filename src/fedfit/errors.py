"""fedfit's own error types, and the two checks that raise ``ConfigError``.

A leaf module: it imports nothing from fedfit, so any module (config sections, devices, data,
algorithms) can raise these without importing the module that assembles the config.

- ``ConfigError``: a config key or value is not allowed (raised before any work starts).
- ``DataError``: a user's own dataset file cannot be used as configured (fedfit.data.files).
- ``DatasetNotAvailable``: the package shipping a built-in dataset is not installed.
- ``RunStopped``: a run had to stop (diverged, too few valid updates); its folder is kept.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "ConfigError",
    "DataError",
    "DatasetNotAvailable",
    "RunStopped",
    "check",
    "check_choice",
]


class ConfigError(ValueError):
    """A config key or value is not allowed; the message names the key."""


class DataError(ValueError):
    """A local dataset file cannot be used as configured; the message names file and problem."""


class DatasetNotAvailable(RuntimeError):
    """The package that ships a dataset is not installed; the message names the pip command."""


class RunStopped(RuntimeError):
    """A run cannot go on (it diverged, or too few of a round's updates were valid); the
    message says why, and the run folder keeps the last good round's checkpoint."""


def check(ok: bool, key: str, message: str) -> None:
    """Raise ``ConfigError("<key>: <message>")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


def check_choice(value: str, key: str, allowed: Iterable[str]) -> None:
    """Raise ``ConfigError`` naming ``key`` and every allowed value unless ``value`` is one."""
    allowed = list(allowed)
    check(value in allowed, key, f"{value!r} is not one of {', '.join(map(repr, allowed))}")
