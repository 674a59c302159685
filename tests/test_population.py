"""Population scale (issue 17): the compact paths of the setup give what the per-client ones
gave. IID shards are cut with one ``np.array_split`` instead of a Flower partition per
client; plans are made once per distinct budget instead of once per client; exclusions are
logged once per tier and reason. benchmarks/population.py measures what they save."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedfit.algorithms import make_algorithm
from fedfit.config import load_config
from fedfit.data import partition
from fedfit.devices import Budget, build_population
from fedfit.engine.experiment import run
from fedfit.engine.runfolder import RunFolder
from fedfit.engine.setup import cost_context_for, log_exclusions, plan_population
from fedfit.models import load_model
from tests.helpers import tiny_run_config

TIERS = (
    "devices.tiers=['eighth share=0.25 memory=1/8x', 'quarter share=0.25 memory=1/4x', "
    "'half share=0.25 memory=1/2x', 'full share=0.25 memory=1x']"
)


def flower_iid(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """The reference: what ``partition(..., "iid")`` returned before, Flower's IidPartitioner
    (one ``Dataset.shard`` per client) over the same seeded permutation."""
    import datasets
    from flwr_datasets.partitioner import IidPartitioner

    order = np.random.default_rng(seed).permutation(num_examples)
    partitioner = IidPartitioner(num_partitions=num_clients)
    partitioner.dataset = datasets.Dataset.from_dict({"index": order}).with_format("arrow")
    return [
        np.sort(np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64))
        for i in range(num_clients)
    ]


@pytest.mark.parametrize(
    ("num_examples", "num_clients", "seed"),
    [(10, 3, 0), (103, 10, 1), (50, 50, 2), (7, 1, 3), (1000, 333, 4), (3301, 1000, 0)],
)
def test_iid_shards_are_flowers(num_examples: int, num_clients: int, seed: int) -> None:
    shards = partition(None, None, num_clients, "iid", seed=seed, num_examples=num_examples)
    reference = flower_iid(num_examples, num_clients, seed)
    assert len(shards) == len(reference) == num_clients
    for got, want in zip(shards, reference, strict=True):
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("method", ["layers", "hetlora", "fedavg"])
def test_one_plan_per_budget_equals_a_plan_per_client(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: four tiers of 40 clients, and the same budgets again as equal, distinct
    # objects (as a trace gives them), so equal values, not identity, decide the sharing.
    config = load_config(None, ["model.name=tiny-bert", f"method.name={method}",
                                "devices.population=tiers", TIERS])  # fmt: skip
    model, _ = load_model("tiny-bert", "classification", num_labels=3, seed=0)
    ctx = cost_context_for(config, model.config, "classification", 3, largest=20)
    algorithm = make_algorithm(config)
    algorithm.prepare(model, "classification")
    population = build_population(config.devices, 40, ctx.reference(), seed=0)
    budgets = [*population.budgets, *(Budget(**vars(b)) for b in population.budgets)]
    assert len(set(budgets)) == 4
    # Execute: the brute force first, then the shared plans with plan calls counted.
    each = [algorithm.plan(budget, ctx) for budget in budgets]
    calls: list[Budget] = []
    plan = type(algorithm).plan
    monkeypatch.setattr(
        type(algorithm), "plan", lambda self, b, c: calls.append(b) or plan(self, b, c)
    )
    shared = plan_population(algorithm, budgets, ctx)
    # Assert: the same plan for every client, made once per tier.
    assert shared == each
    assert len(calls) == 4


def test_exclusions_are_logged_once_per_tier_and_resource(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare: a tier whose clients share one reason, one whose budgets differ (a trace's),
    # and a client alone in its (tier, resource).
    excluded = {cid: "memory 9 MB > budget 4 MB" for cid in range(0, 40, 4)}
    excluded |= {cid: f"memory 9 MB > budget {cid / 10} MB" for cid in range(2, 40, 4)}
    excluded[1] = "flops 2 GFLOP > budget 1 GFLOP"
    tiers = ["small" if cid % 4 == 0 else "mid" for cid in range(40)]
    # Execute
    log_exclusions(excluded, tiers)
    # Assert
    assert capsys.readouterr().err.splitlines() == [
        "10 clients (0, 4, 8, 12, 16, ...) of tier small excluded: memory 9 MB > budget 4 MB",
        "10 clients (2, 6, 10, 14, 18, ...) of tier mid excluded: e.g. client 2: memory 9 MB "
        "> budget 0.2 MB",
        "client 1 of tier mid excluded: flops 2 GFLOP > budget 1 GFLOP",
    ]


def test_round_0_timing_holds_the_setup_parts(tmp_path: Path) -> None:
    out = run(tiny_run_config(tmp_path, "run.rounds=1"), plots=False)
    timing = RunFolder(out).timing()
    parts = timing[0]["setup_s"]
    assert set(parts) == {"data", "model", "tokenize", "planning"}
    assert all(s >= 0 for s in parts.values())
    assert sum(parts.values()) <= timing[0]["wall_s"]
    assert all("setup_s" not in t for t in timing[1:])
