"""Heterogeneous-rank LoRA: zero-padded aggregation by hand, rank-r training and restore,
the truncation/scaling identity, planning by budget, and a tiered run within budgets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedfit.algorithms import make_algorithm
from fedfit.algorithms.base import ClientContext, Update
from fedfit.algorithms.hetlora import HetLoraOptions, truncate, truncated_adapters
from fedfit.config import load_config
from fedfit.costs.predict import predict
from fedfit.costs.spec import TrainSpec
from fedfit.devices import Budget
from fedfit.engine.experiment import run
from fedfit.engine.meter import CostMeter
from fedfit.engine.setup import cost_context_for
from fedfit.errors import ConfigError
from fedfit.models import load_model
from fedfit.payload import payload_bytes
from fedfit.planning import CostContext, Plan
from tests.engine.test_budgets import tiered
from tests.helpers import no_dropout, random_shard


def setup(*options: str):
    config = load_config(
        None,
        ["method.name=hetlora", "train.local_steps=2", "train.batch_size=4", "train.lr=1e-2"]
        + [f"method.{o}" for o in options],
    )
    model, _ = load_model("tiny-bert", "classification", num_labels=3, seed=0)
    torch.manual_seed(0)
    algorithm = make_algorithm(config)
    model = algorithm.prepare(model, "classification")
    return config, algorithm, model, ClientContext(train=config.train, meter=CostMeter())


def rank_plan(rank: int) -> Plan:
    return Plan(True, spec=TrainSpec("lora", lora_rank=rank))


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="method.ranks"):
        HetLoraOptions(max_rank=4, ranks=(8, 4))
    with pytest.raises(ConfigError, match="method.max_rank"):
        HetLoraOptions(max_rank=0)


def test_zero_padded_weighted_mean_by_hand() -> None:
    _, algorithm, model, _ = setup("max_rank=2", "ranks=[2, 1]")
    state = algorithm.init(model)
    # client 1: rank 1, every value 1, 1 example; client 2: rank 2, every value 4, 3 examples
    ups = [
        Update(i, {n: truncate(n, torch.full_like(t, v), r) for n, t in state.params.items()}, k)
        for i, (v, r, k) in enumerate(((1.0, 1, 1), (4.0, 2, 3)))
    ]
    new = algorithm.aggregate(state, ups)
    # shared rank-1 part: (1*1 + 3*4) / 4 = 3.25; rank-2 part, client 1 counts as 0:
    # (1*0 + 3*4) / 4 = 3.0; the head is a plain weighted mean, 3.25
    for n, t in new.params.items():
        assert t.shape == state.params[n].shape
        if ".lora_A." in n:
            expected = torch.tensor([3.25, 3.0])[:, None].expand_as(t)
        elif ".lora_B." in n:
            expected = torch.tensor([3.25, 3.0])[None, :].expand_as(t)
        else:
            expected = torch.full_like(t, 3.25)
        torch.testing.assert_close(t, expected, rtol=0, atol=1e-6)
    assert sum(".lora_A." in n for n in new.params) == 4  # query, value x 2 blocks


def test_rank_r_client_trains_rank_r_and_restores_the_model() -> None:
    _, algorithm, model, ctx = setup()
    state = algorithm.init(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    task = algorithm.configure(state, 0, seed=1, plan=rank_plan(2))
    update = algorithm.client_update(model, task, random_shard(0, 8, seed=3), ctx)

    assert task.config["rank"] == 2
    for n, t in update.payload.items():
        if ".lora_A." in n:
            assert t.shape == (2, state.params[n].shape[1]) == task.download[n].shape
        if ".lora_B." in n:
            assert t.shape == (state.params[n].shape[0], 2) == task.download[n].shape
            assert t.abs().sum() > 0  # trained away from peft's zero initialisation
    # what crosses the network is exactly the rank-2 model's trainable tensors (cost model)
    spec = TrainSpec("lora", lora_rank=2)
    upload = predict(model.config, "classification", 3, spec, 4, 12).upload_bytes
    assert payload_bytes(update.payload) == upload == payload_bytes(task.download)
    assert upload < payload_bytes(state.params)
    # the model is back at rank 8 with its adapters untouched
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n


def test_truncated_adapter_is_the_top_slice_of_the_global_one() -> None:
    _, _, model, _ = setup("max_rank=4", "ranks=[4, 2]")
    model = no_dropout(model).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p))
    batch = random_shard(0, 4, seed=5).batch(range(4))
    with torch.no_grad():
        full = model(**batch).logits
        with truncated_adapters(model, 2):
            small = model(**batch).logits
        for n, p in model.named_parameters():  # rank 4 with rows / columns beyond 2 zeroed
            if ".lora_A." in n:
                p[2:] = 0
            if ".lora_B." in n:
                p[:, 2:] = 0
        zeroed = model(**batch).logits
    torch.testing.assert_close(small, zeroed, rtol=1e-5, atol=1e-6)
    assert (small - full).abs().max() > 1e-3  # the dropped rank mattered


def test_plan_picks_the_largest_rank_that_fits() -> None:
    _, algorithm, model, _ = setup()
    ctx = CostContext(model.config, "classification", 3, 8, 32, 2, "adamw")
    peak = {r: ctx.estimate(TrainSpec("lora", lora_rank=r)).peak_bytes for r in (1, 2, 4, 8)}
    assert peak[1] < peak[2] < peak[4] < peak[8]
    for memory, rank in ((peak[8], 8), (peak[8] - 1, 4), (peak[4] - 1, 2), (peak[1], 1)):
        plan = algorithm.plan(Budget(memory_bytes=memory), ctx)
        assert plan.ok and plan.spec is not None and plan.spec.lora_rank == rank
    out = algorithm.plan(Budget(memory_bytes=peak[1] - 1), ctx)
    assert not out.ok and "memory" in out.reason


def test_tiered_run_stays_within_budgets_with_several_ranks(tmp_path: Path) -> None:
    probe = tiered(tmp_path, "hetlora")
    model, _ = load_model("tiny-bert", "classification", num_labels=3, seed=0)
    ctx = cost_context_for(probe, model.config, "classification", 3, largest=20)
    need = {r: ctx.padded(ctx.estimate(TrainSpec("lora", lora_rank=r)).peak_bytes) for r in (1, 8)}
    tiers = (
        f"devices.tiers=['small share=0.5 memory={need[1]}B', 'big share=0.5 memory={need[8]}B']"
    )
    out = run(tiered(tmp_path, "hetlora", tiers, "data.clients_per_round=6"), plots=False)
    rows = [json.loads(line) for line in (out / "clients.jsonl").read_text().splitlines()]
    assert {r["trained"] for r in rows} == {"LoRA r=1 + head", "LoRA r=8 + head"}
    for r in rows:
        assert r["peak_memory_bytes"] <= r["budget"]["memory_bytes"], r
        # the rank-r download and upload hold the same tensors, as the cost model predicts
        assert r["upload_bytes"] == r["download_bytes"] == r["predicted"]["upload_bytes"]
