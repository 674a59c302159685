"""Client-level differential privacy: DP-FedAvg and its accountant (the ``[privacy]`` section).

DP-FedAvg (McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent
Language Models", ICLR 2018), with the server trusted to add the noise:

1. each sampled client's change (its upload minus the global tensors it was sent, or its
   gradient) is clipped to L2 norm ``privacy.clip_norm`` = S over all its tensors;
2. the server sums the clipped changes and divides by the fixed number of clients sampled
   per round, m = ``data.clients_per_round`` (not by the number that answered, and with equal
   weight per client: an example count would be data-dependent), so one client moves the
   average by at most S / m;
3. Gaussian noise of standard deviation ``privacy.noise_multiplier`` x S / m is added to every
   trainable tensor (to those no client uploaded this round too: which tensors a client trains
   must not show), seeded by the run seed and round so a resumed run draws the same noise;
4. the server optimiser then steps on the noisy average (post-processing, free of privacy cost).

The privacy spent is computed by opacus's RDP accountant (``opacus.accountants.RDPAccountant``):
one step per round at sampling rate q = m / (number of eligible clients) and the configured
noise multiplier, epsilon for ``privacy.delta``. Every round's row in rounds.jsonl carries
``privacy: {epsilon, delta}`` and summary.json the final figure. The accountant's analysis
assumes Poisson sampling of clients; fedfit samples exactly m clients per round without
replacement, the approximation that DP-FedAvg's own paper and most FL libraries make.

Supported for methods whose uploads are tensors combined by the server (weights or gradients,
``payload_kind`` "weights" / "gradient"); seed-and-scalar uploads, partial training's subsets,
robust aggregation rules, the class-mean head's round 0 (class sums sent without noise) and
Flower's secure aggregation are refused with a ConfigError that says why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedfit.engine.seeds import derive_seed
from fedfit.errors import ConfigError, check
from fedfit.robust import change_of

_SALT = 0xD9


@dataclass(frozen=True)
class PrivacyConfig:
    """The ``[privacy]`` config section; off while ``noise_multiplier`` is 0."""

    noise_multiplier: float = field(
        default=0.0,
        metadata={"help": "Gaussian noise std / clip_norm (z); 0 = no differential privacy"},
    )
    clip_norm: float = field(
        default=1.0, metadata={"help": "L2 bound S on each client's change (all tensors)"}
    )
    delta: float = field(default=1e-5, metadata={"help": "delta of the (epsilon, delta) spent"})

    def __post_init__(self) -> None:
        check(self.noise_multiplier >= 0, "privacy.noise_multiplier", "must be >= 0 (0 = off)")
        check(self.clip_norm > 0, "privacy.clip_norm", "must be > 0")
        check(0 < self.delta < 1, "privacy.delta", "must be in (0, 1)")

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0


def check_supported(
    config: PrivacyConfig, *, method: str, payload_kind: str, aggregation: str, head_init: str
) -> None:
    """ConfigError when DP-FedAvg cannot apply to this run (see the module docstring)."""
    if not config.enabled:
        return
    if payload_kind not in ("weights", "gradient"):
        what = "seeds and scalars" if payload_kind == "scalars" else "a share of the tensors"
        raise ConfigError(
            f"privacy.noise_multiplier: {method} uploads {what}; DP-FedAvg clips and noises "
            "uploads of whole tensors (weights or gradients)"
        )
    if aggregation != "mean":
        raise ConfigError(
            f"privacy.noise_multiplier: server.aggregation = {aggregation!r}; DP-FedAvg's "
            "sensitivity bound holds for the clipped mean (server.aggregation = 'mean')"
        )
    if head_init == "ncm":
        raise ConfigError(
            "privacy.noise_multiplier: model.head_init = 'ncm' sends every client's class sums "
            "without noise in round 0; use model.head_init = 'random' with privacy"
        )


def dp_mean(
    payloads: Sequence[Mapping[str, torch.Tensor]],
    reference: Mapping[str, torch.Tensor],
    *,
    gradients: bool,
    clip_norm: float,
    noise_multiplier: float,
    sampled: int,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The noisy clipped mean (float64) of the payloads, over every tensor of ``reference``
    (the global trainable tensors): weights come back as reference + noisy mean change,
    gradients as the noisy mean gradient."""
    total = {n: torch.zeros(t.shape, dtype=torch.float64) for n, t in reference.items()}
    for payload in payloads:
        change, norm = change_of(payload, None if gradients else reference)
        scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
        for n, c in change.items():
            total[n] += scale * c
    std = noise_multiplier * clip_norm / sampled
    out = {}
    for n, t in total.items():
        noisy = t / sampled + std * torch.randn(t.shape, generator=generator, dtype=torch.float64)
        out[n] = noisy if gradients else reference[n].to(torch.float64) + noisy
    return out


def noise_seed(run_seed: int, round_: int) -> int:
    """The seed of round ``round_``'s noise."""
    return derive_seed(run_seed, round_, _SALT)


def epsilon_spent(config: PrivacyConfig, sample_rate: float, rounds: int) -> float:
    """The epsilon (at ``config.delta``) of ``rounds`` rounds at ``sample_rate``, by opacus's
    RDP accountant; 0 before any round."""
    if rounds == 0:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(config.noise_multiplier, sample_rate, rounds)]
    return float(accountant.get_epsilon(config.delta))
