"""Users' own checkpoints: a local Hugging Face folder (``model.name = "/path/to/dir"``).

Supported families, and why only these: BERT-like encoders (``model_type = "bert"``) for
classification and Llama-like decoders (``model_type = "llama"``) for classification and
causal LM. fedfit's analytic cost model (costs/predict.py), its block and embedding lookup
(layer fine-tuning, the frozen-prefix cache, FedSPZO's split), its default LoRA targets and
its forward-mode AD all know these two layouts exactly (eager attention, Llama without
attention/MLP biases); another layout would be trained, planned and measured on guesses.

A folder is checked before anything loads, and each problem is an error naming it: no
folder, no ``config.json``, an unsupported ``model_type`` (or a Llama with biases), no weight
file, no tokenizer files. The parameter count is exact (the model is built on the meta
device from its config: no memory, no weights read).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAMILIES = {"bert": "bert", "llama": "llama"}  # config.json model_type -> fedfit family
TASKS_OF = {"bert": ("classification",), "llama": ("lm", "classification")}
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# A fast tokenizer (tokenizer.json) or the files a slow one is built from.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model")


class LocalModelError(ValueError):
    """A local checkpoint folder cannot be used; the message names what is wrong or missing."""


@dataclass(frozen=True)
class LocalCheckpoint:
    """What fedfit read from a checkpoint folder without loading its weights."""

    folder: Path
    family: str
    tasks: tuple[str, ...]
    config: dict[str, Any]  # config.json
    weights: str  # the weight file found
    num_params: int  # backbone parameters (no task head), exact


def is_path(name: str) -> bool:
    """A model name that points at a folder rather than the zoo: it has a path separator,
    starts with ``~`` or ``.``, or is an existing directory."""
    return os.sep in name or "/" in name or name.startswith(("~", ".")) or Path(name).is_dir()


def inspect_checkpoint(name: str) -> LocalCheckpoint:
    """Check a checkpoint folder (module docstring); ``LocalModelError`` names any problem."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise LocalModelError(f"model path {name!r} {what} (expected a checkpoint folder)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise LocalModelError(
            f"{folder}: no config.json; a Hugging Face checkpoint folder holds config.json, "
            "the weights (model.safetensors) and the tokenizer files (tokenizer.json)"
        )
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise LocalModelError(f"{config_file}: not valid JSON ({err})") from err
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise LocalModelError(
            f"{folder}: model_type {model_type!r} is not supported; fedfit runs BERT-like "
            "encoders (model_type 'bert') and Llama-like decoders ('llama'), the layouts its "
            "cost model, layer methods and LoRA targets know"
        )
    family = FAMILIES[model_type]
    if family == "llama" and (config.get("attention_bias") or config.get("mlp_bias")):
        raise LocalModelError(
            f"{folder}: a Llama with attention_bias/mlp_bias is not supported (fedfit's cost "
            "model assumes Llama's bias-free projections)"
        )
    weights = next((f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise LocalModelError(
            f"{folder}: no weights; expected one of {', '.join(WEIGHT_FILES)} "
            "(save the model with save_pretrained)"
        )
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise LocalModelError(
            f"{folder}: no tokenizer; expected one of {', '.join(TOKENIZER_FILES)} "
            "(save it next to the weights with tokenizer.save_pretrained)"
        )
    return LocalCheckpoint(
        folder, family, TASKS_OF[family], config, weights, _backbone_params(family, config)
    )


def _backbone_params(family: str, config: dict[str, Any]) -> int:
    """Exact parameter count of the backbone (BertModel / LlamaModel), built on meta."""
    import torch
    import transformers

    cls = {"bert": transformers.BertConfig, "llama": transformers.LlamaConfig}[family]
    model_cls = {"bert": transformers.BertModel, "llama": transformers.LlamaModel}[family]
    settings = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        model = model_cls(cls(**settings))
    return sum(p.numel() for p in model.parameters())
