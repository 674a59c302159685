"""What a client trains (:class:`TrainSpec`), applied to a real model and measured for one step.

:func:`apply_spec` marks the trainable tensors (or wraps the model with peft LoRA) exactly as the
algorithms do; :func:`measure` then runs ONE real step through :func:`measure_step`. This is the
"truth" that :func:`fedfit.costs.predict.predict` is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedfit.costs.measure import StepMemory, measure_step
from fedfit.models.precision import FROZEN_DTYPES, frozen_in

KINDS = ("full", "lora", "layers", "slt", "head", "bitfit", "ia3")
STEPS = ("backprop", "jvp", "fd", "zo", "spzo")
UPLOADS = ("weights", "jvp", "kseed", "decomfl", "spzo")
OPTIMIZERS = ("adamw", "sgd", "sgd-momentum", "adafactor")
# peft's usual targets per family (the attention query and value projections).
LORA_TARGETS = {"bert": ("query", "value"), "llama": ("q_proj", "v_proj")}


@dataclass(frozen=True)
class TrainSpec:
    """What a client trains.

    - ``kind="full"``: every parameter.
    - ``kind="lora"``: LoRA adapters of rank ``lora_rank`` (alpha = 2 * rank, no LoRA dropout)
      on ``lora_targets`` (empty: the family default, query/value or q_proj/v_proj), plus the
      task head for classification (peft's SEQ_CLS ``modules_to_save``).
    - ``kind="layers"``: the top ``trained_layers`` transformer blocks plus what sits above
      them (BERT: pooler and classifier; Llama: final norm and score, or final norm for LM),
      everything below frozen, embeddings included.
    - ``kind="slt"``: as "layers", with every trained block above the lowest one narrowed to
      ``width`` (successive layer training's scaled-down part, models/narrow.py: the first
      share of attention heads and feed-forward units); width 1 is "layers".
    - ``kind="head"``: the task head only (classifier / score); classification only.
    - ``kind="bitfit"``: every bias plus the classification head (BERT).
    - ``kind="ia3"``: peft's IA3 vectors on ``lora_targets`` (empty: peft's default for the
      family; feed-forward ones rescale their input), plus the classification head.

    How the gradient is had (``step``): ``"backprop"``; ``"jvp"`` (forward gradients with
    ``probes`` tangents, forward/core.py); ``"fd"`` (central finite differences with
    ``probes`` perturbations, Baffle); ``"zo"`` (MeZO steps with ``probes`` perturbations,
    seeded in place, zeroorder/core.py); ``"spzo"`` (FedSPZO: ``probes`` = P1 block-1 and
    ``probes2`` = P2 block-2 perturbations, block 2 from block ``split``). Every step but
    backprop runs the model in eval mode. ``share = (position, clients)``: Spry's split, the
    client at ``position`` of a round's ``clients`` trains only its groups (plus the head
    with ``share_head``). ``upload``: what is sent, "weights" (the trained tensors) or the
    scalars of "jvp" (Spry per iteration), "kseed", "decomfl", "spzo". ``replay_pairs``:
    (seed, scalar) pairs the device replays on its trained tensors in a round.

    ``optimizer``: ``"adamw"`` (two moments per trainable tensor and a step counter),
    ``"sgd"`` (no momentum: no state), ``"sgd-momentum"`` (one buffer per tensor) or
    ``"adafactor"`` (transformers' Adafactor without first moment: a row and a column vector
    per matrix, the full second moment of vectors, one RMS scalar per tensor).

    ``frozen_dtype``: the precision the device holds its frozen weights in ("float32", or
    "bfloat16", models/precision.py); the trained tensors stay float32. Modelled for
    backprop steps of the head alone (every activation is then a frozen layer's) and of the
    top blocks (CoCoFL: the frozen prefix below them).
    """

    kind: str
    trained_layers: int = 0
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ()
    optimizer: str = "adamw"
    step: str = "backprop"
    probes: int = 1
    probes2: int = 0
    split: int = 0
    share: tuple[int, int] = (0, 1)
    share_head: bool = True
    upload: str = "weights"
    replay_pairs: int = 0
    frozen_dtype: str = "float32"
    width: float = 1.0

    def __post_init__(self) -> None:
        if self.step not in STEPS:
            raise ValueError(f"TrainSpec.step: {self.step!r} is not one of {', '.join(STEPS)}")
        if self.upload not in UPLOADS:
            raise ValueError(f"TrainSpec.upload: {self.upload!r} not in {UPLOADS}")
        if self.probes < 1 or (self.step == "spzo" and self.probes2 < 1):
            raise ValueError("TrainSpec.probes (and probes2 for spzo): must be >= 1")
        if not 0 <= self.share[0] < self.share[1]:
            raise ValueError(f"TrainSpec.share: position {self.share[0]} of {self.share[1]}")
        if self.replay_pairs < 0 or self.split < 0:
            raise ValueError("TrainSpec.replay_pairs and split: must be >= 0")
        if self.kind not in KINDS:
            raise ValueError(f"TrainSpec.kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainSpec.optimizer: {self.optimizer!r} not in {OPTIMIZERS}")
        if self.kind in ("layers", "slt") and self.trained_layers < 1:
            raise ValueError(f"TrainSpec.trained_layers: {self.kind} needs >= 1 trained block")
        if not 0 < self.width <= 1 or (self.width != 1 and self.kind != "slt"):
            raise ValueError(f"TrainSpec.width: {self.width} (a width in (0, 1], for slt)")
        if self.kind == "lora" and self.lora_rank < 1:
            raise ValueError("TrainSpec.lora_rank: must be >= 1")
        if self.frozen_dtype not in FROZEN_DTYPES:
            raise ValueError(
                f"TrainSpec.frozen_dtype: {self.frozen_dtype!r} not in {tuple(FROZEN_DTYPES)}"
            )
        if self.frozen_dtype != "float32" and (
            self.kind not in ("head", "layers") or self.step != "backprop"
        ):
            raise ValueError(
                "TrainSpec.frozen_dtype: lower-precision frozen weights are modelled for "
                "kind='head' or 'layers' with backprop only"
            )

    def targets(self, family: str) -> tuple[str, ...]:
        """The LoRA target module names for a model family ("bert" | "llama")."""
        if self.lora_targets:
            return self.lora_targets
        if family not in LORA_TARGETS:
            raise ValueError(f"no default LoRA targets for {family!r}; set lora_targets")
        return LORA_TARGETS[family]


def apply_spec(model: torch.nn.Module, spec: TrainSpec, task: str) -> torch.nn.Module:
    """Mark what ``spec`` trains on ``model``; returns the model (peft-wrapped for LoRA).

    Layer fine-tuning trains BERT's pooler with the classifier: the classifier reads the
    pooler's output, and the pooler is the part of the pretrained model closest to the task.
    """
    from fedfit.models.structure import head_modules, task_head, transformer_layers

    if spec.kind == "full":
        model.requires_grad_(True)
        return model
    if spec.kind == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        config = LoraConfig(
            task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
            r=spec.lora_rank,
            lora_alpha=2 * spec.lora_rank,
            target_modules=list(spec.targets(str(model.config.model_type))),  # type: ignore[union-attr]
        )
        return get_peft_model(model, config)  # type: ignore[arg-type]
    if spec.kind == "ia3":
        from peft import IA3Config, TaskType, get_peft_model

        ia3 = IA3Config(
            task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
            target_modules=list(spec.lora_targets) or None,
        )
        return get_peft_model(model, ia3)  # type: ignore[arg-type]
    model.requires_grad_(False)
    if spec.kind == "bitfit":
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(".bias"))
        for module in task_head(model, "classification"):  # the classifier, if any
            module.requires_grad_(True)
        return model
    if spec.kind == "head":
        heads = task_head(model, task) if task == "classification" else []
        if not heads:
            raise ValueError("TrainSpec(kind='head') needs a classification head")
        for module in heads:
            module.requires_grad_(True)
        return model
    blocks = transformer_layers(model)
    if spec.trained_layers > len(blocks):
        raise ValueError(f"trained_layers={spec.trained_layers} > the {len(blocks)} blocks")
    if spec.kind == "slt":  # the blocks above the lowest trained one, narrowed for good
        from fedfit.models.narrow import narrow_

        narrow_(model, range(len(blocks) - spec.trained_layers + 1, len(blocks)), spec.width)
    for block in blocks[len(blocks) - spec.trained_layers :]:
        block.requires_grad_(True)
    for module in head_modules(model, task):
        module.requires_grad_(True)
    return model


def make_optimizer(model: torch.nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    """The client optimiser of ``spec`` over the model's trainable parameters (torch defaults)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=1e-3)
    if spec.optimizer == "sgd-momentum":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    if spec.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=1e-4, relative_step=False, scale_parameter=False)
    return torch.optim.AdamW(params, lr=1e-4)


def measure(
    model: torch.nn.Module, spec: TrainSpec, batch: dict[str, torch.Tensor], task: str | None = None
) -> tuple[StepMemory, int]:
    """Apply ``spec`` to ``model``, then run ONE real training step (train mode) under
    :func:`measure_step`; returns (memory, FLOPs).

    The measured step is a steady-state one: a first, unmeasured step creates the optimiser
    state, which then stays resident through every later forward and backward pass (the
    peak a device meets for all but its first step of a round).

    ``task`` defaults to "lm" for a ``*ForCausalLM`` and "classification" otherwise. The model
    is modified in place (requires_grad flags, one optimiser step; LoRA wraps it).
    """
    if task is None:
        task = "lm" if type(model).__name__.endswith("ForCausalLM") else "classification"
    model = apply_spec(model, spec, task)
    model.train()
    optimizer = make_optimizer(model, spec)
    with frozen_in(model, spec.frozen_dtype):
        measure_step(model, optimizer, batch)  # creates the optimiser state
        _, memory, flops = measure_step(model, optimizer, batch)
    return memory, flops
