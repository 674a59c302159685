"""Constraint-aware layer fine-tuning: layer-wise aggregation by hand, frozen prefix."""

from __future__ import annotations

import pytest
import torch

from fedfit.algorithms import make_algorithm
from fedfit.algorithms.base import ClientContext, Update
from fedfit.algorithms.layers import layer_groups, trained_names
from fedfit.config import load_config
from fedfit.costs import measure_step
from fedfit.engine.meter import CostMeter
from fedfit.models import load_model
from tests.helpers import random_shard


def layers_setup(*overrides: str):
    config = load_config(
        None, ["method.name=layers", "train.local_steps=2", "train.batch_size=4", *overrides]
    )
    model, _ = load_model("tiny-bert", "classification", num_labels=3, seed=0)
    algorithm = make_algorithm(config)
    model = algorithm.prepare(model, "classification")
    return config, algorithm, model


def test_groups_are_head_then_blocks_top_down() -> None:
    _, _, model = layers_setup()
    groups = layer_groups(model, "classification")
    assert len(groups) == 3  # head + 2 blocks
    assert all("classifier" in n or "pooler" in n for n in groups[0])
    assert all(".layer.1." in n for n in groups[1])
    assert all(".layer.0." in n for n in groups[2])
    assert not any("embeddings" in n for g in groups for n in g)


def _updates(state, groups):
    """Three clients: depth 1 (1 example, value 1), depth 2 (2 ex., 4), depth 2 (3 ex., 10)."""
    ups = []
    for cid, (depth, n, value) in enumerate([(1, 1, 1.0), (2, 2, 4.0), (2, 3, 10.0)]):
        names = trained_names(groups, depth)
        ups.append(Update(cid, {k: torch.full_like(state.params[k], value) for k in names}, n))
    return ups


@pytest.mark.parametrize("aggregation", ["weighted", "r_weighted"])
def test_layerwise_aggregation_by_hand(aggregation: str) -> None:
    _, algorithm, model = layers_setup(f"method.aggregation={aggregation}", "method.max_depth=1")
    groups = layer_groups(model, "classification")
    state = algorithm.init(model)
    new = algorithm.aggregate(state, _updates(state, groups))
    # head and top block: trained by all three -> (1*1 + 2*4 + 3*10) / 6 = 6.5 (r = 1)
    for name in groups[0] + groups[1]:
        assert torch.allclose(new.params[name], torch.full_like(new.params[name], 6.5))
    # block 0: trained by clients 1 and 2 -> (2*4 + 3*10) / 5 = 7.6
    for name in groups[2]:
        old = state.params[name]
        expected = torch.full_like(old, 7.6)
        if aggregation == "r_weighted":  # r = 2/3 of the round's clients trained it
            expected = 2 / 3 * expected + 1 / 3 * old
        torch.testing.assert_close(new.params[name], expected, rtol=0, atol=1e-6)


def test_untrained_layer_keeps_its_value() -> None:
    _, algorithm, model = layers_setup("method.max_depth=1")
    groups = layer_groups(model, "classification")
    state = algorithm.init(model)
    only_top = [u for u in _updates(state, groups) if u.client_id == 0]
    new = algorithm.aggregate(state, only_top)
    for name in groups[2]:
        assert torch.equal(new.params[name], state.params[name])


def test_client_trains_and_uploads_only_its_depth() -> None:
    config, algorithm, model = layers_setup("method.max_depth=1")
    groups = layer_groups(model, "classification")
    state = algorithm.init(model)
    ctx = ClientContext(train=config.train, meter=CostMeter())
    update = algorithm.client_update(
        model, algorithm.configure(state, 0, seed=3), random_shard(0, 8, seed=1), ctx
    )
    assert set(update.payload) == set(groups[0] + groups[1])
    for name in groups[2]:  # the lower block was not trained (and not sent)
        assert name not in update.payload
        assert torch.equal(dict(model.named_parameters())[name], state.params[name])


def test_no_backward_below_the_first_trained_block() -> None:
    """Depth 1 keeps fewer activations and does fewer FLOPs than depth 2 (measured)."""
    _, _, model = layers_setup()
    groups = layer_groups(model, "classification")
    batch = random_shard(0, 8, seed=2).batch(list(range(8)))
    model.train()
    costs = {}
    for depth in (1, 2):
        names = set(trained_names(groups, depth))
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        _, memory, flops = measure_step(model, opt, batch)
        costs[depth] = (memory.activations_bytes, flops)
    assert costs[1][0] < costs[2][0] and costs[1][1] < costs[2][1]
