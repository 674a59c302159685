"""Parameter-efficient baselines: LoRA and IA3 through peft, BitFit and head-only by hand.

All four are FedAvg over the trainable tensors only (base.Algorithm's defaults): the frozen
backbone never crosses the network, so upload and download are the adapters plus the task head.

- lora  (Hu et al. 2022): low-rank A, B on the target projections; peft's LoraConfig.
- ia3   (Liu et al. 2022): learned rescaling vectors; peft's IA3Config with peft's default
        target modules for the architecture unless given.
- bitfit (Ben Zaken et al. 2022): every bias (attention, MLP, LayerNorm) plus the head;
        peft has no BitFit, so it is requires_grad on parameters named ``*.bias``.
- head: the task head alone (classifier / score; for causal LM the output projection, which
        SmolLM2 ties to the input embeddings, so that matrix is trained).

For classification the randomly initialised head is always trained (peft's SEQ_CLS task type
adds it to ``modules_to_save``); for causal LM nothing but the adapters is trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from peft import IA3Config, LoraConfig, TaskType, get_peft_model

from fedfit.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientData,
    ClientTask,
    Update,
    load_tensors_,
    local_train,
    trainable_tensors,
)
from fedfit.algorithms.registry import register
from fedfit.costs.spec import TrainSpec
from fedfit.errors import check_choice
from fedfit.models.precision import FROZEN_DTYPES, frozen_in
from fedfit.models.structure import task_head
from fedfit.planning import CostContext

_LORA_TARGETS = {"bert": ("query", "value"), "llama": ("q_proj", "v_proj")}


def _task_type(task: str) -> TaskType:
    return TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM


@dataclass(frozen=True)
class LoraOptions:
    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (alpha / r)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    target_modules: tuple[str, ...] = field(
        default=(),
        metadata={"help": "module names to adapt; empty = query/value (q_proj/v_proj)"},
    )

    def __post_init__(self) -> None:
        from fedfit.config import ConfigError

        if self.r < 1:
            raise ConfigError("method.r: must be >= 1")
        if self.alpha <= 0:
            raise ConfigError("method.alpha: must be > 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError("method.dropout: must be in [0, 1)")


class LoRA(Algorithm):
    name = "lora"

    def spec(self, ctx: CostContext) -> TrainSpec:
        opts: LoraOptions = self.options  # type: ignore[assignment]
        return TrainSpec(
            "lora", lora_rank=opts.r, lora_targets=opts.target_modules, optimizer=ctx.optimizer
        )

    def prepare(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        opts: LoraOptions = self.options  # type: ignore[assignment]
        family = str(model.config.model_type)  # type: ignore[union-attr]
        targets = opts.target_modules or _LORA_TARGETS.get(family)
        if not targets:
            raise ValueError(f"lora: no default target modules for {family!r}; set target_modules")
        config = LoraConfig(
            task_type=_task_type(task),
            r=opts.r,
            lora_alpha=opts.alpha,  # type: ignore[arg-type]  # peft accepts floats
            lora_dropout=opts.dropout,
            target_modules=list(targets),
        )
        return get_peft_model(model, config)


@dataclass(frozen=True)
class IA3Options:
    target_modules: tuple[str, ...] = field(
        default=(), metadata={"help": "modules to rescale; empty = peft's default for the model"}
    )
    feedforward_modules: tuple[str, ...] = field(
        default=(), metadata={"help": "of those, the ones rescaled on their input"}
    )


class IA3(Algorithm):
    name = "ia3"

    def spec(self, ctx: CostContext) -> TrainSpec:
        opts: IA3Options = self.options  # type: ignore[assignment]
        return TrainSpec("ia3", lora_targets=opts.target_modules, optimizer=ctx.optimizer)

    def prepare(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        opts: IA3Options = self.options  # type: ignore[assignment]
        config = IA3Config(
            task_type=_task_type(task),
            target_modules=list(opts.target_modules) or None,
            feedforward_modules=list(opts.feedforward_modules) or None,
        )
        return get_peft_model(model, config)


@dataclass(frozen=True)
class NoOptions:
    """This method has no options."""


class BitFit(Algorithm):
    name = "bitfit"

    def spec(self, ctx: CostContext) -> TrainSpec:
        return TrainSpec("bitfit", optimizer=ctx.optimizer)

    def prepare(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        model.requires_grad_(False)
        biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
        if not biases:
            raise ValueError(
                f"bitfit: {type(model).__name__} has no bias parameters to train "
                "(Llama-family models have none); choose lora, ia3 or head"
            )
        for p in biases:
            p.requires_grad_(True)
        for module in task_head(model, task):
            module.requires_grad_(True)
        return model


@dataclass(frozen=True)
class HeadOptions:
    frozen_dtype: str = field(
        default="float32",
        metadata={
            "help": 'precision of the frozen backbone on the device: "float32" or "bfloat16" '
            "(half the memory; BERT-family models)"
        },
    )

    def __post_init__(self) -> None:
        check_choice(self.frozen_dtype, "method.frozen_dtype", FROZEN_DTYPES)


class Head(Algorithm):
    """The task head alone; with ``frozen_dtype = "bfloat16"`` the device holds everything
    else in bfloat16 while it trains (models/precision.py): half the weights' and the
    activations' memory, the head, its gradient and optimiser state in float32."""

    name = "head"
    tasks = ("classification",)  # a causal LM has no separate head (tied to the embeddings)

    def spec(self, ctx: CostContext) -> TrainSpec:
        opts: HeadOptions = self.options  # type: ignore[assignment]
        return TrainSpec("head", optimizer=ctx.optimizer, frozen_dtype=opts.frozen_dtype)

    def client_update(
        self, model: torch.nn.Module, task: ClientTask, shard: ClientData, ctx: ClientContext
    ) -> Update:
        """The base update: the download loaded first (in float32), then local training
        with the frozen tensors held in ``frozen_dtype``; the head is uploaded."""
        opts: HeadOptions = self.options  # type: ignore[assignment]
        load_tensors_(model, task.download)
        with frozen_in(model, opts.frozen_dtype):
            metrics = local_train(model, shard, ctx, task.seed)
            payload = trainable_tensors(model)
        return Update(task.client_id, payload, len(shard), metrics)

    def prepare(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        model.requires_grad_(False)
        heads = task_head(model, task)
        if not heads:
            raise ValueError(f"head: cannot find the task head of {type(model).__name__}")
        for module in heads:
            module.requires_grad_(True)
        return model


def prepare_peft(
    kind: str,
    model: torch.nn.Module,
    task: str,
    config: Any,
    r: int = 8,
    alpha: float = 16.0,
    target_modules: tuple[str, ...] = (),
) -> torch.nn.Module:
    """Mark what ``kind`` trains (full | lora | ia3 | bitfit | head), as that method's own
    ``prepare`` does, for methods whose ``peft`` option picks the tensors (forward-mode and
    zero-order methods). LoRA without dropout: one deterministic function to probe."""
    if kind == "full":
        return Algorithm(None, config).prepare(model, task)
    if kind == "lora":
        return LoRA(LoraOptions(r, alpha, 0.0, target_modules), config).prepare(model, task)
    if kind == "ia3":
        return IA3(IA3Options(target_modules), config).prepare(model, task)
    if kind in ("bitfit", "head"):
        if kind == "bitfit":
            return BitFit(NoOptions(), config).prepare(model, task)
        return Head(HeadOptions(), config).prepare(model, task)
    raise ValueError(f"unknown peft kind {kind!r}: full, lora, ia3, bitfit or head")


register("lora", LoraOptions, "LoRA adapters (peft) + task head; only those are sent")(LoRA)
register("ia3", IA3Options, "IA3 rescaling vectors (peft) + task head")(IA3)
register("bitfit", NoOptions, "BitFit: all bias terms + task head")(BitFit)
register("head", HeadOptions, "Only the task head is trained and sent")(Head)
