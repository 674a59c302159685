"""Where things sit in a zoo model: the block stack, the embeddings, what sits above the
blocks, the task head, and the hidden states at the input of block k.

Every helper accepts a bare backbone, a task model or a peft-wrapped task model of the two
families fedfit runs (BERT: ``embeddings`` / ``encoder.layer`` / ``pooler``; Llama:
``embed_tokens`` / ``layers`` / ``norm``). torch is imported inside the functions, so that
listing the zoo (``fedfit.models``) stays free of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# The classification head's attribute: BertForSequenceClassification's classifier,
# LlamaForSequenceClassification's score.
HEAD_NAMES = ("classifier", "score")


def task_model(model: torch.nn.Module) -> Any:
    """The transformers task model, looking through a peft wrapper."""
    inner: Any = model
    if hasattr(inner, "get_base_model"):  # peft.PeftModel wraps the transformers model
        inner = inner.get_base_model()
    return inner


def transformer_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of transformer blocks: ``encoder.layer`` (BERT) or ``model.layers`` (Llama).

    Accepts a bare backbone, a task model, or a peft-wrapped task model.
    """
    import torch

    inner = task_model(model)
    backbone = getattr(inner, "base_model", inner)  # transformers: the BertModel / LlamaModel
    encoder = getattr(backbone, "encoder", None)
    layers = getattr(encoder, "layer", None) if encoder is not None else None
    if layers is None:
        layers = getattr(backbone, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"cannot find the transformer blocks of {type(inner).__name__}")
    return layers


def backbone_slots(model: torch.nn.Module) -> tuple[Any, str, Any, str]:
    """Where the embedding module and the block list hang: (owner, attribute) of each, so a
    caller can swap the embeddings for a stand-in or run a slice of the blocks (prefix cache,
    FedSPZO's split). Accepts what :func:`transformer_layers` accepts."""
    inner = task_model(model)
    base: Any = getattr(inner, "base_model", inner)
    if hasattr(base, "embeddings") and hasattr(base, "encoder"):  # BERT
        return base, "embeddings", base.encoder, "layer"
    if hasattr(base, "embed_tokens") and hasattr(base, "layers"):  # Llama
        return base, "embed_tokens", base, "layers"
    raise TypeError(f"cannot find the embeddings and blocks of {type(inner).__name__}")


def embeddings(model: torch.nn.Module) -> torch.nn.Module:
    """The input embedding module below the blocks: BERT's ``embeddings`` (words, positions,
    token types, LayerNorm), Llama's ``embed_tokens``."""
    owner, attr, _, _ = backbone_slots(model)
    module: torch.nn.Module = getattr(owner, attr)
    return module


def head_modules(model: torch.nn.Module, task: str) -> list[torch.nn.Module]:
    """What sits above the block stack: BERT's pooler, Llama's final norm, and for
    classification the task head (classifier / score). Layer fine-tuning and partial
    training always train these; the cost model marks them for ``TrainSpec("layers")``."""
    base = getattr(model, "base_model", model)
    found = [getattr(base, "pooler", None), getattr(base, "norm", None)]
    if task == "classification":
        found += [getattr(model, name, None) for name in HEAD_NAMES]
    return [m for m in found if m is not None]


def task_head(model: torch.nn.Module, task: str) -> list[torch.nn.Module]:
    """The task's output layer: the classifier / score for classification; for causal LM the
    output projection (SmolLM2 ties it to the input embeddings), if the model has one."""
    if task == "lm":
        head = model.get_output_embeddings()  # type: ignore[operator]
        return [head] if head is not None else []
    return [getattr(model, name) for name in HEAD_NAMES if hasattr(model, name)]


@contextlib.contextmanager
def swapped(
    model: torch.nn.Module,
    embeddings: torch.nn.Module | None = None,
    blocks: Sequence[torch.nn.Module] | None = None,
) -> Iterator[None]:
    """Within the block, ``embeddings`` stands in for the model's embedding module and
    ``blocks`` for its block stack (either left as is when None); both are put back after.

    The model's own forward then runs what was swapped in, with its masks and positions
    built as usual: a stand-in embedding module can feed cached hidden states, and a slice of
    the blocks runs only part of the stack (prefix cache, FedSPZO's split).
    """
    import torch

    emb_owner, emb_attr, owner, attr = backbone_slots(model)
    current_emb, current_blocks = getattr(emb_owner, emb_attr), getattr(owner, attr)
    if embeddings is not None:
        setattr(emb_owner, emb_attr, embeddings)
    if blocks is not None:
        setattr(owner, attr, torch.nn.ModuleList(list(blocks)))
    try:
        yield
    finally:
        setattr(emb_owner, emb_attr, current_emb)
        setattr(owner, attr, current_blocks)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the hidden states are caught."""


def hidden_states_at(model: torch.nn.Module, batch: Mapping[str, Any], k: int) -> torch.Tensor:
    """The hidden states at the input of block ``k`` (after the embeddings and blocks
    ``[0, k)``), [batch, seq, hidden], without gradient.

    Equals ``model(..., output_hidden_states=True).hidden_states[k]`` for BERT (k <= L) and
    for Llama (k < L: Llama's last entry is taken after its final norm). It is the model's
    own forward over its first ``k`` blocks (so masks and positions are built as usual),
    stopped right after them: nothing above block ``k`` runs. It runs in the model's current
    mode (train or eval) and ignores ``batch["labels"]``.
    """
    import torch

    caught: list[torch.Tensor] = []

    def catch(value: object) -> None:
        out = value[0] if isinstance(value, tuple) else value
        caught.append(getattr(out, "last_hidden_state", out))  # type: ignore[arg-type]
        raise _Stop

    _, _, owner, attr = backbone_slots(model)
    with torch.no_grad(), swapped(model, blocks=list(getattr(owner, attr))[:k]):
        if attr == "layer":  # BERT: the encoder's output after the first k blocks
            hook = owner.register_forward_hook(lambda m, a, out: catch(out))
        else:  # Llama: the input of the final norm, after the first k blocks
            hook = owner.norm.register_forward_pre_hook(lambda m, a: catch(a))
        try:
            model(**{name: v for name, v in batch.items() if name != "labels"})
        except _Stop:
            pass
        finally:
            hook.remove()
    return caught[0]
