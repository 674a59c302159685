"""Heterogeneous-rank LoRA (HetLoRA; Cho et al., "Heterogeneous LoRA for federated fine-tuning
of on-device foundation models", EMNLP 2024).

The server keeps one LoRA adapter of rank R = ``max_rank`` per target projection (plus the task
head). Each device trains rank r <= R, the largest candidate in ``ranks`` whose predicted peak
memory, FLOPs per round and upload fit its budget (``plan``); a device where even the smallest
rank does not fit is excluded.

- Download: what a rank-r device needs and nothing more: the first r rows of every A (r x in),
  the first r columns of every B (out x r), and the head. Its bytes are the serialised download.
- Local training: every peft LoRA layer's A and B modules are swapped for rank-r ``nn.Linear``
  modules holding those slices, trained with the shared ``local_train``, and swapped back
  afterwards; the device's measured memory, FLOPs and upload are those of rank r.
- Scaling: peft's ``alpha / R`` for every client (not ``alpha / r``), so that a truncated
  adapter computes exactly the top-r part of the global update,
  (alpha/R) B[:, :r] A[:r, :] = (alpha/R) B A with rows/columns beyond r set to zero.
- Aggregation (the paper's zero-padding): each client's A (r x in) and B (out x r) are
  zero-padded to R and the example-weighted mean is taken over ALL the round's clients, so a
  row beyond a client's rank counts as zero for that client (rows only high-rank devices train
  shrink towards zero in proportion to the low-rank devices' weight). The head is the plain
  weighted mean. The mean is the target of the server optimiser (fedavg, lr 1: replacement).

Not implemented from the paper: its sparsity-weighted aggregation (weights from the norm of
each client's B A) and rank self-pruning; ranks stay what the budgets allow.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import cast

import torch
from peft.tuners.lora import LoraLayer
from torch.nn import Linear, ModuleDict

from fedfit.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientData,
    ClientTask,
    ServerState,
    Update,
    apply_server_update,
    load_tensors_,
    local_train,
    trainable_tensors,
)
from fedfit.algorithms.peft import LoRA, LoraOptions
from fedfit.algorithms.registry import register
from fedfit.config import Config
from fedfit.costs.spec import TrainSpec
from fedfit.devices import Budget
from fedfit.payload import Payload
from fedfit.planning import CostContext, Plan, first_fit

ADAPTER = "default"  # peft's adapter name


@dataclass(frozen=True)
class HetLoraOptions:
    max_rank: int = field(default=8, metadata={"help": "rank R of the global adapter"})
    ranks: tuple[int, ...] = field(
        default=(8, 4, 2, 1), metadata={"help": "candidate device ranks (each <= max_rank)"}
    )
    alpha: float = field(
        default=16.0, metadata={"help": "LoRA scaling numerator; every client uses alpha / R"}
    )
    target_modules: tuple[str, ...] = field(
        default=(),
        metadata={"help": "module names to adapt; empty = query/value (q_proj/v_proj)"},
    )

    def __post_init__(self) -> None:
        from fedfit.config import ConfigError

        if self.max_rank < 1:
            raise ConfigError("method.max_rank: must be >= 1")
        if not self.ranks:
            raise ConfigError("method.ranks: needs at least one candidate rank")
        if any(not 1 <= r <= self.max_rank for r in self.ranks):
            raise ConfigError(
                f"method.ranks: {list(self.ranks)} must all be in [1, max_rank={self.max_rank}] "
                "(set method.ranks with method.max_rank)"
            )
        if self.alpha <= 0:
            raise ConfigError("method.alpha: must be > 0")


# ---------------------------------------------------------------- pure functions


def truncate(name: str, tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-``rank`` part of a global tensor: A's first rows, B's first columns; others
    (the head) unchanged."""
    if ".lora_A." in name:
        return tensor[:rank]
    if ".lora_B." in name:
        return tensor[:, :rank]
    return tensor


def zero_pad(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``tensor`` in the top-left corner of zeros of ``shape`` (HetLoRA's zero-padding)."""
    if tensor.shape == shape:
        return tensor
    out = tensor.new_zeros(shape)
    out[tuple(slice(0, n) for n in tensor.shape)] = tensor
    return out


@contextmanager
def truncated_adapters(model: torch.nn.Module, rank: int) -> Iterator[None]:
    """Within the block, every peft LoRA layer of ``model`` has rank-``rank`` A and B modules
    initialised with the top-``rank`` slices of its own; the rank-R modules (untouched) are put
    back on exit, even on error. ``layer.scaling`` stays alpha / R."""
    saved: list[tuple[ModuleDict, ModuleDict, Linear, Linear]] = []
    try:
        for layer in model.modules():
            if not isinstance(layer, LoraLayer) or ADAPTER not in layer.lora_A:
                continue
            a_dict, b_dict = cast(ModuleDict, layer.lora_A), cast(ModuleDict, layer.lora_B)
            a, b = cast(Linear, a_dict[ADAPTER]), cast(Linear, b_dict[ADAPTER])
            saved.append((a_dict, b_dict, a, b))
            a_dict[ADAPTER] = _linear_like(a.weight[:rank], a.in_features, rank)
            b_dict[ADAPTER] = _linear_like(b.weight[:, :rank], rank, b.out_features)
        yield
    finally:
        for a_dict, b_dict, full_a, full_b in saved:
            a_dict[ADAPTER], b_dict[ADAPTER] = full_a, full_b


def _linear_like(weight: torch.Tensor, n_in: int, n_out: int) -> Linear:
    """A bias-free linear layer holding a copy of ``weight`` (peft's A and B have no bias)."""
    linear = Linear(n_in, n_out, bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


# ---------------------------------------------------------------- the method


class HetLoRA(Algorithm):
    """Each device trains its own LoRA rank; zero-padded example-weighted averaging."""

    name = "hetlora"
    options: HetLoraOptions

    def __init__(self, options: HetLoraOptions, config: Config) -> None:
        super().__init__(options, config)
        # Truncated downloads of the current round, one per rank: shared by the clients of
        # that rank and kept alive for the round (the engine keys download sizes by id).
        self._downloads: dict[tuple[int, int], Payload] = {}

    def prepare(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        """peft LoRA of rank R = max_rank on the target modules (+ head), as ``lora``."""
        o = self.options
        lora = LoraOptions(r=o.max_rank, alpha=o.alpha, target_modules=o.target_modules)
        return LoRA(lora, self.config).prepare(model, task)

    def spec(self, ctx: CostContext, rank: int | None = None) -> TrainSpec:
        """A rank-``rank`` client (default R) for the cost model."""
        o = self.options
        return TrainSpec(
            "lora",
            lora_rank=rank or o.max_rank,
            lora_targets=o.target_modules,
            optimizer=ctx.optimizer,
        )

    def plan(self, budget: Budget, ctx: CostContext) -> Plan:
        """The largest candidate rank that fits; excluded when even the smallest does not."""
        ranks = sorted(set(self.options.ranks), reverse=True)
        return first_fit([self.spec(ctx, r) for r in ranks], budget, ctx)

    def configure(
        self, state: ServerState, client_id: int, seed: int, plan: Plan | None = None
    ) -> ClientTask:
        rank = self.options.max_rank  # no plan (tests, unlimited budgets): the global rank
        if plan is not None and plan.ok and plan.spec is not None:
            rank = plan.spec.lora_rank
        key = (state.round, rank)
        if key not in self._downloads:
            self._downloads = {k: v for k, v in self._downloads.items() if k[0] == state.round}
            self._downloads[key] = {n: truncate(n, t, rank) for n, t in state.params.items()}
        task = ClientTask(client_id, state.round + 1, seed, download=self._downloads[key])
        task.config["rank"] = rank
        return task

    def client_update(
        self, model: torch.nn.Module, task: ClientTask, shard: ClientData, ctx: ClientContext
    ) -> Update:
        rank = int(task.config["rank"])
        with truncated_adapters(model, rank):
            load_tensors_(model, task.download)
            metrics = local_train(model, shard, ctx, task.seed)
            payload = trainable_tensors(model)
        metrics["lora_rank"] = float(rank)
        return Update(task.client_id, payload, len(shard), metrics)

    def aggregate(self, state: ServerState, updates: Sequence[Update]) -> ServerState:
        padded = [
            {n: zero_pad(t, state.params[n].shape) for n, t in u.payload.items()} for u in updates
        ]
        mean = self.combine(state, padded, [u.num_examples for u in updates])
        return apply_server_update(state, mean, self.config.server)


register(
    "hetlora",
    HetLoraOptions,
    "Heterogeneous-rank LoRA: each device its own rank, zero-padded averaging",
)(HetLoRA)
