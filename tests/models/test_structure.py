"""Model-structure helpers (models/structure.py) against brute force on the tiny test models:
the model's own ``output_hidden_states``, and a walk over every parameter."""

from __future__ import annotations

import pytest
import torch

from fedfit.models import load_model
from fedfit.models.structure import (
    embeddings,
    head_modules,
    hidden_states_at,
    swapped,
    task_head,
    transformer_layers,
)

CASES = [("tiny-bert", "classification"), ("tiny-llama", "classification"), ("tiny-llama", "lm")]


def tiny(name: str, task: str) -> torch.nn.Module:
    model, _ = load_model(name, task, num_labels=3, seed=0)
    return model.eval()


def batch_of(task: str) -> dict[str, torch.Tensor]:
    """Two sequences, the second padded: masks and positions must be built as the model does."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 1200, (2, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = ids.clone() if task == "lm" else torch.tensor([0, 2])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def param_ids(modules: list[torch.nn.Module]) -> set[int]:
    return {id(p) for m in modules for p in m.parameters()}


@pytest.mark.parametrize(("name", "task"), CASES)
def test_hidden_states_at_block_k_equal_the_models_own(name: str, task: str) -> None:
    # Prepare
    model = tiny(name, task)
    batch = batch_of(task)
    with torch.no_grad():
        reference = model(**batch, output_hidden_states=True).hidden_states
    blocks = len(transformer_layers(model))
    # Llama's last entry is taken after the final norm: not a block's input
    top = blocks if name == "tiny-bert" else blocks - 1
    for k in range(top + 1):
        # Execute
        hidden = hidden_states_at(model, batch, k)
        # Assert
        torch.testing.assert_close(hidden, reference[k], rtol=0, atol=1e-6)
        assert not hidden.requires_grad
    assert len(transformer_layers(model)) == blocks  # the full stack is back


@pytest.mark.parametrize(("name", "task"), CASES)
def test_embeddings_give_the_first_hidden_states(name: str, task: str) -> None:
    model = tiny(name, task)
    batch = batch_of(task)
    with torch.no_grad():
        reference = model(**batch, output_hidden_states=True).hidden_states[0]
        out = embeddings(model)(batch["input_ids"])  # BERT and Llama: input_ids first
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("name", "task"), CASES)
def test_embeddings_blocks_and_head_modules_partition_the_parameters(name: str, task: str) -> None:
    # Brute force: every parameter belongs to exactly one of the three parts.
    model = tiny(name, task)
    parts = [
        param_ids([embeddings(model)]),
        param_ids(list(transformer_layers(model))),
        param_ids(head_modules(model, task)),
    ]
    every = {id(p) for p in model.parameters()}
    assert all(parts)
    assert sum(len(part) for part in parts) == len(every)
    assert set.union(*parts) == every


def test_head_modules_by_family() -> None:
    bert = tiny("tiny-bert", "classification")
    assert head_modules(bert, "classification") == [bert.bert.pooler, bert.classifier]
    llama = tiny("tiny-llama", "classification")
    assert head_modules(llama, "classification") == [llama.model.norm, llama.score]
    lm = tiny("tiny-llama", "lm")
    assert head_modules(lm, "lm") == [lm.model.norm]  # the output layer is the tied embedding


def test_task_head() -> None:
    bert = tiny("tiny-bert", "classification")
    assert task_head(bert, "classification") == [bert.classifier]
    lm = tiny("tiny-llama", "lm")
    assert task_head(lm, "lm") == [lm.get_output_embeddings()]


def test_swapped_puts_the_modules_back_even_on_error() -> None:
    model = tiny("tiny-bert", "classification")
    emb, blocks = embeddings(model), transformer_layers(model)
    stand_in = torch.nn.Identity()
    with pytest.raises(RuntimeError, match="inside"):
        with swapped(model, stand_in, list(blocks)[1:]):
            assert embeddings(model) is stand_in
            assert list(transformer_layers(model)) == list(blocks)[1:]
            raise RuntimeError("inside")
    assert embeddings(model) is emb
    assert transformer_layers(model) is blocks
