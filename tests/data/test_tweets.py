"""Tweets: raw counts against docs/offline.md, cleaning rules on hand-made rows, the fixed split."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from fedfit.data import load_dataset, tweets


@pytest.mark.real
def test_raw_counts_match_offline_md() -> None:
    rows = tweets.read_rows(tweets.csv_path())
    assert len(rows) == 38_158
    assert Counter(s for s, _ in rows) == {"negative": 16_186, "neutral": 15_018, "positive": 6_954}
    assert len(rows) - len({t.strip() for _, t in rows}) == 915


def test_clean_collapses_duplicates_and_drops_conflicts() -> None:
    rows = [
        ("positive", "  good  "),
        ("positive", "good"),  # duplicate once stripped
        ("negative", "bad _\ufffd_"),  # mojibake kept as is
        ("neutral", "meh"),
        ("positive", "meh"),  # same text, other label: both copies go
        ("negative", "   "),  # empty
    ]
    texts, labels, stats = tweets.clean(rows)
    assert texts == ["good", "bad _\ufffd_"]
    assert labels == [2, 0]
    assert stats == {
        "raw_rows": 6,
        "empty_texts_dropped": 1,
        "duplicates_removed": 2,
        "conflicting_label_texts_dropped": 1,
    }


@pytest.mark.real
def test_loaded_counts_after_cleaning() -> None:
    ds = load_dataset("tweets")
    assert ds.stats["duplicates_removed"] == 915
    assert ds.stats["conflicting_label_texts_dropped"] == 46
    total = 38_158 - 915 - 46
    assert len(ds.train_texts) + len(ds.test_texts) == total
    all_labels = ds.train_labels + ds.test_labels  # type: ignore[operator]
    assert Counter(all_labels) == {0: 15_955, 1: 14_431, 2: 6_811}
    assert ds.label_names == ("negative", "neutral", "positive")
    assert ds.train_groups is None


@pytest.mark.real
def test_split_is_disjoint_stratified_and_fixed() -> None:
    ds = load_dataset("tweets")
    assert not set(ds.train_texts) & set(ds.test_texts)
    train, test = Counter(ds.train_labels), Counter(ds.test_labels)
    for label in range(3):
        assert test[label] == round(0.1 * (train[label] + test[label]))
    again = tweets.load()  # bypasses the in-process cache
    assert again.test_texts == ds.test_texts and again.train_texts == ds.train_texts


def test_held_out_mask_ignores_order() -> None:
    texts = [f"tweet {i}" for i in range(200)]
    labels = [i % 3 for i in range(200)]
    mask = tweets.held_out_mask(texts, labels)
    held = {t for t, m in zip(texts, mask, strict=True) if m}
    assert len(held) == round(0.1 * 67) + round(0.1 * 67) + round(0.1 * 66)
    order = list(range(200))
    random.Random(1).shuffle(order)
    mask2 = tweets.held_out_mask([texts[i] for i in order], [labels[i] for i in order])
    assert {texts[i] for i, m in zip(order, mask2, strict=True) if m} == held
