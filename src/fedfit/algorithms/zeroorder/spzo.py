"""FedSPZO: split-perturbation zero-order fine-tuning (Aboelenien Ahmed et al., arXiv
2502.10239), reconstructed from its abstract and summaries (docs/methods.md).

The network is split at block s (``split``; negative counts from the top, default -1: block 2
is the top transformer block plus the head): block 1 = embeddings + blocks [0, s), block 2 =
blocks [s, L) + final norm / pooler + head. A local step on one minibatch, with step seeds
derived from the client's seed:

    for i < P1:  z1_i over block 1's trained tensors
        h+ = block1(theta1 + eps z1_i),  h- = block1(theta1 - eps z1_i)      (kept)
        for j < P2:  z2_ij over block 2's trained tensors
            g_ij = (L(block2(h+; theta2 + eps z2_ij)) - L(block2(h-; theta2 - eps z2_ij))) / 2eps
        gbar_i = mean_j g_ij
    theta1 <- theta1 - lr/P1 sum_i gbar_i z1_i
    theta2 <- theta2 - lr/(P1 P2) sum_ij g_ij z2_ij

Each g_ij is MeZO's two-point estimate along the joint direction (z1_i, z2_ij); block 2 gets
P1 P2 of them, block 1 gets P1, each averaged over its inner loop (which averages away the part
of g due to z2). Block 1 runs twice per i and its outputs are reused by the inner loop, so a
step costs 2 P1 C1 + 2 P1 P2 C2 forward FLOPs (C1, C2: one forward of each block; tested to
5%), against 2 P (C1 + C2) for MeZO with P perturbations. ``p2 > p1`` as in the method. The
two kept outputs h+/h- are the only memory beyond an inference forward.

Choices made here (reconstructed): the estimator above; the update averages (not sums) the
estimates; a trained tensor shared by both blocks (tied input/output embeddings trained in
full) is refused, since it would be perturbed by both loops. Upload: (seed, scalar) pairs
as one int64 base seed plus the scalars (float32 [steps, P1] and [steps, P1, P2]): the server
derives every seed from the base seed. Download: the global tensors (weights), since replaying
every client's pairs would cost a device far more than the forward passes it saves. The
server rebuilds each client's model change by replaying its pairs, averages them with the
clients' example weights and applies the server optimiser.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedfit.algorithms.base import (
    ClientContext,
    ClientData,
    ClientTask,
    ServerState,
    Update,
    apply_server_update,
    load_tensors_,
)
from fedfit.algorithms.registry import register
from fedfit.algorithms.zeroorder.core import (
    as_float32,
    derive,
    perturb_,
    replay_,
    restore_,
)
from fedfit.algorithms.zeroorder.mezo import (
    Batch,
    ZeroOrder,
    ZOOptions,
    metered_steps,
    step_coeff,
    trained,
)
from fedfit.config import ConfigError
from fedfit.costs.spec import TrainSpec
from fedfit.models.structure import embeddings, hidden_states_at, swapped, transformer_layers
from fedfit.planning import CostContext


@dataclass(frozen=True)
class SPZOOptions(ZOOptions):
    split: int = field(
        default=-1, metadata={"help": "block 2 starts at this block (negative: from the top)"}
    )
    p1: int = field(default=1, metadata={"help": "perturbations of block 1 per step (P1)"})
    p2: int = field(default=4, metadata={"help": "perturbations of block 2 per P1 one (P2)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.p1 < 1:
            raise ConfigError("method.p1: must be >= 1")
        if self.p2 <= self.p1:
            raise ConfigError("method.p2: must be > p1 (FedSPZO reuses block 1's outputs)")


class _Given(torch.nn.Module):
    """Stands in for the embeddings during block 2: returns block 1's output."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        return self.hidden


class SplitModel:
    """The model as block 1 (embeddings + blocks [0, s)) and block 2 (the rest)."""

    def __init__(self, model: torch.nn.Module, split: int) -> None:
        blocks = transformer_layers(model)
        s = split if split >= 0 else len(blocks) + split
        if not 0 <= s <= len(blocks):
            raise ValueError(f"fedspzo: split {split} outside the model's {len(blocks)} blocks")
        self.model, self.s = model, s
        lower = [embeddings(model), *list(blocks)[:s]]
        below = {id(m) for module in lower for m in module.modules()}
        in_block1 = {id(p) for m in lower for p in m.parameters()}
        in_block2 = {
            id(p)
            for m in model.modules()
            if id(m) not in below
            for p in m.parameters(recurse=False)
        }
        params = trained(model)
        shared = [n for n, p in params.items() if id(p) in in_block1 and id(p) in in_block2]
        if shared:
            raise ValueError(
                f"fedspzo: {shared[0]} is used below and above the split (tied embeddings); "
                "train it with peft = lora (or another peft) or pick another method"
            )
        self.block1 = {n: p for n, p in params.items() if id(p) in in_block1}
        self.block2 = {n: p for n, p in params.items() if id(p) not in in_block1}

    def lower(self, batch: Batch) -> torch.Tensor:
        """Block 1's output: the hidden states at the input of block s."""
        return hidden_states_at(self.model, batch, self.s)

    @torch.no_grad()
    def upper(self, batch: Batch, hidden: torch.Tensor) -> float:
        """Block 2's loss on block 1's output ``hidden``."""
        blocks = list(transformer_layers(self.model))[self.s :]
        with swapped(self.model, _Given(hidden), blocks):
            return float(self.model(**batch).loss)


@dataclass
class StepScalars:
    """One step's scalars: gbar [P1] for block 1, g [P1][P2] for block 2."""

    block1: list[float]
    block2: list[list[float]]


def step_pairs(
    base: int, t: int, scalars: StepScalars, lr: float
) -> tuple[tuple[list[int], list[float]], tuple[list[int], list[float]]]:
    """Step t's (seeds, coefficients) for block 1 and for block 2, in update order."""
    p1, p2 = len(scalars.block2), len(scalars.block2[0])
    seeds1 = [derive(base, t, i, 0) for i in range(p1)]
    coeffs1 = [step_coeff(lr, g, p1) for g in scalars.block1]
    seeds2 = [derive(base, t, i, 1 + j) for i in range(p1) for j in range(p2)]
    coeffs2 = [step_coeff(lr, g, p1 * p2) for row in scalars.block2 for g in row]
    return (seeds1, coeffs1), (seeds2, coeffs2)


def two_point(
    params: dict[str, torch.nn.Parameter], seed: int, eps: float, at: Callable[[int], Any]
) -> tuple[Any, Any]:
    """(at(+1), at(-1)) with ``params`` at theta + eps z(seed), then theta - eps z(seed);
    restored bit for bit afterwards."""
    record = perturb_(params, seed, eps)
    try:
        plus = at(1)
        record = restore_(params, record, then_scale=-eps)  # type: ignore[assignment]
        minus = at(-1)
    finally:
        restore_(params, record)
    return plus, minus


def spzo_step(
    split: SplitModel, batch: Batch, base: int, t: int, p1: int, p2: int, eps: float, lr: float
) -> tuple[StepScalars, float]:
    """One FedSPZO step (module docstring); updates the tensors and returns the scalars and
    the mean of the block-2 losses."""
    scalars = StepScalars([], [])
    losses: list[float] = []
    for i in range(p1):
        h_plus, h_minus = two_point(
            split.block1, derive(base, t, i, 0), eps, lambda _: split.lower(batch)
        )
        hidden = {1: h_plus, -1: h_minus}
        row = []
        for j in range(p2):
            plus, minus = two_point(
                split.block2,
                derive(base, t, i, 1 + j),
                eps,
                lambda sign, h=hidden: split.upper(batch, h[sign]),  # type: ignore[misc]
            )
            row.append(as_float32((plus - minus) / (2 * eps)))
            losses += [plus, minus]
        scalars.block2.append(row)
        scalars.block1.append(as_float32(float(np.mean(row))))
        del h_plus, h_minus, hidden
    (seeds1, coeffs1), (seeds2, coeffs2) = step_pairs(base, t, scalars, lr)
    replay_(split.block1, seeds1, coeffs1)
    replay_(split.block2, seeds2, coeffs2)
    return scalars, float(np.mean(losses))


class FedSPZO(ZeroOrder):
    """Split-perturbation ZO local steps, scalars up, weights down (module docstring)."""

    name = "fedspzo"
    payload_kind = "scalars"

    @property
    def opts(self) -> SPZOOptions:
        return self.options  # type: ignore[return-value]

    def prepare(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        model = super().prepare(model, task)
        split = SplitModel(model, self.opts.split)  # checks the split now, not mid-run
        self.block_names = (list(split.block1), list(split.block2))
        return model

    def spec(self, ctx: CostContext) -> TrainSpec:
        """P1 x P2 split perturbations, block 2 from block ``split`` (negative: from the
        top), the base seed and the scalars up (costs/predict.py, section Zero order)."""
        o = self.opts
        layers = int(ctx.model_config.num_hidden_layers)  # type: ignore[attr-defined]
        split = o.split if o.split >= 0 else layers + o.split
        return dataclasses.replace(
            super().spec(ctx), step="spzo", probes=o.p1, probes2=o.p2, split=split, upload="spzo"
        )

    def client_update(
        self, model: torch.nn.Module, task: ClientTask, shard: ClientData, ctx: ClientContext
    ) -> Update:
        o = self.opts
        load_tensors_(model, task.download)
        split = SplitModel(model, o.split)
        base = task.seed
        block1: list[list[float]] = []
        block2: list[list[list[float]]] = []

        def step_for(t: int) -> Callable[[torch.nn.Module, Batch], torch.Tensor]:
            def step(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
                scalars, loss = spzo_step(split, batch, base, t, o.p1, o.p2, o.eps, ctx.train.lr)
                block1.append(scalars.block1)
                block2.append(scalars.block2)
                return torch.tensor(loss)

            return step

        kind = ("spzo", split.s, o.p1, o.p2)
        losses = metered_steps(model, shard, ctx, task.seed, step_for, kind)
        payload = {
            "base_seed": torch.tensor([base], dtype=torch.int64),
            "block1_scalar": torch.tensor(block1, dtype=torch.float32),
            "block2_scalar": torch.tensor(block2, dtype=torch.float32),
        }
        metrics = {"train_loss": float(np.mean(losses)), "steps": float(len(losses))}
        return Update(task.client_id, payload, len(shard), metrics)

    def aggregate(self, state: ServerState, updates: Sequence[Update]) -> ServerState:
        total = float(sum(u.num_examples for u in updates))
        names1, names2 = self.block_names
        # The weighted sum of the clients' changes, in float64 so that K identical updates
        # aggregate to exactly what one does (z is the same float32 draw either way).
        change = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in state.params.items()}
        for u in updates:
            w = u.num_examples / total  # the client's coefficients times its weight
            replay_client(
                {n: change[n] for n in names1},
                {n: change[n] for n in names2},
                u.payload,
                self.config.train.lr * w,
            )
        target = {n: (t.to(torch.float64) + change[n]).to(t.dtype) for n, t in state.params.items()}
        return apply_server_update(state, target, self.config.server)


def replay_client(
    block1: dict[str, torch.Tensor],
    block2: dict[str, torch.Tensor],
    payload: dict[str, torch.Tensor],
    lr: float,
) -> None:
    """Replay one client's uploaded pairs, step by step, on the two blocks' tensors."""
    base = int(payload["base_seed"][0])
    for t, (g1, g2) in enumerate(
        zip(payload["block1_scalar"].tolist(), payload["block2_scalar"].tolist(), strict=True)
    ):
        (seeds1, coeffs1), (seeds2, coeffs2) = step_pairs(base, t, StepScalars(g1, g2), lr)
        replay_(block1, seeds1, coeffs1)
        replay_(block2, seeds2, coeffs2)


register("fedspzo", SPZOOptions, "FedSPZO: split-perturbation ZO, scalars up (ZO)")(FedSPZO)
