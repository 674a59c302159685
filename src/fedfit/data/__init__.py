"""Datasets, client partitioning and the tokenisation cache.

Datasets register by name (``tweets``, ``shakespeare``) and load from installed packages,
never from the network; a user's own CSV / JSONL / Parquet / ``save_to_disk`` data loads
from ``[data] path`` (:mod:`fedfit.data.files`), and :func:`load_configured` picks between
the two. Partitioning goes through Flower's partitioners; tokenisation is cached on disk and
batches are padded to their own longest sequence.
"""

from __future__ import annotations

# Importing the dataset modules registers them.
from fedfit.data import shakespeare as shakespeare
from fedfit.data import tweets as tweets
from fedfit.data.base import (
    DatasetInfo,
    TextDataset,
    list_datasets,
    load_dataset,
    register_dataset,
)
from fedfit.data.config import DataConfig
from fedfit.data.files import load_configured, load_local
from fedfit.data.partition import SCHEMES, label_skew, natural_client_names, partition
from fedfit.data.tokens import IGNORE_INDEX, collate, tokenize
from fedfit.errors import DataError, DatasetNotAvailable

__all__ = [
    "IGNORE_INDEX",
    "SCHEMES",
    "DataConfig",
    "DatasetInfo",
    "DataError",
    "DatasetNotAvailable",
    "TextDataset",
    "collate",
    "label_skew",
    "list_datasets",
    "load_configured",
    "load_dataset",
    "load_local",
    "natural_client_names",
    "partition",
    "register_dataset",
    "tokenize",
]
