"""What a client's work costs: peak memory by category, FLOPs, bytes on the wire.

- :mod:`fedfit.costs.measure`: the measured side (run the real step, record the truth).
- :mod:`fedfit.costs.predict`: the analytic side (closed-form estimates for planning).
"""

from __future__ import annotations

from fedfit.costs.measure import (
    ClientCost,
    MemoryTracker,
    StepMemory,
    count_flops,
    measure_step,
    storage_bytes,
)

__all__ = [
    "ClientCost",
    "MemoryTracker",
    "StepMemory",
    "count_flops",
    "measure_step",
    "storage_bytes",
]
