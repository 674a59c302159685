"""Client optimisers (SGD, SGD with momentum, AdamW, Adafactor): measured state memory
against closed forms, and the cost model against the measurement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.optimization import Adafactor

from fedfit.algorithms.base import make_optimizer
from fedfit.config import load_config
from fedfit.costs.predict import predict
from fedfit.costs.spec import TrainSpec, measure
from fedfit.data import collate
from fedfit.engine.setup import cost_optimizer
from fedfit.models import load_model

F32 = 4


def closed_form(optimizer: str, shapes: list[torch.Size]) -> int:
    """State bytes after one step, from the optimisers' definitions."""
    numel = sum(int(np.prod(s)) for s in shapes)
    if optimizer == "sgd":
        return 0
    if optimizer == "sgd-momentum":
        return F32 * numel  # one momentum buffer
    if optimizer == "adamw":
        return 2 * F32 * numel + F32 * len(shapes)  # two moments and a step tensor each
    # Adafactor without first moment: row + column means of a matrix's squared gradient, the
    # full second moment of a vector, one RMS scalar per tensor
    factored = sum(s[0] + s[1] if len(s) == 2 else int(np.prod(s)) for s in shapes)
    return F32 * (factored + len(shapes))


@pytest.mark.parametrize("optimizer", ["sgd", "sgd-momentum", "adamw", "adafactor"])
@pytest.mark.parametrize("name,task", [("tiny-bert", "classification"), ("tiny-llama", "lm")])
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_optimizer_state_is_measured_and_predicted(
    optimizer: str, name: str, task: str, kind: str
) -> None:
    model, tok = load_model(name, task, num_labels=3, seed=0)
    config = model.config
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1000, 1200, size=24) for _ in range(4)]
    labels = None if task == "lm" else [0, 1, 2, 0]
    batch = collate(seqs, tok.pad_token_id, labels=labels, lm=task == "lm")
    spec = TrainSpec(kind, optimizer=optimizer)
    memory, _ = measure(model, spec, batch, task)
    # measure() wraps the model in place for LoRA; its trainable tensors are the ones stepped
    trained = [p for p in model.parameters() if p.requires_grad] if kind == "full" else None
    if trained is not None:
        assert memory.optimizer_bytes == closed_form(optimizer, [p.shape for p in trained])
    estimate = predict(config, task, 3, spec, 4, 24)
    assert estimate.optimizer_bytes == memory.optimizer_bytes
    assert estimate.peak_bytes == pytest.approx(memory.peak_bytes, rel=0.02)


def test_adafactor_keeps_far_less_state_than_adamw() -> None:
    model, tok = load_model("tiny-llama", "lm", seed=0)
    seqs = [np.arange(10, 40) for _ in range(2)]
    batch = collate(seqs, tok.pad_token_id, lm=True)
    adamw, _ = measure(model, TrainSpec("full", optimizer="adamw"), batch, "lm")
    model, _ = load_model("tiny-llama", "lm", seed=0)
    adafactor, _ = measure(model, TrainSpec("full", optimizer="adafactor"), batch, "lm")
    assert adafactor.optimizer_bytes < 0.02 * adamw.optimizer_bytes


def test_client_optimizer_from_config() -> None:
    train = load_config(None, ["train.optimizer=adafactor", "train.lr=3e-3"]).train
    p = torch.nn.Parameter(torch.ones(3, 2))
    opt = make_optimizer([p], train)
    assert isinstance(opt, Adafactor)
    group = opt.param_groups[0]
    assert group["lr"] == 3e-3 and not group["relative_step"] and not group["scale_parameter"]
    assert cost_optimizer("sgd", 0.9) == "sgd-momentum" and cost_optimizer("sgd", 0.0) == "sgd"
    assert cost_optimizer("adafactor", 0.9) == "adafactor"
