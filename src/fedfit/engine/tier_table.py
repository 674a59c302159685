"""``fedfit plan``: before training, what each device tier would train under each method,
and which zoo model layer fine-tuning should use for this population.

For the configured method and the budget baselines (layer fine-tuning, LoRA, full
fine-tuning), and for every group of devices sharing a budget: what the method trains there,
its predicted peak memory, FLOPs per round and upload against the budget (prediction with the
safety margin, as the engine fits them), and how many devices are excluded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fedfit.algorithms import make_algorithm
from fedfit.config import Config, from_dict, to_dict
from fedfit.data import TextDataset, load_configured
from fedfit.devices import Budget, build_population
from fedfit.engine.setup import cost_context_for, partition_clients
from fedfit.log import log
from fedfit.models import load_model, transformer_layers
from fedfit.planning import CostContext, Plan

BASELINES = ("layers", "lora", "fedavg")
ZOO_CHOICES = ("minilm-l3", "minilm-l6")  # the classification zoo Pfeiffer et al. choose from


@dataclass(frozen=True)
class PlanRow:
    tier: str
    num_devices: int
    budget: Budget
    method: str
    plan: Plan
    ctx: CostContext

    @property
    def memory(self) -> int | None:
        return self.ctx.padded(self.plan.estimate.peak_bytes) if self.plan.estimate else None

    @property
    def flops(self) -> int | None:
        return self.ctx.padded(self.plan.flops_per_round) if self.plan.estimate else None

    @property
    def upload(self) -> int | None:
        return self.plan.estimate.upload_bytes if self.plan.estimate else None


def plan_rows(config: Config, methods: tuple[str, ...] = ()) -> list[PlanRow]:
    """One row per (device group, method), the configured method first."""
    methods = tuple(dict.fromkeys((config.method.name, *(methods or BASELINES))))
    dataset, num_labels, largest = _data(config)
    rows = []
    for name in methods:
        cfg = config if name == config.method.name else _with_method(config, name)
        model, _ = load_model(cfg.model.name, dataset.task, num_labels=num_labels)
        ctx = cost_context_for(cfg, model.config, dataset.task, num_labels, largest)
        algorithm = make_algorithm(cfg)
        algorithm.prepare(model, dataset.task)
        population = build_population(
            cfg.devices, cfg.data.num_clients, ctx.reference(), cfg.run.seed
        )
        for group in population.groups():
            plan = algorithm.plan(group.budget, ctx)
            rows.append(PlanRow(group.name, len(group.client_ids), group.budget, name, plan, ctx))
    return rows


def _data(config: Config) -> tuple[TextDataset, int, int]:
    """The dataset, its number of labels, and the most examples one client holds."""
    dataset = load_configured(config.data, config.run.seed)
    parts = partition_clients(config, dataset)
    return dataset, max(2, len(dataset.label_names)), max(len(p) for p in parts)


@dataclass(frozen=True)
class ModelChoice:
    """How one zoo model serves the population under layer fine-tuning."""

    model: str
    num_blocks: int
    mean_depth: float  # trained blocks averaged over all devices (excluded ones count 0)
    excluded: int
    depth_by_tier: dict[str, int]


def choose_model(
    config: Config, candidates: tuple[str, ...] = ZOO_CHOICES
) -> tuple[str, list[ModelChoice], str]:
    """Pfeiffer et al.'s model choice: the zoo model that maximises the average number of
    trained blocks over the device population with every device fitting.

    Budgets written as fractions ("1/4x") are resolved once, against full fine-tuning of the
    configured ``model.name``, so that every candidate faces the same absolute budgets.
    Returns (picked model, one row per candidate, why).
    """
    dataset, num_labels, largest = _data(config)
    base, _ = load_model(config.model.name, dataset.task, num_labels=num_labels)
    base_ctx = cost_context_for(config, base.config, dataset.task, num_labels, largest)
    population = build_population(
        config.devices, config.data.num_clients, base_ctx.reference(), config.run.seed
    )
    groups = population.groups()
    choices = []
    for name in candidates:
        cfg = _with_method(config, "layers", model=name)
        model, _ = load_model(name, dataset.task, num_labels=num_labels)
        ctx = cost_context_for(cfg, model.config, dataset.task, num_labels, largest)
        algorithm = make_algorithm(cfg)
        algorithm.prepare(model, dataset.task)
        plans = {g.name: algorithm.plan(g.budget, ctx) for g in groups}
        sizes = {g.name: len(g.client_ids) for g in groups}
        total = sum(sizes.values())
        choices.append(
            ModelChoice(
                model=name,
                num_blocks=len(transformer_layers(model)),
                mean_depth=sum(p.depth * sizes[t] for t, p in plans.items() if p.ok) / total,
                excluded=sum(sizes[t] for t, p in plans.items() if not p.ok),
                depth_by_tier={t: p.depth if p.ok else 0 for t, p in plans.items()},
            )
        )
    fitting = [c for c in choices if c.excluded == 0]
    if fitting:
        best = max(fitting, key=lambda c: c.mean_depth)
        why = (
            f"{best.model}: every device fits and it trains {best.mean_depth:.2f} blocks per "
            f"device on average, the most of the {len(fitting)} model(s) where all devices fit"
        )
    else:
        best = max(choices, key=lambda c: (-c.excluded, c.mean_depth))
        why = (
            f"{best.model}: no model fits every device; it excludes the fewest "
            f"({best.excluded}) and trains {best.mean_depth:.2f} blocks per device on average"
        )
    return best.model, choices, why


AUTO = "auto"


def choice_reference(config: Config) -> Config:
    """``config`` for ``choose_model`` under ``model.name = "auto"``: budget fractions resolve
    against full fine-tuning of the largest zoo choice (the last of ZOO_CHOICES)."""
    return dataclasses.replace(
        config, model=dataclasses.replace(config.model, name=ZOO_CHOICES[-1])
    )


def resolve_model(config: Config) -> Config:
    """``model.name = "auto"``: the zoo model ``choose_model`` picks for this population
    (budgets written as fractions resolve against full fine-tuning of the largest choice,
    the last of ZOO_CHOICES), with why in ``model.picked``; any other name as it is."""
    if config.model.name != AUTO:
        return config
    picked, _, why = choose_model(choice_reference(config))
    log(f"model.name = auto: {why}")
    return dataclasses.replace(
        config, model=dataclasses.replace(config.model, name=picked, picked=f"auto: {why}")
    )


def _with_method(config: Config, name: str, model: str | None = None) -> Config:
    """The same run with another method at its default options."""
    raw = to_dict(config)
    raw["method"] = {"name": name}
    if model is not None:
        raw["model"]["name"] = model
    return from_dict(raw)
