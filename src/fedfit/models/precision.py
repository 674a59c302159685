"""Frozen weights held in a lower precision: what lets the smallest devices take part.

A device that trains only a few tensors (the task head) need not hold the frozen rest in
float32: ``bfloat16`` halves the weights and every activation of the frozen layers, while the
trained tensors, their gradients and optimiser state stay in float32. That is the part of
CoCoFL (Pfeiffer et al. 2023: frozen blocks run quantised) that carries over unchanged to a
head-only step; fedfit does it with bfloat16 because CPUs with AVX-512 BF16 or AMX run its
matrix products natively, where float16 is emulated.

:func:`frozen_in` casts the parameters that do not require grad for the duration of a block
and puts the float32 tensors back exactly afterwards (the simulation shares one model among
clients of different precisions). Each module whose parameters are all trained (a trained
block, the pooler, the classifier, and the layers inside them) gets a forward pre-hook that
casts its floating inputs to their dtype, so the float32 layers read the bfloat16 features.
torch is imported inside the functions (see models/structure.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# dtype names a config may give, and the bytes of one element
FROZEN_DTYPES = {"float32": 4, "bfloat16": 2}


def dtype_of(name: str) -> torch.dtype:
    import torch

    if name not in FROZEN_DTYPES:
        raise ValueError(f"frozen_dtype: {name!r} is not one of {', '.join(FROZEN_DTYPES)}")
    return getattr(torch, name)  # type: ignore[no-any-return]


def _cast_inputs(dtype: torch.dtype) -> Any:
    import torch

    def cast(a: Any) -> Any:
        return a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a

    def hook(
        module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    return hook


def _trained_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose every parameter is trained, outermost first: a trained block, the
    pooler, the classifier (also inside a peft wrapper, whose module dict is never called
    itself), and the layers inside them. The outermost one casts its input; the inner ones
    then see float32 already, so a block keeps one float32 copy of its input, not one per
    projection reading it."""
    return [
        module
        for module in model.modules()
        if any(True for _ in module.parameters())
        and all(p.requires_grad for p in module.parameters())
    ]


@contextlib.contextmanager
def frozen_in(model: torch.nn.Module, dtype_name: str) -> Iterator[None]:
    """Hold ``model``'s frozen floating parameters in ``dtype_name`` inside the block.

    The float32 tensors are kept aside (not parameters, so a measured step does not count
    them: a device would not hold them) and restored bit for bit on exit, also on error.
    Buffers are left as they are (BERT's are integer position and token-type ids).
    """
    dtype = dtype_of(dtype_name)
    if dtype_name == "float32":
        yield
        return
    kept: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    hooks = []
    try:
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                kept.append((p, p.data))
                p.data = p.data.to(dtype)
        for module in _trained_modules(model):
            dtype_in = next(module.parameters()).dtype
            hook = _cast_inputs(dtype_in)
            hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in hooks:
            handle.remove()
        for p, data in kept:
            p.data = data
