"""Successive layer training on transformer blocks (Pfeiffer, Khalili and Henkel, "Aggregating
capacity in FL through successive layer training for computationally-constrained devices",
NeurIPS 2023), docs/methods.md.

SLT trains the network in stages that move up it. At a stage, every layer below the stage's
layer is frozen, the stage's layer is trained in full, and the layers above it are trained in
a scaled-down form: only the first share ``s`` of their channels, with ``s`` as large as the
device's budget allows. Each stage freezes one more layer, so the part trained in full moves
up and the scaled-down part above it shrinks, and ``s`` can grow; the head on top is trained
throughout. Frozen layers need no gradient and no saved activations, and the narrowed ones
need fewer, which is how a constrained device trains every parameter at some stage.

Carried over to transformers (models/narrow.py):

- A layer is a transformer block. Scaling a block down keeps its first share of attention
  heads (Llama: of key/value heads, with their query groups) and of feed-forward units; the
  residual stream cannot be narrowed per block (every block, norm and the head read it whole),
  so it keeps its width. The paper narrows a CNN's channels, the residual width included.
- The schedule moves through the top ``stages`` blocks (0 = all), bottom first, with the
  run's rounds split evenly: stage k covers rounds ``(k R / S, (k + 1) R / S]``. A pretrained
  start needs no schedule below them (``stages`` is then a choice, like layers' max_depth);
  the paper trains from scratch and moves through every layer.
- Per device and stage, the width is the largest of ``widths`` whose predicted peak memory,
  FLOPs and upload fit the budget (costs/predict.py models narrowed blocks exactly as they
  are built). A device is admitted only if some width fits at every stage; else it is
  excluded, with the first stage it cannot fit. The paper sets one width per stage for all
  constrained devices; here each budget gets its own, as in its heterogeneous experiments.
- Aggregation is per entry: a tensor entry's new value is the example-weighted mean over
  the round's clients whose (leading) slice holds it; entries nobody trained keep their value;
  then the server optimiser (plain replacement with fedavg). The robust rules, DP-FedAvg and
  quantised uploads need whole tensors of one shape and are refused.
- Frozen blocks and the embeddings run in eval mode (no dropout), as in layer fine-tuning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

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
    train_subset,
)
from fedfit.algorithms.layers import layer_groups, trained_names
from fedfit.algorithms.registry import register
from fedfit.config import Config, ConfigError
from fedfit.costs.spec import TrainSpec
from fedfit.devices import Budget
from fedfit.log import log
from fedfit.models.narrow import narrowed
from fedfit.models.structure import embeddings, transformer_layers
from fedfit.payload import is_leading_slice, leading_region
from fedfit.planning import CostContext, Plan, first_fit

WIDTHS = (1.0, 0.75, 0.5, 0.375, 0.25, 0.125)


@dataclass(frozen=True)
class SltOptions:
    stages: int = field(
        default=0,
        metadata={"help": "top blocks the schedule moves through, one stage each; 0 = all"},
    )
    widths: tuple[float, ...] = field(
        default=WIDTHS,
        metadata={"help": "widths of the narrowed blocks to try, the largest that fits wins"},
    )

    def __post_init__(self) -> None:
        if self.stages < 0:
            raise ConfigError("method.stages: must be >= 0 (0 = every block)")
        if not self.widths or not all(0 < w <= 1 for w in self.widths):
            raise ConfigError(f"method.widths: {list(self.widths)} must be widths in (0, 1]")


class SuccessiveLayerTraining(Algorithm):
    name = "slt"
    payload_kind = "slices"
    options: SltOptions

    def __init__(self, options: SltOptions, config: Config) -> None:
        super().__init__(options, config)
        if config.server.aggregation != "mean":
            raise ConfigError(
                f"server.aggregation: {config.server.aggregation!r} needs whole tensors of one "
                "shape; slt's clients upload slices of different widths (use 'mean')"
            )
        if config.compress.upload_bits != 32:
            raise ConfigError(
                "compress.upload_bits: slt uploads narrowed slices, which the quantiser (an "
                "update against the downloaded tensor of the same shape) does not take"
            )

    def prepare(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        self.groups = layer_groups(model, task)
        blocks = len(self.groups) - 1
        if self.options.stages > blocks:
            raise ConfigError(f"method.stages: {self.options.stages} > the model's {blocks} blocks")
        stage_blocks, rounds = self.stage_blocks(), self.config.run.rounds
        used = {self.stage_of(r) for r in range(1, rounds + 1)}
        skipped = [str(b) for k, b in enumerate(stage_blocks) if k not in used]
        if skipped:
            which = (f"the stages at blocks {', '.join(skipped)} get" if len(skipped) > 1
                     else f"the stage at block {skipped[0]} gets")  # fmt: skip
            log(
                f"slt: {len(stage_blocks)} stages over run.rounds={rounds}: {which} no round "
                f"(method.stages={rounds} gives each stage one)"
            )
        allowed = {n for group in self.groups for n in group}
        for name, p in model.named_parameters():
            p.requires_grad_(name in allowed)
        return model

    def stage_blocks(self) -> list[int]:
        """The block trained in full at each stage, bottom first."""
        blocks = len(self.groups) - 1
        return list(range(blocks - (self.options.stages or blocks), blocks))

    def stage_of(self, round_: int) -> int:
        """The stage of round ``round_`` (1-based): the run's rounds split evenly."""
        stages, rounds = len(self.stage_blocks()), self.config.run.rounds
        return min(stages - 1, (round_ - 1) * stages // rounds)

    def plan(self, budget: Budget, ctx: CostContext) -> Plan:
        """Per stage, the widest narrowing that fits; out if some stage fits at no width.

        The plan's spec is the first stage's; its estimate holds the most of each cost over
        the stages (what the client rows report as predicted); ``stages`` the stages' plans.
        """
        blocks = len(self.groups) - 1
        widths = sorted(set(self.options.widths), reverse=True)
        stages: list[Plan] = []
        for k, block in enumerate(self.stage_blocks()):
            depth = blocks - block
            specs = [
                TrainSpec("slt", trained_layers=depth, width=w, optimizer=ctx.optimizer)
                for w in (widths if depth > 1 else [1.0])  # nothing above the top block
            ]
            plan = first_fit(specs, budget, ctx)
            if not plan.ok:
                reason = f"slt stage {k + 1} of {len(self.stage_blocks())} (block {block} in full)"
                return dataclasses.replace(plan, reason=f"{reason}: {plan.reason}")
            stages.append(plan)
        estimates = [p.estimate for p in stages if p.estimate is not None]
        estimate = None
        if estimates:
            estimate = dataclasses.replace(
                max(estimates, key=lambda e: e.peak_bytes),
                flops_per_step=max(e.flops_per_step for e in estimates),
                upload_bytes=max(e.upload_bytes for e in estimates),
            )
        flops = max(p.flops_per_round for p in stages)
        return Plan(True, "", stages[0].spec, estimate, flops, stages=tuple(stages))

    def configure(
        self, state: ServerState, client_id: int, seed: int, plan: Plan | None = None
    ) -> ClientTask:
        task = ClientTask(client_id, state.round + 1, seed, download=state.params)
        k = self.stage_of(state.round + 1)
        spec = plan.stages[k].spec if plan is not None and plan.ok and plan.stages else None
        depth = len(self.groups) - 1 - self.stage_blocks()[k]
        task.config["depth"] = depth
        task.config["width"] = spec.width if spec is not None else 1.0
        return task

    def client_update(
        self, model: torch.nn.Module, task: ClientTask, shard: ClientData, ctx: ClientContext
    ) -> Update:
        load_tensors_(model, task.download)
        depth, width = int(task.config["depth"]), float(task.config["width"])
        blocks = list(transformer_layers(model))
        lowest = len(blocks) - depth
        names = set(trained_names(self.groups, depth))
        allowed = {n for group in self.groups for n in group}
        frozen = [embeddings(model), *blocks[:lowest]]
        with narrowed(model, range(lowest + 1, len(blocks)), width):
            payload, metrics = train_subset(
                model,
                names,
                allowed,
                lambda: local_train(model, shard, ctx, task.seed, eval_modules=frozen),
            )
        metrics.update(trained_layers=float(depth), width=width)
        return Update(task.client_id, payload, len(shard), metrics)

    def aggregate(self, state: ServerState, updates: Sequence[Update]) -> ServerState:
        target = slice_mean(
            state.params, [u.payload for u in updates], [u.num_examples for u in updates]
        )
        return apply_server_update(state, target, self.config.server)


def slice_mean(
    params: dict[str, torch.Tensor],
    payloads: Sequence[dict[str, torch.Tensor]],
    weights: Sequence[float],
) -> dict[str, torch.Tensor]:
    """Per entry, the ``weights``-weighted mean of the payloads whose leading slice holds it
    (a payload tensor of shape (a, b) covers ``[:a, :b]`` of its full tensor); entries no
    payload holds keep ``params``' value. Only tensors some payload holds are returned."""
    out: dict[str, torch.Tensor] = {}
    for name in sorted({n for p in payloads for n in p}):
        old = params[name].to(torch.float32)
        total, weight = torch.zeros_like(old), torch.zeros_like(old)
        for payload, w in zip(payloads, weights, strict=True):
            if name not in payload:
                continue
            x = payload[name].to(torch.float32)
            if not is_leading_slice(x.shape, old.shape):
                raise ValueError(f"slt: upload {name} {tuple(x.shape)} > {tuple(old.shape)}")
            region = leading_region(x.shape)
            total[region] += w * x
            weight[region] += w
        out[name] = torch.where(weight > 0, total / weight.clamp(min=1e-30), old)
    return out


register(
    "slt",
    SltOptions,
    "Successive layer training: stages up the blocks, one trained in full, those above narrowed",
)(SuccessiveLayerTraining)
