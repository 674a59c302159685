"""Architecture hyper-parameters of the zoo and exact parameter counts computed from them.

The dictionaries are keyword arguments of ``BertConfig`` / ``LlamaConfig``. They are written out
here (rather than read from the packages) so that listing the zoo is free and works when a
package is missing; real-weight tests check them against the shipped configs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MINILM_VOCAB = 30522
SMOLLM2_VOCAB = 49152

# sentence-transformers/all-MiniLM-L6-v2 (its config.json).
MINILM_L6: dict[str, Any] = {
    "vocab_size": MINILM_VOCAB,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
}

# paraphrase-MiniLM-L3-v2; the converter reads every value from the ONNX graph and checks it.
MINILM_L3: dict[str, Any] = {**MINILM_L6, "num_hidden_layers": 3}

# HuggingFaceTB/SmolLM2-135M-Instruct, as transformers reads it from the GGUF metadata.
SMOLLM2_135M: dict[str, Any] = {
    "vocab_size": SMOLLM2_VOCAB,
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}

# smollm2-19m (models/derive.py): 4 of SmolLM2-135M's blocks and an 8192-token truncation of its
# BPE tokenizer, every other setting as SmolLM2 (the size of Ro et al. 2022's ~21M FL model).
SMOLLM2_19M: dict[str, Any] = {**SMOLLM2_135M, "vocab_size": 8192, "num_hidden_layers": 4}

# lstm-19m (models/lstm.py): Ro et al. 2022's LSTM baseline at smollm2-19m's size, tokenizer
# and width (2 projected LSTM layers of 1344 cells, tied 8192 x 576 embedding): 18.7M
# parameters against smollm2-19m's 18.9M.
LSTM_19M: dict[str, Any] = {
    "vocab_size": SMOLLM2_19M["vocab_size"],
    "hidden_size": 576,
    "lstm_units": 1344,
    "num_hidden_layers": 2,
    "max_position_embeddings": 8192,
}

# Fast-test models: real tokenizers, random weights, a few thousand parameters per layer.
TINY_BERT: dict[str, Any] = {
    "vocab_size": MINILM_VOCAB,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
    "type_vocab_size": 2,
}
TINY_LLAMA: dict[str, Any] = {
    "vocab_size": SMOLLM2_VOCAB,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 64,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,  # as SmolLM2
}


def bert_num_params(arch: Mapping[str, Any]) -> int:
    """Parameters of a ``BertModel`` (embeddings, encoder and pooler; no task head)."""
    h, i = arch["hidden_size"], arch["intermediate_size"]
    rows = arch["vocab_size"] + arch["max_position_embeddings"] + arch["type_vocab_size"]
    embeddings = rows * h + 2 * h  # three tables + LayerNorm
    attention = 4 * (h * h + h) + 2 * h  # q, k, v, out (+bias) + LayerNorm
    ffn = (h * i + i) + (i * h + h) + 2 * h  # up, down (+bias) + LayerNorm
    pooler = h * h + h
    return embeddings + arch["num_hidden_layers"] * (attention + ffn) + pooler


def lstm_num_params(arch: Mapping[str, Any]) -> int:
    """Parameters of models/lstm.py's model: the tied embedding and, per layer, PyTorch's
    projected-LSTM tensors (input and recurrent weights of the four gates, two bias vectors,
    the projection)."""
    h, units = arch["hidden_size"], arch["lstm_units"]
    layer = 4 * units * h + 4 * units * h + 2 * 4 * units + h * units
    return int(arch["vocab_size"] * h + arch["num_hidden_layers"] * layer)


def llama_num_params(arch: Mapping[str, Any]) -> int:
    """Parameters of a ``LlamaModel`` (no ``lm_head``: SmolLM2 ties it to the embeddings).

    Assumes no attention or MLP biases, as in Llama and SmolLM2.
    """
    h, i = arch["hidden_size"], arch["intermediate_size"]
    heads = arch["num_attention_heads"]
    head_dim = arch.get("head_dim", h // heads)
    kv_heads = arch.get("num_key_value_heads", heads)
    attention = 2 * h * heads * head_dim + 2 * h * kv_heads * head_dim  # q, o + k, v
    mlp = 3 * h * i  # gate, up, down
    layer = attention + mlp + 2 * h  # two RMSNorms
    return arch["vocab_size"] * h + arch["num_hidden_layers"] * layer + h  # + final norm
