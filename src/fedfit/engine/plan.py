"""``fedfit plan``: before training, what each device tier would train under each method.

For the configured method and the budget baselines (layer fine-tuning, LoRA, full
fine-tuning), and for every group of devices sharing a budget: what the method trains there,
its predicted peak memory, FLOPs per round and upload against the budget (prediction with the
safety margin, as the engine fits them), and how many devices are excluded.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedfit.algorithms import make_algorithm
from fedfit.config import Config, from_dict, to_dict
from fedfit.data import load_dataset, partition
from fedfit.devices import Budget, build_population
from fedfit.engine.setup import cost_context_for
from fedfit.models import load_model
from fedfit.planning import CostContext, Plan

BASELINES = ("layers", "lora", "fedavg")


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
    dataset = load_dataset(config.data.name)
    num_labels = max(2, len(dataset.label_names))
    sizes = [
        len(p)
        for p in partition(
            None if dataset.task == "lm" else dataset.train_labels,
            dataset.train_groups,
            config.data.num_clients,
            config.data.partition,
            alpha=config.data.alpha,
            min_examples=config.data.min_examples,
            seed=config.run.seed,
        )
    ]
    rows = []
    for name in methods:
        cfg = config if name == config.method.name else _with_method(config, name)
        model, _ = load_model(cfg.model.name, dataset.task, num_labels=num_labels)
        ctx = cost_context_for(cfg, model.config, dataset.task, num_labels, max(sizes))
        algorithm = make_algorithm(cfg)
        algorithm.prepare(model, dataset.task)
        population = build_population(
            cfg.devices, cfg.data.num_clients, ctx.reference(), cfg.run.seed
        )
        for group in population.groups():
            plan = algorithm.plan(group.budget, ctx)
            rows.append(PlanRow(group.name, len(group.client_ids), group.budget, name, plan, ctx))
    return rows


def _with_method(config: Config, name: str) -> Config:
    """The same run with another method at its default options."""
    raw = to_dict(config)
    raw["method"] = {"name": name}
    return from_dict(raw)
