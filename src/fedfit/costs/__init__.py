"""What a client's work costs: peak memory by category, FLOPs, bytes on the wire.

- :mod:`fedfit.costs.measure`: the measured side (run the real step, record the truth).
- :mod:`fedfit.costs.spec`: what a client trains (:class:`TrainSpec`), applied to a real model
  and measured for one step (:func:`measure`).
- :mod:`fedfit.costs.predict`: the analytic side (closed-form estimates for planning).
"""

from __future__ import annotations

from fedfit.costs.measure import (
    ClientCost,
    MemoryTracker,
    StepFn,
    StepMemory,
    backprop,
    count_flops,
    measure_step,
    run_step,
    storage_bytes,
)
from fedfit.costs.predict import CostEstimate, predict, safetensors_bytes
from fedfit.costs.spec import TrainSpec, apply_spec, measure

__all__ = [
    "ClientCost",
    "CostEstimate",
    "MemoryTracker",
    "StepFn",
    "StepMemory",
    "TrainSpec",
    "apply_spec",
    "backprop",
    "count_flops",
    "measure",
    "measure_step",
    "predict",
    "run_step",
    "safetensors_bytes",
    "storage_bytes",
]
