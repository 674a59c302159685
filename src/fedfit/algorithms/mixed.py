"""Mixed-method federations: every device trains with the strongest method its budget allows.

``[method] name = "auto"`` with ``candidates = [...]`` (registered method names, strongest
first, each optionally with options of its own, ``"head frozen_dtype=bfloat16"``, and
``lr=...``, the candidate's client learning rate in place of ``train.lr``, so methods tuned
alone keep their rates in the mix). Before round 1 each device gets the first candidate whose
plan fits its budget (each candidate's own ``plan``, so its own cost model and options); a
device that fits none is excluded, with every candidate's reason. The default list ends with
the head trained over a bfloat16 backbone (models/precision.py), which is what fits the
smallest devices: on minilm-l6 a float32 head step needs 112 MB, the weights alone 91 MB, the
bfloat16 one 56 MB. Every method of the run trains a part of ONE global model, so their
updates fold into the same tensors:

- the adapter family (LoRA and the forward-gradient and zero-order methods on LoRA, plus
  ``head``): the model is wrapped once with LoRA (rank, alpha and targets from this section,
  the same for every candidate); a LoRA method trains the adapters and the head, ``head`` the
  head alone;
- the full-weight family (``fedavg``, ``layers``, ``bitfit``, ``head``): the plain model; each
  trains its own tensors of it (``layers`` the top blocks its plan allows, and the head).

The families do not mix (a LoRA adapter and a base weight it adapts cannot be averaged into
one tensor), and neither can methods whose upload is not tensors: seed-and-scalar methods
(FedKSeed, DeComFL, Spry per iteration) rebuild the model from scalars every device replays,
which a device on another method cannot; these are config errors that say why.

A round's aggregate is layer-wise: each tensor is the weighted mean over the clients that
trained it (fedfit/robust.py's ``combine``, so ``server.aggregation`` applies), weighted by
example count times the method's weight (``weights``, aligned with ``candidates``; default
1 each), then the server optimiser. A tensor no client of the round trained keeps its value.

Each candidate keeps its own options' defaults except the shared LoRA shape; its
``start_round`` is told only its own clients of the round (Spry splits its tensors among
them). Every device downloads all the global tensors (it runs the current model: a ``head``
device trains the head on the adapters the others trained) and uploads what its method
trains. Layer fine-tuning's frozen-prefix cache is off when another candidate trains the
blocks it would cache (``fedavg``, ``bitfit``).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from fedfit.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientData,
    ClientTask,
    ServerState,
    Update,
    apply_server_update,
)
from fedfit.algorithms.registry import ALGORITHMS, make_algorithm, register
from fedfit.costs.spec import TrainSpec
from fedfit.planning import CostContext, Plan

if TYPE_CHECKING:
    from fedfit.devices import Budget

# LoRA-wrapped methods (their ``peft`` option, when they have one, must be "lora").
ADAPTER = frozenset({"lora", "fedfgd", "spry", "fwdllm", "baffle", "fedmezo", "fedspzo"})
FULL = frozenset({"fedavg", "layers", "bitfit"})
EITHER = frozenset({"head"})  # trains the head, present in both families
NOT_TENSORS = {
    "fedkseed": "uploads seeds and scalars that every device replays",
    "fedkseed-pro": "uploads seeds and scalars that every device replays",
    "decomfl": "uploads seeds and scalars that every device replays",
    "fedsgd": "uploads a gradient, not weights, so its updates cannot be averaged with others",
    "hetlora": "trains a rank of its own per device, which other methods' adapters lack",
    "partial": "assigns blocks across a round's clients itself",
    "ia3": "trains IA3 vectors, which no other method shares",
}
LORA_SHAPE = ("r", "alpha", "target_modules")


@dataclass(frozen=True)
class MixedOptions:
    candidates: tuple[str, ...] = field(
        default=("lora", "spry", "fedmezo", "head", "head frozen_dtype=bfloat16"),
        metadata={
            "help": 'methods, strongest first: each device gets the first that fits ("<name> '
            '[option=value ...]")'
        },
    )
    weights: tuple[float, ...] = field(
        default=(),
        metadata={"help": "per-candidate weight of its updates (x examples); empty = 1 each"},
    )
    r: int = field(default=8, metadata={"help": "LoRA rank shared by the adapter methods"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha shared by them"})
    target_modules: tuple[str, ...] = field(
        default=(), metadata={"help": "LoRA targets shared by them; empty = query/value"}
    )

    def __post_init__(self) -> None:
        from fedfit.config import ConfigError

        if not self.candidates:
            raise ConfigError("method.candidates: name at least one method")
        labels = [label(c) for c in self.candidates]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"method.candidates: {list(self.candidates)} repeats a method")
        for text in self.candidates:
            name, values = parse_candidate(text)
            if name == "auto":
                raise ConfigError("method.candidates: 'auto' cannot be its own candidate")
            if name not in ALGORITHMS:
                raise ConfigError(
                    f"method.candidates: unknown method {name!r}; registered: "
                    + ", ".join(sorted(n for n in ALGORITHMS if n != "auto"))
                )
            if name in NOT_TENSORS:
                raise ConfigError(
                    f"method.candidates: {name} cannot be mixed with other methods: it "
                    f"{NOT_TENSORS[name]}"
                )
            shared = sorted(set(values) & set(LORA_SHAPE))
            if shared:
                raise ConfigError(
                    f"method.candidates: {text!r} sets {', '.join(shared)}, which every "
                    f"candidate shares: set method.{shared[0]} instead"
                )
            own_options(name, values, text)  # unknown options and bad values are named here
            candidate_lr(values, text)
        names = [base(c) for c in self.candidates]
        families = {
            "adapter (LoRA)" if n in ADAPTER else "full-weight" for n in names if n not in EITHER
        }
        if len(families) > 1:
            adapters = [n for n in names if n in ADAPTER]
            full = [n for n in names if n in FULL]
            raise ConfigError(
                f"method.candidates: {', '.join(adapters)} train LoRA adapters and "
                f"{', '.join(full)} the model's own weights; a mixed run trains one set of "
                "tensors, so candidates come from one family (head fits either)"
            )
        if self.weights and len(self.weights) != len(self.candidates):
            raise ConfigError(
                f"method.weights: {len(self.weights)} weights for {len(self.candidates)} "
                "candidates (one each, or none)"
            )
        if any(not w > 0 for w in self.weights):
            raise ConfigError("method.weights: every weight must be > 0")
        if self.r < 1:
            raise ConfigError("method.r: must be >= 1")
        if self.alpha <= 0:
            raise ConfigError("method.alpha: must be > 0")


def parse_candidate(text: str) -> tuple[str, dict[str, str]]:
    """``"<name> [option=value ...]"`` -> (name, {option: value text})."""
    from fedfit.config import ConfigError

    name, *pairs = text.split() or [""]
    values: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise ConfigError(
                f"method.candidates: {text!r}: {pair!r} is not option=value "
                '(a candidate is "<name> [option=value ...]")'
            )
        values[key] = value
    return name, values


def base(text: str) -> str:
    """The registered method a candidate runs."""
    return parse_candidate(text)[0]


def label(text: str) -> str:
    """A candidate as its clients' rows name it: its words, single-spaced."""
    return " ".join(text.split())


def own_options(name: str, values: dict[str, str], text: str) -> dict[str, Any]:
    """A candidate's own option values (all but ``lr``), typed and checked as ``--set``
    checks them."""
    from fedfit.config import SetValue, build_dataclass, parse_value

    options = ALGORITHMS[name].options
    mine = {k: SetValue(v, parse_value(v)) for k, v in values.items() if k != "lr"}
    typed = build_dataclass(options, mine, f"method.candidates[{text!r}]")
    return {k: getattr(typed, k) for k in mine}


def candidate_lr(values: dict[str, str], text: str) -> float | None:
    """``lr=<value>``: the candidate's own client learning rate (``train.lr`` otherwise),
    read as ``--set`` reads a value."""
    from fedfit.config import parse_value
    from fedfit.errors import check

    if "lr" not in values:
        return None
    lr = parse_value(values["lr"])
    number = isinstance(lr, int | float) and not isinstance(lr, bool)
    check(
        number and 0 < lr < float("inf"), f"method.candidates[{text!r}]", "lr must be a number > 0"
    )
    return float(lr)


def candidate_options(text: str, opts: MixedOptions) -> Any:
    """The candidate's default options with the run's shared LoRA shape (and plain LoRA where
    the method lets its ``peft`` option choose), then the candidate's own option values."""
    name, values = parse_candidate(text)
    options = ALGORITHMS[name].options()
    fields = {f.name for f in dataclasses.fields(options)}
    shared = {k: getattr(opts, k) for k in LORA_SHAPE if k in fields}
    if "peft" in fields:
        shared["peft"] = "lora"
    if "dropout" in fields and name == "lora":
        shared["dropout"] = 0.0  # one LoRA for every method: the probe methods need none
    if "communication" in fields:
        shared["communication"] = "epoch"  # Spry's weights, not its per-iteration scalars
    if "prefix_cache" in fields and {"fedavg", "bitfit"} & {base(c) for c in opts.candidates}:
        shared["prefix_cache"] = False  # another method trains the blocks it would cache
    return dataclasses.replace(options, **shared, **own_options(name, values, text))


class Mixed(Algorithm):
    """``method.name = "auto"``: see the module docstring."""

    name = "auto"

    def __init__(self, options: MixedOptions, config: Any) -> None:
        super().__init__(options, config)
        self.opts = options
        self.methods: dict[str, Algorithm] = {}  # by label: "head frozen_dtype=bfloat16"
        self.train_of: dict[str, Any] = {}  # by label: its train config (its own lr)
        for text in options.candidates:
            lr = candidate_lr(parse_candidate(text)[1], text)
            sub_config = dataclasses.replace(
                config,
                method=dataclasses.replace(
                    config.method, name=base(text), options=candidate_options(text, options)
                ),
                train=config.train if lr is None else dataclasses.replace(config.train, lr=lr),
            )
            self.methods[label(text)] = make_algorithm(sub_config)
            self.train_of[label(text)] = sub_config.train
        self.strongest = label(options.candidates[0])
        kinds = {m.payload_kind for m in self.methods.values()}
        if kinds - {"weights", "subset"}:
            raise ValueError(f"auto: candidates upload {sorted(kinds)}; only tensors can mix")
        self.payload_kind = "subset" if "subset" in kinds else "weights"
        weights = options.weights or (1.0,) * len(options.candidates)
        self.weight = dict(zip(self.methods, weights, strict=True))
        self.trains: dict[str, list[str]] = {}  # method -> the tensor names it trains
        self.method_of: dict[int, str] = {}  # client -> its method (from its plan)

    # ---------------------------------------------------------------- one model for all

    def prepare(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        """Wrap once (the first adapter candidate's LoRA, or the first candidate's own
        preparation), then let every other candidate prepare a copy of the unwrapped model
        (its own bookkeeping: Spry's groups, layer fine-tuning's blocks); record which of the
        shared model's tensors each one trains."""
        names = list(self.methods)
        first = next((n for n in names if base(n) in ADAPTER), names[0])
        raw = copy.deepcopy(model)
        shared = self.methods[first].prepare(model, task)  # first: its random draws as alone
        self.trains[first] = [n for n, p in shared.named_parameters() if p.requires_grad]
        for name in names:
            if name != first:
                prepared = self.methods[name].prepare(copy.deepcopy(raw), task)
                self.trains[name] = self._trained_in(shared, prepared, name, task)
        del raw
        everything = {n for group in self.trains.values() for n in group}
        for n, p in shared.named_parameters():
            p.requires_grad_(n in everything)
        self.task = task
        return shared

    def _trained_in(
        self, shared: torch.nn.Module, prepared: torch.nn.Module, name: str, task: str
    ) -> list[str]:
        """The shared model's names of what ``prepared`` (a candidate's own preparation of
        a copy) trains: the same names, or, in a LoRA-wrapped shared model, the head."""
        from fedfit.models.structure import task_head

        own = [n for n, p in prepared.named_parameters() if p.requires_grad]
        params = dict(shared.named_parameters())
        if all(n in params for n in own):
            return own
        if base(name) == "head":  # the LoRA-wrapped head (peft keeps the trained copy)
            heads = task_head(shared, task)
            ids = {id(p) for m in heads for p in m.parameters() if p.requires_grad}
            found = [n for n, p in params.items() if id(p) in ids and p.requires_grad]
            if found:
                return found
        raise ValueError(f"auto: cannot find {name}'s tensors in the shared model")

    # ---------------------------------------------------------------- planning

    def spec(self, ctx: CostContext) -> TrainSpec:
        return self.methods[self.strongest].spec(ctx)

    def plan(self, budget: Budget, ctx: CostContext) -> Plan:
        """The first candidate that fits, with why each stronger one did not."""
        passed: list[str] = []
        plan = Plan(False, "no candidate")
        for name, method in self.methods.items():
            plan = method.plan(budget, ctx)
            if plan.ok:
                return dataclasses.replace(plan, method=name, passed=tuple(passed))
            passed.append(f"{name}: {plan.reason}")
        return dataclasses.replace(plan, reason="; ".join(passed), passed=tuple(passed))

    def plan_done(self, model: torch.nn.Module, plans: Sequence[Plan]) -> None:
        for name, method in self.methods.items():
            mine = [p if p.method == name else dataclasses.replace(p, ok=False) for p in plans]
            method.plan_done(model, mine)
        self.method_of = {cid: p.method for cid, p in enumerate(plans) if p.ok}

    # ---------------------------------------------------------------- a round

    def method_for(self, client_id: int) -> str:
        """The client's planned method; unplanned (no budgets given), the strongest."""
        return self.method_of.get(client_id, self.strongest)

    def start_round(self, state: ServerState, clients: Sequence[int]) -> None:
        for name, method in self.methods.items():
            mine = [c for c in clients if self.method_for(c) == name]
            if mine:
                method.start_round(state, mine)

    def configure(
        self, state: ServerState, client_id: int, seed: int, plan: Plan | None = None
    ) -> ClientTask:
        name = plan.method if plan is not None and plan.method else self.method_for(client_id)
        task = self.methods[name].configure(state, client_id, seed, plan)
        task.config["method"] = name
        return task

    def client_update(
        self, model: torch.nn.Module, task: ClientTask, shard: ClientData, ctx: ClientContext
    ) -> Update:
        """The client's own method, on the shared model with only its tensors trainable."""
        name = task.config["method"]
        mine = set(self.trains[name])
        params = list(model.named_parameters())
        was = {n: p.requires_grad for n, p in params}
        try:
            for n, p in params:
                p.requires_grad_(n in mine)
            mine_ctx = dataclasses.replace(ctx, train=self.train_of[name])
            update = self.methods[name].client_update(model, task, shard, mine_ctx)
        finally:
            for n, p in params:
                p.requires_grad_(was[n])
        return update

    def aggregate(self, state: ServerState, updates: Sequence[Update]) -> ServerState:
        """Layer-wise: each tensor's weighted mean over the clients that trained it."""
        weights = [u.num_examples * self.weight[self.method_for(u.client_id)] for u in updates]
        mean = self.combine(state, [u.payload for u in updates], weights)
        return apply_server_update(state, mean, self.config.server)


register(
    "auto",
    MixedOptions,
    "Mixed federation: each device trains with the first of method.candidates that fits",
)(Mixed)
