"""Budgets in a run: excluded devices are counted, nobody ever runs over budget (measured)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedfit.config import load_config
from fedfit.engine.experiment import run
from fedfit.engine.runfolder import RunFolder
from tests.engine.test_local import TINY

TIERS = (
    "devices.tiers=['tiny share=0.25 memory=1/8x', 'half share=0.5 memory=1/2x', "
    "'full share=0.25 memory=1x']"
)


def tiered(tmp_path: Path, method: str, tiers: str = TIERS, *extra: str):
    return load_config(
        None,
        [
            *TINY,
            f"run.output_dir={tmp_path}",
            f"method.name={method}",
            "run.rounds=2",
            "devices.population=tiers",
            tiers,
            *extra,
        ],
    )


@pytest.mark.parametrize("method", ["layers", "fedavg", "lora"])
def test_no_client_exceeds_its_budget(tmp_path: Path, method: str) -> None:
    out = run(tiered(tmp_path, method), plots=False)
    rows = [json.loads(line) for line in (out / "clients.jsonl").read_text().splitlines()]
    summary = RunFolder(out).summary()
    assert rows
    for r in rows:
        budget = r["budget"]
        assert r["peak_memory_bytes"] <= budget["memory_bytes"], r
        assert r["tier"] != "tiny" or method == "lora"
        assert r["predicted"]["peak_memory_bytes"] <= budget["memory_bytes"]
    # the 1/8 tier cannot hold the weights of full fine-tuning, nor of layer fine-tuning
    tiny_clients = 3  # 25% of 12
    if method in ("layers", "fedavg"):
        assert summary["excluded_clients"] >= tiny_clients
        assert all("memory" in reason for reason in summary["excluded"].values())
    if method == "fedavg":  # only the 1x tier fits full fine-tuning
        assert summary["excluded_clients"] == 12 - 3
    if method == "layers":  # the half tier trains fewer blocks than the full tier
        depth = {r["tier"]: r["trained"] for r in rows}
        assert depth.get("full") == "top 2 blocks + head"


def test_population_where_nobody_fits_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no device of the population fits"):
        run(tiered(tmp_path, "fedavg", "devices.tiers=['small share=1 memory=1/4x']"))


# Gradient-free methods at a few tangents / perturbations, so that each run takes seconds.
GRADIENT_FREE = {
    "spry": (),
    "fedfgd": (),
    "fwdllm": ("method.tangents=2", "method.candidates=4"),
    "baffle": ("method.tangents=2",),
    "fedmezo": (),
    "fedkseed": (),
    "fedkseed-pro": (),
    "decomfl": ("method.perturbations=2",),
    "fedspzo": ("method.p2=2",),
}


@pytest.mark.parametrize("method", list(GRADIENT_FREE))
def test_gradient_free_clients_stay_within_budget_and_prediction(
    tmp_path: Path, method: str
) -> None:
    """Planned by the cost model, no client of a gradient-free method exceeds its memory
    budget, and none exceeds its prediction (worst-case shape, worst Spry share, worst
    catch-up replay) beyond the model's tolerance; uploads are never above the prediction."""
    fast = ("run.rounds=1", "train.local_steps=1", "data.eval_examples=30")
    out = run(tiered(tmp_path, method, TIERS, *fast, *GRADIENT_FREE[method]), plots=False)
    rows = [json.loads(line) for line in (out / "clients.jsonl").read_text().splitlines()]
    assert rows
    for r in rows:
        budget, predicted = r["budget"], r["predicted"]
        assert r["peak_memory_bytes"] <= budget["memory_bytes"], r
        assert predicted["peak_memory_bytes"] <= budget["memory_bytes"]
        assert r["peak_memory_bytes"] <= 1.10 * predicted["peak_memory_bytes"], r
        assert r["flops"] <= 1.05 * predicted["flops"], r
        assert r["upload_bytes"] <= predicted["upload_bytes"], r


def test_every_registered_method_is_planned(tmp_path: Path) -> None:
    """``fedfit plan``'s rows: a predicted peak, FLOPs and upload for every registered method
    in every tier, and the budget decides who is in (no method lacks a cost model)."""
    from fedfit.algorithms.registry import ALGORITHMS
    from fedfit.engine.tier_table import plan_rows

    rows = plan_rows(tiered(tmp_path, "fedavg"), tuple(ALGORITHMS))
    assert {r.method for r in rows} == set(ALGORITHMS)
    for r in rows:
        assert r.plan.estimate is not None, r.method
        assert r.memory and r.flops and r.upload, r.method
        assert r.plan.ok == (r.memory <= r.budget.memory_bytes), r.method
    # the 1/2 tier cannot train the full model with backprop; a zero-order step of it is an
    # inference with the weights perturbed in place
    fits = {r.method for r in rows if r.tier == "half" and r.plan.ok}
    assert "fedavg" not in fits and "fedmezo" in fits
