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
            ClientContext(train=config.train, meter=_Uncached()),
        )
    assert meter.flops == counter.get_total_flops() > 0


class _Uncached(CostMeter):
    """Plain steps only (FLOPs are counted by the surrounding FlopCounterMode)."""

    def train_step(self, model, optimizer, batch):  # type: ignore[no-untyped-def]
        from fedfit.engine.meter import plain_step

        return plain_step(model, optimizer, batch)


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
