"""The ``[model]`` config section: which zoo model (or local checkpoint), its sequence
length, and how its classifier head starts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedfit.errors import check, check_choice

HEAD_INITS = ("random", "ncm")


@dataclass(frozen=True)
class ModelConfig:
    name: str = field(
        default="minilm-l6",
        metadata={
            "help": "zoo name (fedfit models), a local checkpoint folder, or auto (the zoo "
            "model fedfit plan picks for the population: most trained blocks, every device "
            "fitting)"
        },
    )
    max_length: int = field(default=64, metadata={"help": "tokens per example (truncation)"})
    head_init: str = field(
        default="random",
        metadata={
            "help": "classifier head start: random | ncm (federated nearest-class-mean, "
            "a measured round 0; FedNCM, Legate et al. 2023)"
        },
    )
    head_init_scale: float = field(
        default=10.0,
        metadata={"help": "ncm: logit scale s of the head s * mean_c / (|mean_c| * mean |x|)"},
    )
    head_init_clients: int = field(
        default=0,
        metadata={"help": "ncm: clients that send class sums in round 0; 0 = every eligible one"},
    )
    picked: str = field(
        default="",
        metadata={"help": "written by fedfit for model.name = auto: why this model was picked"},
    )

    def __post_init__(self) -> None:
        check(self.max_length >= 2, "model.max_length", "must be >= 2")
        self._check_positions()
        check_choice(self.head_init, "model.head_init", HEAD_INITS)
        check(
            math.isfinite(self.head_init_scale) and self.head_init_scale > 0,
            "model.head_init_scale",
            "must be a finite number > 0",
        )
        check(self.head_init_clients >= 0, "model.head_init_clients", "must be >= 0 (0 = all)")

    def _check_positions(self) -> None:
        # A longer sequence has positions the model has no embedding for: an IndexError in
        # every client's forward pass. Checked here, before any data or weights load.
        from fedfit.models.zoo import max_positions

        positions = max_positions(self.name)
        check(
            positions is None or self.max_length <= positions,
            "model.max_length",
            f"{self.max_length} is more than the {positions} positions of model {self.name!r} "
            f"(max_position_embeddings in its config); set model.max_length <= {positions}",
        )
