"""Frozen weights held in bfloat16 (models/precision.py): exact restore, float32 trained
tensors, a forward close to float32's, and a head-only client update that uses it."""

from __future__ import annotations

import pytest
import torch

from fedfit.algorithms import make_algorithm
from fedfit.algorithms.base import ClientContext
from fedfit.config import load_config
from fedfit.engine.meter import CostMeter
from fedfit.models import load_model
from fedfit.models.precision import frozen_in
from tests.helpers import random_shard


def head_model() -> torch.nn.Module:
    model, _ = load_model("tiny-bert", "classification", num_labels=3, seed=0)
    config = load_config(None, ["method.name=head"])
    return make_algorithm(config).prepare(model, "classification")


def test_frozen_weights_are_bfloat16_inside_and_restored_bit_for_bit() -> None:
    model = head_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(1000, 2000, (4, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model.eval()
    with torch.no_grad():
        full = model(**batch).logits
        with frozen_in(model, "bfloat16"):
            dtypes = {n: p.dtype for n, p in model.named_parameters()}
            half = model(**batch).logits
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"classifier.weight", "classifier.bias"}
    assert {dtypes[n] for n in trained} == {torch.float32}
    assert {d for n, d in dtypes.items() if n not in trained} == {torch.bfloat16}
    assert half.dtype == torch.float32  # the float32 head read the bfloat16 features
    assert not torch.equal(half, full)  # it did run in another precision
    torch.testing.assert_close(half, full, rtol=0, atol=0.05)  # bfloat16 keeps ~3 digits
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n


def test_restored_also_when_the_block_fails() -> None:
    model = head_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"), frozen_in(model, "bfloat16"):
        raise RuntimeError("boom")
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_unknown_dtype_is_an_error() -> None:
    with pytest.raises(ValueError, match="'float16' is not one of float32, bfloat16"):
        with frozen_in(head_model(), "float16"):
            pass
    from fedfit.errors import ConfigError

    with pytest.raises(ConfigError, match="method.frozen_dtype: 'int8'"):
        load_config(None, ["method.name=head", "method.frozen_dtype=int8"])


def test_bfloat16_head_update_halves_the_measured_step_and_trains_the_head() -> None:
    """The same client update in float32 and over a bfloat16 backbone: the measured weights
    and activations halve (the meter keys on dtypes, so neither reuses the other's figure),
    the FLOPs are the same, and both updates (plain SGD: linear in the gradient) move the
    head the same way to bfloat16's precision."""
    shard = random_shard(0, 8, seed=3)
    results = {}
    meter = CostMeter()  # one meter for both: a cached float32 figure must not be reused
    for dtype in ("float32", "bfloat16"):
        config = load_config(
            None,
            ["method.name=head", f"method.frozen_dtype={dtype}", "train.local_steps=2",
             "train.batch_size=4", "train.lr=0.1", "train.optimizer=sgd"],
        )  # fmt: skip
        algorithm = make_algorithm(config)
        model = algorithm.prepare(
            load_model("tiny-bert", "classification", 3, seed=0)[0], "classification"
        )
        state = algorithm.init(model)
        meter.start_client()
        update = algorithm.client_update(
            model, algorithm.configure(state, 0, seed=2), shard, ClientContext(config.train, meter)
        )
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert meter.memory is not None
        results[dtype] = (update, meter.memory, meter.flops, state)
    (u32, m32, f32, s0), (u16, m16, f16, _) = results["float32"], results["bfloat16"]
    assert f16 == f32 > 0
    frozen = sum(p.numel() for p in head_model().parameters()) - sum(
        u32.payload[n].numel() for n in u32.payload
    )
    assert m32.weights_bytes - m16.weights_bytes == 2 * frozen
    assert m16.activations_bytes == m32.activations_bytes // 2
    for name in u32.payload:
        moved32 = u32.payload[name] - s0.params[name]
        moved16 = u16.payload[name] - s0.params[name]
        assert moved32.abs().sum() > 0
        torch.testing.assert_close(moved16, moved32, rtol=0.05, atol=2e-3)
