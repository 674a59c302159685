"""Partitioning through Flower's partitioners: coverage, min sizes, determinism, skew."""

from __future__ import annotations

import numpy as np
import pytest

from fedfit.data import label_skew, load_dataset, natural_client_names, partition


def _labels(n: int = 3000, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 3, n).tolist()


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)  # sorted, unique
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def test_iid_covers_every_index_once_in_equal_shards() -> None:
    parts = partition(_labels(1003), None, 10, "iid")
    _assert_exact_cover(parts, 1003)
    assert sorted(len(p) for p in parts) == [100] * 7 + [101] * 3
    # shuffled before sharding: a client is not a contiguous run of the file
    assert np.ptp(parts[0]) > 900


def test_iid_needs_only_groups_length() -> None:
    parts = partition(None, ["a"] * 20, 4, "iid")
    _assert_exact_cover(parts, 20)


def test_dirichlet_covers_every_index_once() -> None:
    labels = _labels()
    parts = partition(labels, None, 10, "dirichlet", alpha=0.5, min_examples=5)
    _assert_exact_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 5


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_same_seed_same_split_other_seed_other_split(scheme: str) -> None:
    labels = _labels()
    a = partition(labels, None, 8, scheme, seed=3)
    b = partition(labels, None, 8, scheme, seed=3)
    c = partition(labels, None, 8, scheme, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_too_few_examples_for_clients() -> None:
    with pytest.raises(ValueError, match=r"too few examples \(25\) for 10 clients with at least 3"):
        partition(_labels(25), None, 10, "iid", min_examples=3)
    with pytest.raises(ValueError, match="too few examples"):
        partition(_labels(25), None, 10, "dirichlet", min_examples=3)


def test_dirichlet_min_examples_unreachable_is_explained() -> None:
    # 3 classes, 50 clients, alpha 0.01: most clients get nothing in every draw
    with pytest.raises(ValueError, match="min_examples=0 to allow empty clients"):
        partition(_labels(600), None, 50, "dirichlet", alpha=0.01, min_examples=1)
    parts = partition(_labels(600), None, 50, "dirichlet", alpha=0.01, min_examples=0)
    _assert_exact_cover(parts, 600)
    assert sum(len(p) == 0 for p in parts) > 0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown partition scheme 'shards'"):
        partition(_labels(), None, 4, "shards")
    with pytest.raises(ValueError, match="has no labels"):
        partition(None, ["a"] * 10, 2, "dirichlet")
    with pytest.raises(ValueError, match="has none"):
        partition(_labels(), None, 2, "natural")


GROUPS = ["b", "a", "b", "c", "a", "b", "d", "d"]


def test_natural_one_client_per_group_largest_first() -> None:
    parts = partition(None, GROUPS, 4, "natural")
    # sizes b:3, a:2, d:2, c:1 -> b, then a and d tied (by name), then c
    assert natural_client_names(GROUPS, 4) == ["b", "a", "d", "c"]
    assert [p.tolist() for p in parts] == [[0, 2, 5], [1, 4], [6, 7], [3]]
    assert [p.tolist() for p in partition(None, GROUPS, 2, "natural")] == [[0, 2, 5], [1, 4]]


def test_natural_min_examples_and_too_many_clients() -> None:
    parts = partition(None, GROUPS, 3, "natural", min_examples=2)
    assert [p.tolist() for p in parts] == [[0, 2, 5], [1, 4], [6, 7]]
    with pytest.raises(ValueError, match="only 3 of the 4 groups have >= 2 examples"):
        partition(None, GROUPS, 4, "natural", min_examples=2)


def test_label_skew_against_hand_computed_values() -> None:
    labels = [0, 0, 1, 1, 0, 0]  # global distribution (2/3, 1/3)
    # client [0, 1]: (1, 0) -> TV 1/3; client [2, 3]: (0, 1) -> TV 2/3; mean 1/2
    assert label_skew([np.array([0, 1]), np.array([2, 3])], labels, 2) == pytest.approx(0.5)
    # clients shaped like the whole: 0; empty clients are ignored
    iid = [np.array([0, 2, 4]), np.array([1, 3, 5]), np.array([], dtype=np.int64)]
    assert label_skew(iid, labels, 2) == pytest.approx(0.0)
    # a class the data never shows still counts in num_classes without changing TV
    assert label_skew([np.array([0, 1]), np.array([2, 3])], labels, 3) == pytest.approx(0.5)


@pytest.mark.real
def test_dirichlet_skew_on_tweets_grows_as_alpha_shrinks() -> None:
    labels = load_dataset("tweets").train_labels
    assert labels is not None
    skew = {}
    for alpha in (0.1, 100.0):
        # alpha 0.1 over 100 clients leaves some clients empty in every draw (see the
        # partition module): allow them here, the skew ignores them
        parts = partition(labels, None, 100, "dirichlet", alpha=alpha, min_examples=0)
        _assert_exact_cover(parts, len(labels))
        skew[alpha] = label_skew(parts, labels, 3)
    iid = label_skew(partition(labels, None, 100, "iid"), labels, 3)
    assert skew[0.1] > 2 * skew[100.0]
    assert skew[0.1] > 0.4 and skew[100.0] < 0.06 and iid < 0.06


@pytest.mark.real
def test_natural_on_shakespeare_roles() -> None:
    ds = load_dataset("shakespeare")
    groups = ds.train_groups
    assert groups is not None
    parts = partition(None, groups, 50, "natural", min_examples=10)
    names = natural_client_names(groups, 50, 10)
    # Hamlet has the most turns of any role (358; 323 after holding out the last tenth)
    assert names[0] == "hamlet/HAM" and len(parts[0]) == 323
    for name, part in zip(names, parts, strict=True):
        assert {groups[i] for i in part} == {name}
        assert len(part) == groups.count(name)
    assert [len(p) for p in parts] == sorted((len(p) for p in parts), reverse=True)


def test_inner_dirichlet_equal_sizes_disjoint_and_skewed_at_low_alpha() -> None:
    labels = _labels(3000)
    parts = partition(labels, None, 100, "inner_dirichlet", alpha=0.1, min_examples=1)
    assert [len(p) for p in parts] == [30] * 100  # equal sizes: no empty client at alpha 0.1
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == len(flat)  # disjoint (n // k each, remainder unused)
    assert all(np.all(np.diff(p) > 0) for p in parts)
    low = label_skew(parts, labels, 3)
    high = label_skew(partition(labels, None, 100, "inner_dirichlet", alpha=100.0), labels, 3)
    assert low > 0.4 and high < 0.2
    again = partition(labels, None, 100, "inner_dirichlet", alpha=0.1, min_examples=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
