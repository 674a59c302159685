"""Server optimisers on the pseudo-gradient (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

Each round the server turns the clients' aggregate into an update direction
``delta = aggregate - x`` (for FedAvg-style methods: the example-weighted mean of the clients'
new weights minus the global weights) and applies, per tensor:

- fedavg:     x <- x + eta * delta                        (eta = 1 is plain FedAvg)
- fedadagrad: v <- v + delta^2
- fedadam:    v <- beta2 v + (1 - beta2) delta^2
- fedyogi:    v <- v - (1 - beta2) delta^2 sign(v - delta^2)
  and for the three adaptive ones, with m <- beta1 m + (1 - beta1) delta:
              x <- x + eta * m / (sqrt(v) + tau)

As in Algorithm 2 of the paper there is no bias correction, and v starts at tau^2
(the paper asks v_{-1} >= tau^2); m starts at 0.

``secure_aggregation = "secaggplus"`` (Flower deployments and the Flower executor only) has
the server receive only the sum of the clients' uploads, through Flower's SecAgg+ protocol;
its ``secagg_*`` keys are Flower's own parameters (docs/secure-aggregation.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fedfit.errors import check, check_choice
from fedfit.robust import AGGREGATIONS

SERVER_OPTIMIZERS = ("fedavg", "fedadam", "fedyogi", "fedadagrad")
SECURE_AGGREGATION = ("none", "secaggplus")
SECAGG_MODULUS = 2**32  # Flower's modulus_range: masked sums are taken modulo it

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ServerConfig:
    """The ``[server]`` config section: the server optimiser and its hyperparameters."""

    optimizer: str = field(
        default="fedavg", metadata={"help": "fedavg | fedadam | fedyogi | fedadagrad"}
    )
    lr: float = field(default=1.0, metadata={"help": "server learning rate (eta)"})
    beta1: float = field(default=0.9, metadata={"help": "first-moment decay (adaptive)"})
    beta2: float = field(default=0.99, metadata={"help": "second-moment decay (adam/yogi)"})
    tau: float = field(default=1e-3, metadata={"help": "adaptivity (epsilon) of FedOpt"})
    aggregation: str = field(
        default="mean",
        metadata={"help": "mean | median | trimmed_mean | krum | multi_krum (fedfit/robust.py)"},
    )
    trim: float = field(
        default=0.1, metadata={"help": "trimmed_mean: fraction dropped at each end"}
    )
    krum_f: int = field(default=1, metadata={"help": "krum: attackers tolerated (n > 2f + 2)"})
    clip_norm: float = field(
        default=0.0, metadata={"help": "clip each client's change to this L2 norm; 0 = off"}
    )
    secure_aggregation: str = field(
        default="none",
        metadata={"help": "none | secaggplus: the server sees only the sum (Flower's SecAgg+)"},
    )
    secagg_num_shares: float = field(
        default=3,
        metadata={"help": "SecAgg+: key shares per client, a count > 2 or a fraction <= 1"},
    )
    secagg_reconstruction_threshold: float = field(
        default=2,
        metadata={"help": "SecAgg+: shares that rebuild a key, a count or a fraction <= 1"},
    )
    secagg_clipping_range: float = field(
        default=8.0, metadata={"help": "SecAgg+: each uploaded change clipped to +-this"}
    )
    secagg_quantization_range: int = field(
        default=2**22, metadata={"help": "SecAgg+: integer levels over the clipping range"}
    )

    def __post_init__(self) -> None:
        check_choice(self.optimizer, "server.optimizer", SERVER_OPTIMIZERS)
        check(self.lr > 0, "server.lr", "must be > 0")
        check(0 <= self.beta1 < 1, "server.beta1", "must be in [0, 1)")
        check(0 <= self.beta2 < 1, "server.beta2", "must be in [0, 1)")
        check(self.tau > 0, "server.tau", "must be > 0")
        check_choice(self.aggregation, "server.aggregation", AGGREGATIONS)
        check(0 <= self.trim < 0.5, "server.trim", "must be in [0, 0.5)")
        check(self.krum_f >= 0, "server.krum_f", "must be >= 0")
        check(self.clip_norm >= 0, "server.clip_norm", "must be >= 0 (0 = off)")
        check_choice(self.secure_aggregation, "server.secure_aggregation", SECURE_AGGREGATION)
        shares, threshold = self.secagg_num_shares, self.secagg_reconstruction_threshold
        check(
            0 < shares <= 1 or (shares == int(shares) and shares > 2),
            "server.secagg_num_shares",
            "must be a count > 2 or a fraction of the round's clients in (0, 1]",
        )
        check(
            0 < threshold <= 1 or threshold == int(threshold),
            "server.secagg_reconstruction_threshold",
            "must be a count >= 2 or a fraction of the shares in (0, 1]",
        )
        check(
            threshold <= 1 or shares <= 1 or threshold < shares,
            "server.secagg_reconstruction_threshold",
            f"must be < server.secagg_num_shares ({shares:g})",
        )
        check(self.secagg_clipping_range > 0, "server.secagg_clipping_range", "must be > 0")
        check(
            1 < self.secagg_quantization_range < SECAGG_MODULUS,
            "server.secagg_quantization_range",
            f"must be in (1, {SECAGG_MODULUS}) (Flower's modulus)",
        )


def server_step(
    params: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    state: dict[str, Tensors],
    config: ServerConfig,
) -> tuple[Tensors, dict[str, Tensors]]:
    """Apply one server optimiser step; returns new params and new state (inputs untouched).

    ``delta`` may hold a subset of ``params`` (tensors nobody trained this round keep their
    value and their optimiser state).
    """
    new_params = dict(params)
    m_state, v_state = dict(state.get("m", {})), dict(state.get("v", {}))
    for name, d in delta.items():
        x = params[name]
        d = d.to(x.dtype)
        if config.optimizer == "fedavg":
            new_params[name] = x + config.lr * d
            continue
        m = m_state.get(name, torch.zeros_like(x))
        v = v_state.get(name, torch.full_like(x, config.tau**2))
        m = config.beta1 * m + (1 - config.beta1) * d
        d2 = d * d
        if config.optimizer == "fedadagrad":
            v = v + d2
        elif config.optimizer == "fedadam":
            v = config.beta2 * v + (1 - config.beta2) * d2
        elif config.optimizer == "fedyogi":
            v = v - (1 - config.beta2) * d2 * torch.sign(v - d2)
        else:  # pragma: no cover - ServerConfig validates the name
            raise ValueError(config.optimizer)
        m_state[name], v_state[name] = m, v
        new_params[name] = x + config.lr * m / (v.sqrt() + config.tau)
    return new_params, ({"m": m_state, "v": v_state} if m_state else {})
