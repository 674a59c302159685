"""Real SmolLM2-135M: the cached float32 copy is exactly the GGUF dequantised by transformers.

Slow (~30 s on 2 cores): transformers needs ~20 s to parse and dequantise the GGUF for the
reference. The first run also builds the cache (~35 s, once per machine).
"""

from __future__ import annotations

import json

import pytest
import torch

from fedfit.models import configs, convert, get_model_info, load_model, sources
from fedfit.models.zoo import _smollm2_dir

pytestmark = pytest.mark.real


def test_cached_smollm2_equals_gguf_and_knows_paris() -> None:
    folder = _smollm2_dir()
    saved = json.loads((folder / "config.json").read_text())
    assert {k: saved[k] for k in configs.SMOLLM2_135M} == configs.SMOLLM2_135M
    assert "quantization_config" not in saved

    model, tokenizer = load_model("smollm2-135m", "lm")
    backbone_params = sum(p.numel() for p in model.base_model.parameters())
    assert backbone_params == get_model_info("smollm2-135m").num_params
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in SmolLM2
    batch = tokenizer("The capital of France is", return_tensors="pt")
    reference = convert.load_gguf_model(sources.smollm2_gguf()).eval()
    with torch.no_grad():
        logits = model(**batch).logits
        expected = reference(**batch).logits
    assert torch.equal(logits, expected)
    assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"
