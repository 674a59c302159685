"""One matrix: every registered method through the same checks on a tiny random BERT.

An algorithm's ``payload_kind`` says what its upload holds: "weights" (default: the new
values of every trainable tensor), "gradient" (FedSGD), "subset" (a share of the trainable
tensors, Spry), "slices" (leading slices of such a share, SLT) or "scalars" (seeds and projected gradients, zero-order methods).

Checks: the payload holds exactly the trainable tensors and survives serialisation; the same
task seed gives the same payload bit for bit; aggregating K identical updates equals
aggregating one; the frozen backbone never changes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedfit.algorithms import ALGORITHMS, make_algorithm
from fedfit.algorithms.base import ClientContext, Update
from fedfit.config import load_config
from fedfit.engine.meter import CostMeter
from fedfit.models import load_model
from fedfit.payload import deserialize, payload_bytes, serialize
from tests.helpers import random_shard

METHODS = sorted(ALGORITHMS)
# Options that keep a method's client update to a few forward passes in the matrix (its own
# test file checks the defaults' behaviour).
FAST = {
    "fwdllm": ["method.tangents=2", "method.candidates=4"],
    "baffle": ["method.tangents=2"],
    "decomfl": ["method.perturbations=2"],
}


def setup_method(name: str, task: str = "classification", model_name: str = "tiny-bert"):
    config = load_config(
        None,
        [
            f"method.name={name}",
            "train.local_steps=3",
            "train.batch_size=4",
            "train.lr=1e-2",
            *FAST.get(name, []),
        ],
    )
    model, _ = load_model(model_name, task, num_labels=3, seed=0)
    algorithm = make_algorithm(config)
    model = algorithm.prepare(model, task)
    ctx = ClientContext(train=config.train, meter=CostMeter())
    return config, algorithm, model, ctx


@pytest.mark.parametrize("name", METHODS)
def test_payload_is_trainable_tensors_and_round_trips(name: str) -> None:
    _, algorithm, model, ctx = setup_method(name)
    frozen_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad
    }
    state = algorithm.init(model)
    algorithm.start_round(state, [3])
    task = algorithm.configure(state, client_id=3, seed=11)
    update = algorithm.client_update(model, task, random_shard(3, 10, seed=1), ctx)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    kind = getattr(algorithm, "payload_kind", "weights")
    if kind in ("weights", "gradient"):
        assert set(update.payload) == trainable
    elif kind == "subset":  # a share of the trainable tensors (Spry)
        assert update.payload and set(update.payload) <= trainable
    elif kind == "slices":  # leading slices of a share of them (SLT's narrowed blocks)
        params = dict(model.named_parameters())
        assert update.payload and set(update.payload) <= trainable
        for n, t in update.payload.items():
            assert t.dim() == params[n].dim(), n
            assert all(a <= b for a, b in zip(t.shape, params[n].shape, strict=True)), n
    else:  # "scalars": seeds and projected gradients, far smaller than the tensors
        assert kind == "scalars", kind
        full = sum(p.numel() * 4 for n, p in model.named_parameters() if n in trainable)
        assert payload_bytes(update.payload) < 0.05 * full
    assert update.num_examples == 10
    wire = serialize(update.payload)
    assert payload_bytes(update.payload) == len(wire)
    back = deserialize(wire)
    assert all(torch.equal(back[k], update.payload[k]) for k in update.payload)
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), f"{name} changed frozen {n}"


@pytest.mark.parametrize("name", METHODS)
def test_same_seed_same_update(name: str) -> None:
    _, algorithm, model, ctx = setup_method(name)
    state = algorithm.init(model)
    shard = random_shard(0, 12, seed=2)
    algorithm.start_round(state, [0])
    a = algorithm.client_update(model, algorithm.configure(state, 0, seed=5), shard, ctx)
    b = algorithm.client_update(model, algorithm.configure(state, 0, seed=5), shard, ctx)
    c = algorithm.client_update(model, algorithm.configure(state, 0, seed=6), shard, ctx)
    assert all(torch.equal(a.payload[k], b.payload[k]) for k in a.payload)
    # Another seed changes the values, or which tensors are sent (partial training's blocks)
    assert set(a.payload) != set(c.payload) or any(
        not torch.equal(a.payload[k], c.payload[k]) for k in a.payload
    )


@pytest.mark.parametrize("name", METHODS)
def test_aggregate_of_identical_updates_is_that_update(name: str) -> None:
    _, algorithm, model, ctx = setup_method(name)
    state = algorithm.init(model)
    algorithm.start_round(state, [0])
    update = algorithm.client_update(
        model, algorithm.configure(state, 0, seed=1), random_shard(0, 8, seed=3), ctx
    )
    one = algorithm.aggregate(state, [update])
    copies = [dataclasses.replace(update, client_id=i) for i in range(4)]
    many = algorithm.aggregate(state, copies)
    assert one.round == many.round == state.round + 1
    for k in one.params:
        torch.testing.assert_close(one.params[k], many.params[k], rtol=0, atol=1e-7)
    # FedAvg family with server lr 1: the new global is the client model
    if getattr(algorithm, "payload_kind", "weights") == "weights":
        for k in one.params:
            torch.testing.assert_close(one.params[k], update.payload[k], rtol=0, atol=1e-6)


def test_lora_payload_only_adapters_and_head() -> None:
    _, algorithm, model, ctx = setup_method("lora")
    state = algorithm.init(model)
    update = algorithm.client_update(
        model, algorithm.configure(state, 0, seed=1), random_shard(0, 8, seed=3), ctx
    )
    names = set(update.payload)
    assert names and all("lora_" in n or "classifier" in n for n in names)
    total = sum(p.numel() for p in model.parameters())
    sent = sum(t.numel() for t in update.payload.values())
    assert sent < 0.2 * total
    # safetensors: 8-byte length + JSON header + raw fp32 data
    raw = sum(t.numel() * t.element_size() for t in update.payload.values())
    assert raw < payload_bytes(update.payload) < raw + 200 * len(names) + 1000


def test_fedavg_weighted_mean_by_hand() -> None:
    config, algorithm, model, _ = setup_method("head")
    state = algorithm.init(model)
    names = list(state.params)
    ups = []
    for value, n in ((1.0, 1), (4.0, 3)):
        payload = {k: torch.full_like(v, value) for k, v in state.params.items()}
        ups.append(Update(0, payload, n))
    new = algorithm.aggregate(state, ups)
    # (1*1 + 4*3) / 4 = 3.25
    for k in names:
        assert torch.allclose(new.params[k], torch.full_like(new.params[k], 3.25))


def test_fedsgd_uploads_the_mean_gradient() -> None:
    from tests.helpers import no_dropout

    config = load_config(
        None,
        ["method.name=fedsgd", "train.local_steps=0", "train.local_epochs=1", "train.batch_size=4"],
    )
    model, _ = load_model("tiny-bert", "classification", num_labels=3, seed=0)
    algorithm = make_algorithm(config)
    model = no_dropout(algorithm.prepare(model, "classification"))
    state = algorithm.init(model)
    shard = random_shard(0, 8, seed=4)  # two batches of 4, each example once
    ctx = ClientContext(train=config.train, meter=CostMeter())
    update = algorithm.client_update(model, algorithm.configure(state, 0, seed=1), shard, ctx)

    # Reference: autograd of the mean loss over the 8 examples, batch by batch (padding
    # differs per batch, so the reference uses the same two batches in the same way).
    model.zero_grad()
    model.train()
    loss = sum(model(**shard.batch(list(range(i, i + 4)))).loss for i in (0, 4)) / 2
    # The client used a seeded permutation; the mean over all 8 examples does not depend
    # on the order, but the per-batch padding does not change a BERT's output either.
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(update.payload[n], p.grad, rtol=1e-4, atol=1e-6)
