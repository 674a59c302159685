"""Who trains what under which budget: predicted costs against each device's budget.

Before round 1 every client of the population gets a ``Plan`` from its method: what it would
train (a ``TrainSpec``), the predicted cost of a round (``costs.predict`` on the run's
worst-case batch shape, ``train.batch_size`` x ``model.max_length``, times the local steps),
and whether that fits its ``Budget`` once predicted memory and FLOPs are raised by the safety
margin ``devices.margin`` (the cost model is tested to 10% on memory and 5% on FLOPs). A client that fits nothing is excluded with its reason;
a population where nobody fits is an error before training starts. Predictions are
worst-case on purpose: real batches are padded only to their longest example, so the
measured cost of a round is at most the predicted one (checked from clients.jsonl in tests).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedfit.costs.predict import COST_MODELS, CostEstimate, has_cost_model, predict
from fedfit.costs.spec import TrainSpec
from fedfit.devices import Budget, Reference


@dataclass(frozen=True)
class CostContext:
    """What a prediction needs: the architecture, the task and the client's step shape."""

    model_config: Any
    task: str
    num_labels: int
    batch_size: int
    seq_len: int
    steps: int
    optimizer: str
    margin: float = 0.0  # predicted memory and FLOPs are scaled by (1 + margin) when fitting

    def padded(self, value: int) -> int:
        """A predicted amount with the safety margin: what a budget must hold."""
        return math.ceil(value * (1 + self.margin))

    def estimate(self, spec: TrainSpec) -> CostEstimate:
        return predict(
            self.model_config,
            self.task,
            self.num_labels,
            spec,
            self.batch_size,
            self.seq_len,
            steps=self.steps,
        )

    @property
    def predictable(self) -> bool:
        """Whether the cost model covers this architecture (BERT, Llama; not the LSTM)."""
        return has_cost_model(self.model_config)

    def reference(self) -> Reference:
        """What full fine-tuning needs (margin included): "1x" in budgets written as fractions."""
        if not self.predictable:
            raise ValueError(
                "devices: budgets written as fractions of full fine-tuning ('0.25x') need "
                f"the cost model, which does not cover model_type "
                f"{self.model_config.model_type!r} (only {', '.join(COST_MODELS)}); give "
                "budgets in bytes and FLOPs, or none"
            )
        full = self.estimate(TrainSpec("full", optimizer=self.optimizer))
        return Reference(
            memory_bytes=self.padded(full.peak_bytes),
            flops_per_round=self.padded(full.flops_per_round(self.steps)),
            upload_bytes=full.upload_bytes,
            download_bytes=full.upload_bytes,
        )


@dataclass(frozen=True)
class Plan:
    """One client's assignment: what it trains and its predicted cost, or why it is out."""

    ok: bool
    reason: str = ""
    spec: TrainSpec | None = None
    estimate: CostEstimate | None = None
    flops_per_round: int = 0
    # a mixed run (method "auto"): the method chosen, and why each stronger one did not fit
    method: str = ""
    passed: tuple[str, ...] = ()
    # successive layer training (algorithms/slt.py): the plan of each stage, bottom first
    stages: tuple[Plan, ...] = ()

    @property
    def depth(self) -> int:
        return self.spec.trained_layers if self.spec else 0

    def describe(self) -> str:
        if not self.ok or self.spec is None:
            return "excluded"
        if self.stages:
            widths = ", ".join(f"{p.spec.width:g}" for p in self.stages if p.spec is not None)
            return f"{len(self.stages)} stages up the blocks, narrowed to widths {widths} + head"
        trains = describe_spec(self.spec)
        return f"{self.method}: {trains}" if self.method else trains


def describe_spec(spec: TrainSpec) -> str:
    trains = {
        "full": "full model",
        "lora": f"LoRA r={spec.lora_rank} + head",
        "layers": f"top {spec.trained_layers} blocks + head",
        "slt": f"top {spec.trained_layers} blocks + head, those above the lowest at width "
        f"{spec.width:g}",
        "head": "head only",
        "bitfit": "biases + head",
        "ia3": "IA3 + head",
    }[spec.kind]
    if spec.share[1] > 1:
        trains += f" (share of {spec.share[1]})"
    if spec.frozen_dtype != "float32":
        trains += f", the rest held in {spec.frozen_dtype}"
    how = {
        "backprop": "",
        "jvp": f", jvp x{spec.probes}",
        "fd": f", finite diff. x{spec.probes}",
        "zo": f", ZO x{spec.probes}",
        "spzo": f", split ZO {spec.probes}x{spec.probes2}",
    }[spec.step]
    return trains + how


def check(spec: TrainSpec, budget: Budget, ctx: CostContext) -> Plan:
    """The plan for a fixed spec: fits or not, with the first exceeded resource named.

    An architecture the cost model does not cover (the LSTM) is planned only for a device
    with no budget: it trains, with no prediction (its costs are still measured); a budget
    it cannot be checked against is an error naming the model type."""
    if not ctx.predictable:
        if budget.constrained:
            raise ValueError(
                f"no cost model for model_type {ctx.model_config.model_type!r} (only "
                f"{', '.join(COST_MODELS)}): its devices' budgets cannot be checked; run it "
                "without memory, FLOPs or upload budgets"
            )
        return Plan(True, "", spec, None, 0)
    estimate = ctx.estimate(spec)
    flops = estimate.flops_per_round(ctx.steps)
    ok, reason = budget.fits(
        ctx.padded(estimate.peak_bytes), ctx.padded(flops), estimate.upload_bytes
    )
    return Plan(ok, reason, spec, estimate, flops)


def first_fit(specs: Sequence[TrainSpec], budget: Budget, ctx: CostContext) -> Plan:
    """The first spec (callers order them most-capable first) that fits; else the reason the
    last (least demanding) one does not."""
    plan = Plan(False, "no candidate")
    for spec in specs:
        plan = check(spec, budget, ctx)
        if plan.ok:
            return plan
    return plan


def exclusions(plans: Sequence[Plan]) -> dict[int, str]:
    """Client id -> reason, for every client that fits nothing; error if nobody fits."""
    out = {cid: p.reason for cid, p in enumerate(plans) if not p.ok}
    if len(out) == len(plans):
        reasons = sorted(set(out.values()))
        raise ValueError(f"no device of the population fits this method: {'; '.join(reasons[:3])}")
    return out
