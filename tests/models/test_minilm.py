"""Real MiniLM weights: the shipped file is what gets loaded, and the ONNX conversion is exact."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedfit.models import configs, convert, load_model, sources

pytestmark = pytest.mark.real

SENTENCES = [
    "A man is playing a guitar on the stage.",
    "Someone plays the guitar in a concert.",
    "The stock market fell sharply after the announcement.",
    "ok",
]


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # sentence-transformers' pooling for both MiniLM checkpoints
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def test_minilm_l6_loads_the_shipped_weights() -> None:
    folder = sources.minilm_l6_dir()
    shipped = json.loads((folder / "config.json").read_text())
    assert {k: shipped[k] for k in configs.MINILM_L6} == configs.MINILM_L6
    model, _ = load_model("minilm-l6", "classification", num_labels=3)
    tensors = load_file(folder / "model.safetensors")
    params = dict(model.bert.named_parameters())
    # every tensor of the file is used (position_ids is a buffer older transformers saved)
    assert params.keys() == tensors.keys() - {"embeddings.position_ids"}
    for key, value in params.items():
        assert torch.equal(value, tensors[key]), key


@pytest.mark.parametrize("name", ["minilm-l6", "minilm-l3"])
def test_paraphrases_embed_closer_than_unrelated(name: str) -> None:
    # Also checks that minilm-l3 (converted, borrowed tokenizer) reads text the right way.
    model, tokenizer = load_model(name, "classification")
    batch = tokenizer(SENTENCES[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.bert(**batch).last_hidden_state
    e = _mean_pool(hidden, batch["attention_mask"])
    assert _cos(e[0], e[1]) > 0.6
    assert _cos(e[0], e[1]) > _cos(e[0], e[2]) + 0.4


def test_minilm_l3_conversion_matches_onnxruntime() -> None:
    ort = pytest.importorskip("onnxruntime")
    onnx_path = sources.minilm_l3_onnx()
    model, tokenizer = load_model("minilm-l3", "classification")
    arch, _ = convert.bert_from_onnx(onnx_path)
    assert {k: arch[k] for k in configs.MINILM_L3} == configs.MINILM_L3
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed = {
        "input_ids": batch["input_ids"].numpy(),
        "attention_mask": batch["attention_mask"].numpy(),
    }
    # The export's outputs: the last LayerNorm (token states) and the mean-pooled embedding.
    hidden_ref, pooled_ref = session.run(["onnx::Shape_422", "461"], feed)
    with torch.no_grad():
        hidden = model.bert(**batch).last_hidden_state
    assert (hidden - torch.from_numpy(hidden_ref)).abs().max() < 1e-4
    pooled = _mean_pool(hidden, batch["attention_mask"])
    assert (pooled - torch.from_numpy(pooled_ref)).abs().max() < 1e-4
    # The documented identity pooler: pooled output = tanh(h_CLS).
    torch.testing.assert_close(
        model.bert.pooler(hidden), torch.tanh(hidden[:, 0]), atol=0.0, rtol=0.0
    )
