"""CoCoFL on transformers: layer fine-tuning with the frozen prefix held in bfloat16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedfit.algorithms import make_algorithm
from fedfit.algorithms.base import ClientContext, ClientTask
from fedfit.config import ConfigError, load_config
from fedfit.costs.spec import TrainSpec
from fedfit.engine.meter import CostMeter
from fedfit.models import load_model
from tests.helpers import random_shard

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def client_update(method: str, depth: int, *sets: str):
    config = load_config(
        None,
        [
            f"method.name={method}",
            "train.local_steps=3",
            "train.batch_size=4",
            "train.optimizer=sgd",
            "train.lr=0.5",
            *sets,
        ],  # fmt: skip
    )
    model, _ = load_model("tiny-bert", "classification", num_labels=3, seed=0)
    algorithm = make_algorithm(config)
    model = algorithm.prepare(model, "classification")
    state = algorithm.init(model)
    task = ClientTask(0, 1, 7, download=state.params)
    task.config["depth"] = depth
    meter = CostMeter()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    update = algorithm.client_update(
        model, task, random_shard(0, 12, seed=3), ClientContext(config.train, meter)
    )
    return update, meter, model, before


def test_update_trains_the_top_blocks_and_restores_the_float32_prefix() -> None:
    update, meter, model, before = client_update("cocofl", 1)
    layers_update, layers_meter, _, _ = client_update("layers", 1, "method.prefix_cache=false")
    # the same tensors as layer fine-tuning at depth 1, and nothing else
    assert set(update.payload) == set(layers_update.payload)
    assert not any(".layer.0." in n or "embeddings" in n for n in update.payload)
    # every frozen tensor is float32 again, bit for bit; the trained ones moved
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
        if name not in update.payload:
            assert torch.equal(p.detach(), before[name]), name
    # the update is layer fine-tuning's to bfloat16 rounding of the prefix's features
    for name, value in update.payload.items():
        moved, ref = value - before[name], layers_update.payload[name] - before[name]
        assert ref.abs().sum() > 0, name
        assert (moved - ref).norm() <= 0.05 * ref.norm() + 1e-6, name
    # measured: weights lower by 2 bytes per frozen element, FLOPs the same
    mem, ref_mem = meter.memory, layers_meter.memory
    assert mem is not None and ref_mem is not None
    assert meter.flops == layers_meter.flops
    frozen = sum(p.numel() for n, p in model.named_parameters() if n not in update.payload)
    assert ref_mem.weights_bytes - mem.weights_bytes == 2 * frozen


def test_plan_admits_the_quarter_tier_where_layer_fine_tuning_does_not() -> None:
    """examples/heterogeneous.toml on minilm-l6 (architecture only, no weights): the 1/4x
    tier (134 MB) fits cocofl at depth 1 with its prefix in bfloat16, and no layers depth."""
    from transformers import BertConfig, BertForSequenceClassification

    from fedfit.devices import build_population
    from fedfit.engine.setup import cost_context_for, plan_population
    from fedfit.models.configs import MINILM_L6

    plans = {}
    for method in ("layers", "cocofl"):
        config = load_config(EXAMPLES / "heterogeneous.toml", [f"method.name={method}"])
        ctx = cost_context_for(config, BertConfig(**MINILM_L6), "classification", 3, 400)
        population = build_population(config.devices, 100, ctx.reference(), config.run.seed)
        algorithm = make_algorithm(config)
        algorithm.prepare(
            BertForSequenceClassification(BertConfig(**MINILM_L6, num_labels=3)), "classification"
        )
        plans[method] = {
            population.tier_names[i]: p
            for i, p in enumerate(plan_population(algorithm, population.budgets, ctx))
        }
    assert not plans["layers"]["quarter"].ok and not plans["cocofl"]["eighth"].ok
    quarter = plans["cocofl"]["quarter"]
    assert quarter.ok and quarter.depth == 1
    assert quarter.spec == TrainSpec("layers", trained_layers=1, frozen_dtype="bfloat16")
    assert plans["cocofl"]["half"].depth >= plans["layers"]["half"].depth


def test_options() -> None:
    with pytest.raises(ConfigError, match="prefix_cache"):
        load_config(None, ["method.name=cocofl", "method.prefix_cache=true"])
    with pytest.raises(ConfigError, match="method.frozen_dtype"):
        load_config(None, ["method.name=cocofl", "method.frozen_dtype=int8"])
    config = load_config(None, ["method.name=cocofl", "method.frozen_dtype=float32",
                                "method.prefix_cache=true"])  # fmt: skip
    assert config.method.options.frozen_dtype == "float32"
