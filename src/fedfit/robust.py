"""Robust aggregation: combining clients' tensors so that a few bad ones cannot steer the mean.

``server.aggregation`` picks the rule applied to each round's uploads of tensors (weights or
gradients; seed-and-scalar uploads are averaged by their methods):

- ``mean``: the example-weighted mean (FedAvg), the default;
- ``median``: the coordinate-wise median (Yin et al., ICML 2018); for an even count the mean
  of the two middle values;
- ``trimmed_mean``: per coordinate, the ``server.trim`` fraction of the largest and of the
  smallest values dropped (floor(trim * n) each), the rest averaged (Yin et al., 2018);
- ``krum``: the one update whose summed squared distance to its n - f - 2 nearest others is
  smallest (Blanchard et al., NeurIPS 2017), ``f`` = ``server.krum_f`` the attackers it
  tolerates (n > 2f + 2; with fewer updates the neighbours counted shrink, at least 1);
- ``multi_krum``: the mean of the n - f updates with the smallest Krum scores.

The coordinate-wise rules and the Krum rules are unweighted (an example count is what a
client claims; the robust rules do not trust it). ``server.clip_norm`` (0 = off) first
scales each client's change (its upload minus the global tensors, or its gradient) down to
that L2 norm over all its tensors, before any rule. A tensor some clients did not upload
(layer-wise methods) is combined over the clients that did; Krum's distances need every
client to upload the same tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

AGGREGATIONS = ("mean", "median", "trimmed_mean", "krum", "multi_krum")

Payload = Mapping[str, torch.Tensor]


def weighted_mean(payloads: Sequence[Payload], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Per-tensor weighted mean over the payloads that hold that tensor (weights
    renormalised over them), in float64."""
    sums: dict[str, torch.Tensor] = {}
    totals: dict[str, float] = {}
    for payload, w in zip(payloads, weights, strict=True):
        for name, t in payload.items():
            t = t.to(torch.float64) * w
            sums[name] = sums[name] + t if name in sums else t
            totals[name] = totals.get(name, 0.0) + w
    return {n: s / totals[n] for n, s in sums.items()}


def change_of(payload: Payload, reference: Payload | None) -> tuple[dict[str, torch.Tensor], float]:
    """``payload``'s change against ``reference`` (the payload itself when None), in float64,
    and its L2 norm over all its tensors."""
    change = {
        n: t.to(torch.float64) - (0 if reference is None else reference[n].to(torch.float64))
        for n, t in payload.items()
    }
    return change, math.sqrt(sum(float((c * c).sum()) for c in change.values()))


def clip(payload: Payload, reference: Payload | None, max_norm: float) -> dict[str, torch.Tensor]:
    """``payload`` with its change against ``reference`` (the payload itself when None)
    scaled down to L2 norm ``max_norm`` over all its tensors."""
    change, norm = change_of(payload, reference)
    if norm <= max_norm:
        return {n: t.to(torch.float64) for n, t in payload.items()}
    scale = max_norm / norm
    return {
        n: (0 if reference is None else reference[n].to(torch.float64)) + c * scale
        for n, c in change.items()
    }


def _stacked(payloads: Sequence[Payload]) -> dict[str, torch.Tensor]:
    names: dict[str, list[torch.Tensor]] = {}
    for payload in payloads:
        for name, t in payload.items():
            names.setdefault(name, []).append(t.to(torch.float64))
    return {n: torch.stack(ts) for n, ts in names.items()}


def median(payloads: Sequence[Payload]) -> dict[str, torch.Tensor]:
    out = {}
    for name, x in _stacked(payloads).items():
        s, n = x.sort(dim=0).values, x.shape[0]
        out[name] = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return out


def trimmed_mean(payloads: Sequence[Payload], trim: float) -> dict[str, torch.Tensor]:
    out = {}
    for name, x in _stacked(payloads).items():
        n = x.shape[0]
        k = min(int(math.floor(trim * n)), (n - 1) // 2)
        out[name] = x.sort(dim=0).values[k : n - k].mean(dim=0)
    return out


def krum_scores(payloads: Sequence[Payload], f: int) -> list[float]:
    """Each payload's Krum score: the sum of its squared distances to its n - f - 2 nearest
    other payloads (at least 1)."""
    names = set(payloads[0])
    if any(set(p) != names for p in payloads):
        raise ValueError(
            "server.aggregation = krum / multi_krum needs every client to upload the same "
            "tensors; this round's uploads differ (a layer-wise method): use median or "
            "trimmed_mean"
        )
    flat = torch.stack(
        [torch.cat([p[n].to(torch.float64).reshape(-1) for n in sorted(names)]) for p in payloads]
    )
    dist = torch.cdist(flat, flat) ** 2
    n = len(payloads)
    keep = max(1, n - f - 2)
    scores = []
    for i in range(n):
        others = torch.cat([dist[i, :i], dist[i, i + 1 :]])
        scores.append(float(others.sort().values[: min(keep, n - 1)].sum()) if n > 1 else 0.0)
    return scores


def krum(payloads: Sequence[Payload], f: int, multi: bool) -> dict[str, torch.Tensor]:
    scores = krum_scores(payloads, f)
    order = sorted(range(len(payloads)), key=lambda i: (scores[i], i))
    chosen = order[: max(1, len(payloads) - f)] if multi else order[:1]
    return weighted_mean([payloads[i] for i in chosen], [1.0] * len(chosen))


def combine(
    payloads: Sequence[Payload],
    weights: Sequence[float],
    *,
    rule: str = "mean",
    trim: float = 0.1,
    krum_f: int = 1,
    clip_norm: float = 0.0,
    reference: Payload | None = None,
) -> dict[str, torch.Tensor]:
    """The round's combined tensors by ``rule`` (see the module docstring); ``reference``:
    the global tensors the uploads are weights of (None for gradients)."""
    if clip_norm > 0:
        payloads = [clip(p, reference, clip_norm) for p in payloads]
    if rule == "mean":
        return weighted_mean(payloads, weights)
    if rule == "median":
        return median(payloads)
    if rule == "trimmed_mean":
        return trimmed_mean(payloads, trim)
    if rule in ("krum", "multi_krum"):
        return krum(payloads, krum_f, multi=rule == "multi_krum")
    raise ValueError(f"unknown aggregation {rule!r}; allowed: {', '.join(AGGREGATIONS)}")
