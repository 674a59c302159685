"""Partial variable training: which blocks a client trains, what it uploads, aggregation."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedfit.algorithms import make_algorithm
from fedfit.algorithms.base import ClientContext, ServerState, Update
from fedfit.algorithms.partial import blocks_per_client, choose_blocks
from fedfit.config import load_config
from fedfit.engine.meter import CostMeter
from fedfit.models.configs import TINY_LLAMA
from fedfit.payload import payload_bytes
from tests.helpers import random_shard

LAYERS = 4


def setup(*overrides: str):
    config = load_config(
        None,
        [
            "method.name=partial",
            "train.local_steps=2",
            "train.batch_size=4",
            "train.lr=1e-2",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": LAYERS}))
    algorithm = make_algorithm(config)
    model = algorithm.prepare(model, "lm")
    return config, algorithm, model, ClientContext(train=config.train, meter=CostMeter())


def block_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


@pytest.mark.parametrize("fraction,k", [(0.5, 2), (0.25, 1), (1.0, 4)])
def test_payload_holds_only_the_chosen_blocks(fraction: float, k: int) -> None:
    _, algorithm, model, ctx = setup(f"method.fraction={fraction}")
    state = algorithm.init(model)
    algorithm.start_round(state, [3])
    task = algorithm.configure(state, 3, seed=11)
    chosen = task.config["blocks"]
    assert len(chosen) == k == len(set(chosen))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    update = algorithm.client_update(model, task, random_shard(3, 8, seed=1, lm=True), ctx)
    # exactly the chosen blocks' tensors and the final norm; never the embeddings
    expected = {n for n in before if block_of(n) in chosen or n == "model.norm.weight"}
    assert set(update.payload) == expected
    after = dict(model.named_parameters())
    for name, value in before.items():
        changed = not torch.equal(after[name].detach(), value)
        assert changed == (name in expected), name
    # the upload shrinks with the fraction: the blocks' share of the bytes
    block_bytes = payload_bytes({n: t for n, t in state.params.items() if block_of(n) is not None})
    sent = payload_bytes({n: t for n, t in update.payload.items() if block_of(n) is not None})
    assert sent == pytest.approx(block_bytes * k / LAYERS, rel=0.01)


def test_no_gradient_reaches_below_the_lowest_chosen_block() -> None:
    _, algorithm, model, ctx = setup("method.fraction=0.25", "method.selection=round_robin")
    state = algorithm.init(model)
    algorithm.start_round(state, [0, 1, 2])
    task = algorithm.configure(state, 2, seed=1)  # position 2 of round 1: block 2
    assert task.config["blocks"] == [2]
    seen: set[str] = set()
    hooks = [
        p.register_hook(lambda g, n=n: seen.add(n))  # type: ignore[misc]
        for n, p in model.named_parameters()
        if p.requires_grad
    ]
    algorithm.client_update(model, task, random_shard(0, 4, seed=2, lm=True), ctx)
    for h in hooks:
        h.remove()
    assert seen and all(block_of(n) in (2, None) for n in seen)
    assert not any("embed_tokens" in n for n in seen)


def test_round_robin_covers_every_block_and_random_is_seeded() -> None:
    k = blocks_per_client(LAYERS, 0.5)
    # one client: two rounds cover the four blocks
    assert choose_blocks(LAYERS, k, "round_robin", 0, 1, 0) == [0, 1]
    assert choose_blocks(LAYERS, k, "round_robin", 0, 2, 0) == [2, 3]
    # two clients of one round train disjoint windows
    assert choose_blocks(LAYERS, k, "round_robin", 0, 1, 1) == [2, 3]
    # wrapping window when k does not divide L
    assert choose_blocks(5, 2, "round_robin", 0, 3, 0) == [0, 4]
    draws = [tuple(choose_blocks(LAYERS, k, "random", s, 1, 0)) for s in range(200)]
    assert draws[0] == tuple(choose_blocks(LAYERS, k, "random", 0, 1, 0))
    counts = torch.bincount(torch.tensor([b for d in draws for b in d]), minlength=LAYERS)
    assert counts.sum() == 400 and counts.min() > 70  # each block ~100 times of 400
    assert blocks_per_client(30, 1 / 4) == 8 and blocks_per_client(3, 0.1) == 1


def test_aggregate_averages_each_tensor_over_the_clients_that_trained_it() -> None:
    config, algorithm, model, _ = setup()
    state = algorithm.init(model)
    name_a = next(n for n in state.params if block_of(n) == 0)
    name_b = next(n for n in state.params if block_of(n) == 1)
    name_c = next(n for n in state.params if block_of(n) == 3)
    a, b = state.params[name_a], state.params[name_b]
    updates = [
        Update(0, {name_a: a + 1.0, name_b: b + 3.0}, num_examples=10),
        Update(1, {name_a: a - 2.0}, num_examples=30),
    ]
    new = algorithm.aggregate(state, updates)
    assert isinstance(new, ServerState) and new.round == 1
    # fedavg, server lr 1: weighted mean over holders; untrained tensors keep their value
    torch.testing.assert_close(new.params[name_a], a + (10 * 1.0 - 30 * 2.0) / 40)
    torch.testing.assert_close(new.params[name_b], b + 3.0)
    torch.testing.assert_close(new.params[name_c], state.params[name_c])


def test_each_block_choice_is_metered_for_itself() -> None:
    """One meter across clients that train different blocks of the same size: each client's
    FLOPs are its own (backward from block 0 costs more than from block 3), as measured by a
    fresh meter."""
    _, algorithm, model, ctx = setup("method.fraction=0.25", "method.selection=round_robin")
    state = algorithm.init(model)
    algorithm.start_round(state, [0, 1, 2, 3])
    shard = random_shard(0, 8, seed=4, lm=True, length=10)
    flops = {}
    for cid in (0, 3):
        task = algorithm.configure(state, cid, seed=1)
        ctx.meter.start_client()
        algorithm.client_update(model, task, shard, ctx)
        flops[cid] = ctx.meter.flops
        fresh = ClientContext(train=ctx.train, meter=CostMeter())
        algorithm.client_update(model, task, shard, fresh)
        assert fresh.meter.flops == flops[cid]
    assert flops[0] > flops[3]
