"""The engine's cost meter: the per-shape cache reports what counting every step reports."""

from __future__ import annotations

import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

from fedfit.algorithms import make_algorithm
from fedfit.algorithms.base import ClientContext
from fedfit.config import load_config
from fedfit.engine.meter import CostMeter
from fedfit.models import load_model
from tests.helpers import random_shard


def test_client_flops_equal_flopcountermode_over_the_whole_update() -> None:
    config = load_config(None, ["method.name=lora", "train.local_steps=6", "train.batch_size=3"])
    model, _ = load_model("tiny-bert", "classification", num_labels=3, seed=0)
    algorithm = make_algorithm(config)
    model = algorithm.prepare(model, "classification")
    state = algorithm.init(model)
    shard = random_shard(0, 7, seed=9)  # 6 steps of 3 over 7 examples: shapes repeat
    twin = copy.deepcopy(model)

    meter = CostMeter()
    ctx = ClientContext(train=config.train, meter=meter)
    algorithm.client_update(model, algorithm.configure(state, 0, seed=4), shard, ctx)
    cached_shapes = len(meter._cache)
    assert cached_shapes < 6  # some steps reused a measured shape

    # Reference: FlopCounterMode around the entire client update, every step counted.
    with FlopCounterMode(display=False) as counter:
        algorithm.client_update(
            twin,
            algorithm.configure(state, 0, seed=4),
            shard,
            ClientContext(train=config.train, meter=_UncachedAny()),
        )
    assert meter.flops == counter.get_total_flops() > 0


def test_memory_is_the_largest_step() -> None:
    config = load_config(None, ["method.name=fedavg", "train.local_steps=2", "train.batch_size=4"])
    model, _ = load_model("tiny-bert", "classification", num_labels=3, seed=0)
    algorithm = make_algorithm(config)
    model = algorithm.prepare(model, "classification")
    meter = CostMeter()
    ctx = ClientContext(train=config.train, meter=meter)
    state = algorithm.init(model)
    algorithm.client_update(
        model, algorithm.configure(state, 0, seed=1), random_shard(0, 8, 1), ctx
    )
    mem = meter.memory
    assert mem is not None
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert mem.weights_bytes >= weights  # + buffers (position ids)
    assert mem.grads_bytes == weights  # full fine-tuning: a grad for every parameter
    assert mem.peak_bytes >= mem.weights_bytes + mem.grads_bytes
    assert torch.is_grad_enabled()


def test_lengths_are_predicted_after_four_measured_steps_and_equal_the_measurements() -> None:
    """Ten token lengths in one group: four instrumented steps, and every length's figures
    equal those of measuring that length's step on its own (FLOPs exactly, memory to 1e-3)."""
    from fedfit.costs import measure_step
    from fedfit.engine.meter import MEMORY_RTOL

    config = load_config(None, ["method.name=lora"])
    model, _ = load_model("tiny-bert", "classification", num_labels=3, seed=0)
    algorithm = make_algorithm(config)
    model = algorithm.prepare(model, "classification")
    model.train()
    twin = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    twin_params = [p for p in twin.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0)  # lr 0: every step sees the same weights
    twin_optimizer = torch.optim.SGD(twin_params, lr=0.0)
    meter = CostMeter()
    generator = torch.Generator().manual_seed(0)
    lengths = [9, 17, 12, 30, 5, 24, 31, 14, 20, 7]
    for length in lengths:
        ids = torch.randint(5, 500, (4, length), generator=generator)
        batch = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 3, (4,), generator=generator),
        }
        meter.start_client()
        meter.train_step(model, optimizer, batch)
        _, memory, flops = measure_step(twin, twin_optimizer, batch)
        assert meter.flops == flops, length
        assert meter.memory is not None
        for name, value in memory.as_dict().items():
            got = meter.memory.as_dict()[name]
            assert abs(got - value) <= MEMORY_RTOL * value, (length, name)
    instrumented = sum(len(g.measured) for g in meter._lengths.values())
    assert instrumented == 4


def test_spry_clients_with_other_shares_are_measured_apart() -> None:
    """Spry gives each client of a round its own share of tensors, all of which require grad:
    each client's FLOPs equal FlopCounterMode over its own update (no figure borrowed from
    another share)."""
    config = load_config(None, ["method.name=spry", "train.local_steps=2", "train.batch_size=4"])
    model, _ = load_model("tiny-bert", "classification", num_labels=3, seed=0)
    algorithm = make_algorithm(config)
    model = algorithm.prepare(model, "classification")
    state = algorithm.init(model)
    clients = [0, 1, 2]
    algorithm.start_round(state, clients)
    meter = CostMeter()
    ctx = ClientContext(train=config.train, meter=meter)
    measured = []
    for cid in clients:
        shard = random_shard(cid, 8, seed=3)  # the same shapes for every client
        task = algorithm.configure(state, cid, seed=5)
        meter.start_client()
        twin = copy.deepcopy(model)
        algorithm.client_update(model, task, shard, ctx)
        with FlopCounterMode(display=False) as counter:
            plain = ClientContext(train=config.train, meter=_UncachedAny())
            algorithm.client_update(twin, task, shard, plain)
        assert meter.flops == counter.get_total_flops() > 0, cid
        measured.append(meter.flops)
    assert len(set(measured)) > 1  # the shares differ, and so do their costs


class _UncachedAny(CostMeter):
    """Every step plain, whatever its step function (FLOPs counted around it)."""

    def train_step(self, model, optimizer, batch, skipped=None, step=None, kind=None):  # type: ignore[no-untyped-def]
        from fedfit.costs import backprop, run_step

        return run_step(model, optimizer, batch, step or backprop)
