"""One-time conversions of shipped weights into plain transformers folders in the fedfit cache.

- paraphrase-MiniLM-L3-v2 ships as ONNX only: its initialisers are mapped back onto a
  ``BertModel`` (:func:`bert_from_onnx`).
- SmolLM2-135M-Instruct ships as a Q4_1 GGUF: transformers dequantises it to float32, and the
  state is copied into a fresh ``LlamaForCausalLM`` because a GGUF-loaded model refuses
  ``save_pretrained`` (:func:`build_smollm2`).

Each result is written to a temporary folder and renamed into place only when complete, with a
manifest naming the source file, so an interrupted or outdated conversion is never reused.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from fedfit.log import log
from fedfit.paths import cache_dir

if TYPE_CHECKING:  # torch is imported inside the converters: listing the zoo stays instant
    import torch
    from transformers import PreTrainedModel

# Bump when a converter changes what it writes: older caches are then rebuilt.
CACHE_FORMAT = 1
MANIFEST = "fedfit-cache.json"
ONNX_PREFIX = "model.0.auto_model."  # sentence-transformers module path of the BERT inside
ONNX_NODE_PREFIX = "/model/model.0/auto_model/"


def _expected_manifest(source: Path) -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "source": source.name, "source_bytes": source.stat().st_size}


def _is_complete(folder: Path, expected: dict[str, Any]) -> bool:
    try:
        return bool(json.loads((folder / MANIFEST).read_text()) == expected)
    except (OSError, ValueError):
        return False


def cached_folder(
    name: str, source: Path, build: Callable[[Path, Path], None], what: str = "converting"
) -> Path:
    """``cache_dir()/models/<name>``, built once by ``build(source, folder)`` and then reused.

    The build writes into a temporary sibling folder that is renamed into place only after it
    finished, followed by a manifest (format version, source name and size); a folder whose
    manifest does not match is rebuilt. A progress message goes to stderr the first time.
    """
    root = cache_dir() / "models"
    root.mkdir(parents=True, exist_ok=True)
    dest = root / name
    expected = _expected_manifest(source)
    if _is_complete(dest, expected):
        return dest
    # an inter-process lock, so parallel workers do not convert the same model twice
    with FileLock(str(root / f".{name}.lock")):
        if _is_complete(dest, expected):  # another process finished it while we waited
            return dest
        for leftover in root.glob(f".{name}.tmp*"):  # interrupted earlier builds
            shutil.rmtree(leftover, ignore_errors=True)
        log(f"fedfit: {what} {source.name} -> {dest} (first use only)")
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp", dir=root))
        try:
            build(source, tmp)
            (tmp / MANIFEST).write_text(json.dumps(expected))
            if dest.exists():
                shutil.rmtree(dest)  # outdated or incomplete
            tmp.rename(dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"fedfit: {name} ready in {time.perf_counter() - start:.1f} s")
    return dest


# --------------------------------------------------------------------------- ONNX -> BertModel


def _onnx_bert_arch(graph: Any, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """BertConfig keyword arguments, every value read from the ONNX graph."""
    import numpy as np
    from onnx import helper, numpy_helper

    word = weights["embeddings.word_embeddings.weight"]
    layers = {int(k.split(".")[2]) for k in weights if k.startswith("encoder.layer.")}
    constants = {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in graph.node
        if n.op_type == "Constant" and n.attribute[0].type == n.attribute[0].TENSOR
    }
    # Attention scores are divided by sqrt(head_dim): that constant gives the number of heads.
    scales = {
        float(constants[n.input[1]])
        for n in graph.node
        if n.op_type == "Div" and "/attention/self/" in n.name and n.input[1] in constants
    }
    eps = {
        helper.get_attribute_value(a)
        for n in graph.node
        if n.op_type == "LayerNormalization"
        for a in n.attribute
        if a.name == "epsilon"
    }
    if len(scales) != 1 or len(eps) != 1:
        raise ValueError(f"unexpected ONNX graph: attention scales {scales}, LayerNorm eps {eps}")
    head_dim = round(scales.pop() ** 2)
    hidden = word.shape[1]
    if hidden % head_dim:
        raise ValueError(f"head_dim {head_dim} does not divide hidden size {hidden}")
    if not any(n.op_type == "Erf" for n in graph.node):
        raise ValueError("expected the exact (erf) GELU in the ONNX graph")
    return {
        "vocab_size": word.shape[0],
        "hidden_size": hidden,
        "num_hidden_layers": len(layers),
        "num_attention_heads": hidden // head_dim,
        "intermediate_size": weights["encoder.layer.0.intermediate.dense.bias"].shape[0],
        "max_position_embeddings": weights["embeddings.position_embeddings.weight"].shape[0],
        "type_vocab_size": weights["embeddings.token_type_embeddings.weight"].shape[0],
        # ONNX stores float32: take its shortest decimal form (1e-12, not 9.99999996e-13).
        "layer_norm_eps": float(str(np.float32(eps.pop()))),
        "hidden_act": "gelu",
        "pad_token_id": 0,
    }


def bert_from_onnx(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Recover ``BertModel`` config kwargs and state dict from a sentence-transformers ONNX export.

    Named initialisers (embeddings, biases, LayerNorms) carry their module path after the
    ``model.0.auto_model.`` prefix. The export stores each Linear weight as an unnamed
    ``onnx::MatMul_*`` initialiser in (in, out) layout; the MatMul node consuming it is named
    after its module (``/model/model.0/auto_model/encoder/layer.0/attention/self/query/MatMul``),
    which gives the key, and the tensor is transposed to torch's (out, in).

    The export has no pooler (sentence-transformers mean-pools the last hidden state). The
    pooler is set to the identity, ``W = I, b = 0``, so the pooled output is ``tanh(h_[CLS])``:
    deterministic, independent of any seed, and it keeps the [CLS] features intact when the
    backbone stays frozen (LoRA, head-only).
    """
    import onnx
    import torch
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    raw = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    weights: dict[str, torch.Tensor] = {
        name.removeprefix(ONNX_PREFIX): torch.from_numpy(array.copy())
        for name, array in raw.items()
        if name.startswith(ONNX_PREFIX)
    }
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in raw or node.input[1] in weights:
            continue
        module = node.name.removeprefix(ONNX_NODE_PREFIX).removesuffix("/MatMul")
        key = module.replace("/", ".") + ".weight"
        weights[key] = torch.from_numpy(raw[node.input[1]].T.copy())
    arch = _onnx_bert_arch(graph, weights)
    hidden = arch["hidden_size"]
    weights["pooler.dense.weight"] = torch.eye(hidden)
    weights["pooler.dense.bias"] = torch.zeros(hidden)
    return arch, weights


def build_minilm_l3(source: Path, folder: Path) -> None:
    """Write paraphrase-MiniLM-L3-v2 from its ONNX file as a transformers ``BertModel`` folder."""
    import torch
    from transformers import BertConfig, BertModel

    arch, weights = bert_from_onnx(source)
    with torch.random.fork_rng(devices=[]):  # the throw-away random init must not touch RNG
        model = BertModel(BertConfig(**arch))
    # strict: every BertModel parameter must come from the ONNX file (or the documented pooler).
    model.load_state_dict(weights, strict=True)
    model.save_pretrained(folder)


# --------------------------------------------------------------------------- GGUF -> Llama


def build_smollm2_tokenizer(source: Path, folder: Path) -> None:
    """Save the tokenizer stored in the GGUF metadata (a few seconds; no weights read)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(source.parent), gguf_file=source.name, local_files_only=True
    )
    tokenizer.save_pretrained(folder)


def load_gguf_model(source: Path) -> PreTrainedModel:
    """SmolLM2 dequantised from the GGUF by transformers, in float32 (slow: ~20 s on 2 cores)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(source.parent),
        gguf_file=source.name,
        dtype=torch.float32,
        attn_implementation="eager",
        local_files_only=True,
    )


def build_smollm2(source: Path, folder: Path, tokenizer_folder: Path) -> None:
    """Dequantise the GGUF once and save it, with its tokenizer, as a float32 safetensors folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf_model = load_gguf_model(source)
    # A config carrying the GGUF quantization_config would make save_pretrained refuse.
    settings = gguf_model.config.to_dict()
    settings.pop("quantization_config", None)
    config = LlamaConfig.from_dict(settings)
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True).save_pretrained(
        folder
    )
