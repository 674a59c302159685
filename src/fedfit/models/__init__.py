"""Model zoo: pretrained language models shipped in pip packages, plus tiny random test models.

>>> from fedfit.models import list_models, load_model
>>> model, tokenizer = load_model("minilm-l6", "classification", num_labels=3, seed=0)
"""

from __future__ import annotations

import os

# No hub is reachable: make huggingface_hub fail fast instead of retrying the network. Set before
# transformers is imported (it reads these once); every load also passes local_files_only=True.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from fedfit.models.sources import ModelNotAvailable  # noqa: E402
from fedfit.models.structure import backbone_slots, transformer_layers  # noqa: E402
from fedfit.models.zoo import (  # noqa: E402
    TASKS,
    ModelInfo,
    get_model_info,
    list_models,
    load_model,
)

__all__ = [
    "TASKS",
    "ModelInfo",
    "ModelNotAvailable",
    "get_model_info",
    "list_models",
    "load_model",
    "backbone_slots",
    "transformer_layers",
]
