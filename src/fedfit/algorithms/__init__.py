"""fedfit's federated methods; importing this package registers them all by name."""

from fedfit.algorithms import (  # noqa: F401  (registration side effects)
    backprop,
    cocofl,
    forward,
    hetlora,
    layers,
    mixed,
    partial,
    peft,
    slt,
    zeroorder,  # noqa: F401  (registers the zero-order methods)
)
from fedfit.algorithms.registry import ALGORITHMS, make_algorithm

__all__ = ["ALGORITHMS", "make_algorithm"]
