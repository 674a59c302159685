"""Narrowed transformer blocks: SLT's scaled-down layers (algorithms/slt.py) on transformers.

A block narrowed to ``width`` keeps the first share of its attention heads and of its feed-
forward units; the residual stream (hidden size), the norms and every bias on it stay whole.
On a linear that produces heads or units (BERT's query / key / value and intermediate,
Llama's q / k / v, gate and up projections) the leading output rows are kept, with their
biases; on one that reads them (BERT's attention output and FFN output, Llama's o_proj and
down_proj) the leading input columns. Both attention implementations reshape to
``(-1, head_dim)``, so a narrowed linear is all a block needs to run with fewer heads.

Sizes (:func:`narrowed_sizes`): ``kv' = max(1, round(width * kv_heads))`` key/value heads,
``heads' = kv' * (heads / kv_heads)`` query heads (Llama's grouped-query attention keeps its
group size; BERT has kv_heads = heads) and ``max(1, round(width * intermediate))`` units.
The cost model (costs/predict.py) uses the same rule, so what it predicts is what is built.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# (path inside a block, dimension narrowed: 0 = output rows, 1 = input columns, what it holds)
NARROWED = {
    "bert": (
        ("attention.self.query", 0, "heads"),
        ("attention.self.key", 0, "heads"),
        ("attention.self.value", 0, "heads"),
        ("attention.output.dense", 1, "heads"),
        ("intermediate.dense", 0, "inter"),
        ("output.dense", 1, "inter"),
    ),
    "llama": (
        ("self_attn.q_proj", 0, "heads"),
        ("self_attn.k_proj", 0, "kv_heads"),
        ("self_attn.v_proj", 0, "kv_heads"),
        ("self_attn.o_proj", 1, "heads"),
        ("mlp.gate_proj", 0, "inter"),
        ("mlp.up_proj", 0, "inter"),
        ("mlp.down_proj", 1, "inter"),
    ),
}


def narrowed_sizes(heads: int, kv_heads: int, inter: int, width: float) -> tuple[int, int, int]:
    """(query heads, key/value heads, feed-forward units) a block keeps at ``width``."""
    if not 0 < width <= 1:
        raise ValueError(f"width {width} is outside (0, 1]")
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    kv = max(1, round(width * kv_heads))
    return kv * (heads // kv_heads), kv, max(1, round(width * inter))


def _sizes(config: Any, width: float) -> dict[str, int]:
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    q, kv, inter = narrowed_sizes(heads, kv_heads, int(config.intermediate_size), width)
    return {"heads": q * head_dim, "kv_heads": kv * head_dim, "inter": inter}


def _linear(root: torch.nn.Module, path: str) -> tuple[torch.nn.Module, str, torch.nn.Linear]:
    *owners, leaf = path.split(".")
    owner = root
    for name in owners:
        owner = getattr(owner, name)
    linear = getattr(owner, leaf)
    return owner, leaf, linear


def narrow_(model: torch.nn.Module, blocks: Sequence[int], width: float) -> list[Any]:
    """Narrow ``blocks`` (indices into the block stack) of ``model`` to ``width`` in place:
    each narrowed linear is replaced by a smaller ``nn.Linear`` holding copies of the kept
    slice (``requires_grad`` as the original's). Returns what :func:`restore_` needs to put
    the original modules back. ``width = 1`` changes nothing."""
    import torch

    from fedfit.models.structure import task_model, transformer_layers

    if width >= 1:
        return []
    family = str(task_model(model).config.model_type)
    if family not in NARROWED:
        raise ValueError(f"narrowing: no rule for model_type {family!r} ({', '.join(NARROWED)})")
    sizes = _sizes(task_model(model).config, width)
    stack = transformer_layers(model)
    swapped: list[Any] = []
    for i in blocks:
        for path, dim, what in NARROWED[family]:
            owner, leaf, old = _linear(stack[i], path)
            keep = sizes[what]
            n_in, n_out = (old.in_features, keep) if dim == 0 else (keep, old.out_features)
            new = torch.nn.Linear(n_in, n_out, bias=old.bias is not None)
            new = new.to(dtype=old.weight.dtype, device=old.weight.device)
            with torch.no_grad():
                new.weight.copy_(old.weight[:keep] if dim == 0 else old.weight[:, :keep])
                if old.bias is not None:
                    new.bias.copy_(old.bias[:keep] if dim == 0 else old.bias)
            new.requires_grad_(old.weight.requires_grad)
            new.train(old.training)
            setattr(owner, leaf, new)
            swapped.append((owner, leaf, old))
    return swapped


def restore_(swapped: list[Any]) -> None:
    """Put back the modules :func:`narrow_` replaced (the originals, untouched)."""
    for owner, leaf, old in reversed(swapped):
        setattr(owner, leaf, old)


@contextmanager
def narrowed(model: torch.nn.Module, blocks: Sequence[int], width: float) -> Iterator[None]:
    """``blocks`` narrowed to ``width`` inside the block, the originals back after it."""
    swapped = narrow_(model, blocks, width)
    try:
        yield
    finally:
        restore_(swapped)
