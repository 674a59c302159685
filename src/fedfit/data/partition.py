"""Split a training set over clients with Flower's partitioners, and measure the label skew.

Every scheme is the split of a ``flwr_datasets.partitioner`` (the non-IID ones run through
it, on a ``datasets.Dataset`` holding the example indices and labels / groups), so that a
fedfit split is the split Flower users know:

- ``iid``: :class:`IidPartitioner`'s equal contiguous shards of a seeded permutation, cut
  here with one ``np.array_split`` (the same shards: the first n % k are one longer) rather
  than one ``datasets.Dataset`` per client, which costs about 0.5 ms each, 5 s for 10,000
  clients (tests/test_population.py holds the two equal);
- ``dirichlet``: :class:`DirichletPartitioner` by label (Hsu et al. 2019, "Measuring the
  effects of non-identical data distribution"; Yurochkin et al. 2019): for each class a
  proportion vector over clients is drawn from Dir(alpha) and the class is cut in those
  proportions. Small alpha = few classes per client and very unequal client sizes. The
  data is permuted with the seed first (as ``FederatedDataset`` does), so a client's
  examples of one class are not a contiguous run of the source file (tweets are sorted by
  topic). ``self_balancing`` stays off: it zeroes the share of clients already above the
  mean size, which is no longer the plain Dirichlet split of the papers. Flower redraws
  up to 10 times when a client falls under ``min_examples``, then gives up; with 100
  clients and alpha = 0.1 on tweets EVERY draw leaves some clients empty (about 8), so
  that setting needs ``min_examples=0``, fewer clients or a larger alpha (0.3 works);
- ``inner_dirichlet``: :class:`InnerDirichletPartitioner` by label: every client gets the
  same number of examples (n // num_clients) and its own class proportions drawn from
  Dir(alpha) (the setting of Spry's skewed runs). Unlike ``dirichlet`` it works at any
  alpha (0.1 included): skew shows as few classes per client, never as empty clients;
- ``natural``: :class:`NaturalIdPartitioner` by group (one client per speaking role).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

SCHEMES = ("iid", "dirichlet", "inner_dirichlet", "natural")


def partition(
    labels: Sequence[int] | None,
    groups: Sequence[str] | None,
    num_clients: int,
    scheme: str,
    alpha: float = 0.5,
    min_examples: int = 1,
    seed: int = 0,
    num_examples: int | None = None,
) -> list[np.ndarray]:
    """One sorted int64 array of training-set indices per client (module docstring).

    ``labels`` are needed by ``dirichlet``, ``groups`` by ``natural``; ``iid`` needs either,
    or ``num_examples`` (only the size is used: a language-modelling set has no labels). Every client gets at least ``min_examples`` examples or a
    ValueError says why not. The same arguments always give the same split. For
    ``natural`` the clients are the ``num_clients`` largest groups having >= ``min_examples``
    examples, largest first (ties by name; :func:`natural_client_names` gives the names).
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if min_examples < 0:
        raise ValueError(f"min_examples must be >= 0, got {min_examples}")
    if scheme == "iid":
        size = num_examples if num_examples is not None else _size(labels, groups)
        return _iid(size, num_clients, min_examples, seed)
    if scheme == "inner_dirichlet":
        if labels is None:
            raise ValueError("scheme 'inner_dirichlet' splits by label: this dataset has no labels")
        return _inner_dirichlet(labels, num_clients, alpha, min_examples, seed)
    if scheme == "dirichlet":
        if labels is None:
            raise ValueError("scheme 'dirichlet' splits by label: this dataset has no labels")
        return _dirichlet(labels, num_clients, alpha, min_examples, seed)
    if scheme == "natural":
        if groups is None:
            raise ValueError("scheme 'natural' needs natural client ids: this dataset has none")
        return _natural(groups, num_clients, min_examples)
    raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


def _size(labels: Sequence[int] | None, groups: Sequence[str] | None) -> int:
    if labels is not None:
        return len(labels)
    if groups is not None:
        return len(groups)
    raise ValueError("partition needs labels or groups (for their length)")


def _check_enough(num_examples: int, num_clients: int, min_examples: int) -> None:
    if num_examples < num_clients * max(min_examples, 1):
        raise ValueError(
            f"too few examples ({num_examples}) for {num_clients} clients with at least "
            f"{max(min_examples, 1)} each"
        )


def _table(columns: dict[str, Any]) -> Any:
    """A ``datasets.Dataset`` of the given columns that hands columns out as Arrow arrays.

    The Arrow format matters for speed: in the default format a column is a lazy ``Column``
    that ``np.array`` (as Flower calls it) reads row by row, 3 s for the 33k tweets; as
    Arrow it is one buffer copy.
    """
    import datasets  # heavy; imported when a split is made, not with fedfit.data

    return datasets.Dataset.from_dict(columns).with_format("arrow")


def _client_indices(partitioner: Any, partition_id: int) -> np.ndarray:
    # A partition's rows carry the "index" column we put in: the training-set indices.
    column = partitioner.load_partition(partition_id)["index"]
    return np.sort(np.asarray(column, dtype=np.int64))


def _iid(num_examples: int, num_clients: int, min_examples: int, seed: int) -> list[np.ndarray]:
    _check_enough(num_examples, num_clients, min_examples)
    # IidPartitioner cuts contiguous shards, so shuffling is ours to do (with the seed).
    order = np.random.default_rng(seed).permutation(num_examples).astype(np.int64, copy=False)
    # Its shards (datasets' ``shard(k, i, contiguous=True)``): n // k examples each, one more
    # for the first n % k, which is how np.array_split cuts too; so the smallest is floor(n / k).
    return [np.sort(shard) for shard in np.array_split(order, num_clients)]


def _dirichlet(
    labels: Sequence[int], num_clients: int, alpha: float, min_examples: int, seed: int
) -> list[np.ndarray]:
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    _check_enough(len(labels), num_clients, min_examples)
    order = np.random.default_rng(seed).permutation(len(labels))
    label_array = np.asarray(labels, dtype=np.int64)[order]
    from flwr_datasets.partitioner import DirichletPartitioner

    partitioner = DirichletPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        alpha=float(alpha),
        min_partition_size=min_examples,
        self_balancing=False,
        shuffle=False,  # we sort the indices anyway
        seed=seed,
    )
    partitioner.dataset = _table({"index": order, "label": label_array})
    try:
        with warnings.catch_warnings():
            # Flower warns on every redraw; the outcome (success or our error) says enough.
            warnings.simplefilter("ignore")
            return [_client_indices(partitioner, i) for i in range(num_clients)]
    except ValueError as err:
        if "max number of attempts" not in str(err):
            raise
        raise ValueError(
            f"Dirichlet(alpha={alpha}) over {num_clients} clients left some client with fewer "
            f"than {min_examples} examples in 11 draws ({len(labels)} examples); use a larger "
            f"alpha, fewer clients, or min_examples=0 to allow empty clients"
        ) from err


def _inner_dirichlet(
    labels: Sequence[int], num_clients: int, alpha: float, min_examples: int, seed: int
) -> list[np.ndarray]:
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    _check_enough(len(labels), num_clients, min_examples)
    order = np.random.default_rng(seed).permutation(len(labels))
    label_array = np.asarray(labels, dtype=np.int64)[order]
    from flwr_datasets.partitioner import InnerDirichletPartitioner

    size = len(labels) // num_clients
    partitioner = InnerDirichletPartitioner(
        partition_sizes=[size] * num_clients,
        partition_by="label",
        alpha=float(alpha),
        shuffle=False,
        seed=seed,
    )
    partitioner.dataset = _table({"index": order, "label": label_array})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [_client_indices(partitioner, i) for i in range(num_clients)]


def natural_client_names(
    groups: Sequence[str], num_clients: int | None = None, min_examples: int = 1
) -> list[str]:
    """The groups that :func:`partition` makes clients of, in client order.

    Groups with >= ``min_examples`` examples, largest first, ties by name; the first
    ``num_clients`` of them (all when None). Too few such groups is a ValueError.
    """
    sizes = Counter(groups)
    eligible = sorted(
        (g for g, n in sizes.items() if n >= min_examples), key=lambda g: (-sizes[g], g)
    )
    if num_clients is None:
        return eligible
    if num_clients > len(eligible):
        raise ValueError(
            f"asked for {num_clients} natural clients but only {len(eligible)} of the "
            f"{len(sizes)} groups have >= {min_examples} examples; ask for at most "
            f"{len(eligible)} or lower min_examples"
        )
    return eligible[:num_clients]


def _natural(groups: Sequence[str], num_clients: int, min_examples: int) -> list[np.ndarray]:
    names = natural_client_names(groups, num_clients, max(min_examples, 1))
    from flwr_datasets.partitioner import NaturalIdPartitioner

    partitioner = NaturalIdPartitioner(partition_by="group")
    partitioner.dataset = _table({"index": np.arange(len(groups)), "group": list(groups)})
    with contextlib.redirect_stderr(io.StringIO()):
        # Flower numbers the groups lazily (on first use) and draws a tqdm bar doing it.
        _ = partitioner.num_partitions
        id_of = {name: pid for pid, name in partitioner.partition_id_to_natural_id.items()}
        return [_client_indices(partitioner, id_of[name]) for name in names]


def label_skew(parts: list[np.ndarray], labels: Sequence[int], num_classes: int) -> float:
    """Mean total-variation distance between each client's label distribution and the global.

    ``TV(p, q) = 0.5 * sum_c |p_c - q_c|`` lies in [0, 1]: 0 when a client's labels are
    distributed like the whole training set (IID), near 1 when it holds only a class that
    is rare overall. The mean is unweighted over non-empty clients, so a small skewed client
    counts as much as a big one (clients, not examples, are what FL averages over).
    """
    y = np.asarray(labels, dtype=np.int64)
    global_dist = np.bincount(y, minlength=num_classes) / len(y)
    distances = []
    for part in parts:
        if len(part) == 0:
            continue
        dist = np.bincount(y[part], minlength=num_classes) / len(part)
        distances.append(0.5 * np.abs(dist - global_dist).sum())
    if not distances:
        raise ValueError("label_skew needs at least one non-empty client")
    return float(np.mean(distances))
