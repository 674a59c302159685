"""Methods by name: each algorithm file registers itself at its bottom; lookups are a dict."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AlgorithmEntry:
    name: str
    cls: type
    options: type
    description: str


ALGORITHMS: dict[str, AlgorithmEntry] = {}


def register(name: str, options: type, description: str) -> Callable[[type], type]:
    """Class decorator: make ``cls`` selectable as ``[method] name = "<name>"``."""

    def wrap(cls: type) -> type:
        if name in ALGORITHMS:
            raise ValueError(f"method {name!r} registered twice")
        ALGORITHMS[name] = AlgorithmEntry(name, cls, options, description)
        return cls

    return wrap


def make_algorithm(config: Any) -> Any:
    """Instantiate the configured method: ``cls(options, config)``."""
    entry = ALGORITHMS[config.method.name]
    return entry.cls(config.method.options, config)
