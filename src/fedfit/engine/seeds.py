"""Seeds: everything random in a run derives from (run seed, round, client, ...)."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from (run seed, round, client id, ...): independent streams per tuple."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] & 0x7FFFFFFF)
