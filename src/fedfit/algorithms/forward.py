"""Gradients without backprop: forward gradients (Spry, FedFGD, FwdLLM) and finite
differences (Baffle).

Forward gradient (Baydin et al. 2022). For a loss f(w) and a tangent v ~ N(0, I),
``torch.func.jvp`` runs ONE forward pass on dual numbers and returns (f(w), grad f . v);
``(grad f . v) v`` is an unbiased estimate of grad f, since E[v v^T] = I. Averaging K tangents
divides its variance by K. No graph is built and no activation is kept for a backward pass:
only the current layer's primal and tangent values are live, which is where the memory
saving over backprop comes from. The jvp runs over ``functional_call`` on the trained tensors
only, so tangents (and their cost) cover exactly those.

All four methods keep the backbone frozen and train PEFT tensors (``peft``: lora, bitfit, ia3
or head), and run the model in eval mode: dropout off, so that the function a tangent (or a
+/- perturbation pair) probes is one deterministic function of the weights; dropout's noise
would only add variance to estimates that already have plenty.

- ``fedfgd``: FedAvg whose local steps use the forward gradient on every trainable tensor.
- ``spry`` (Panchal et al., NeurIPS 2024): the round's trainable tensors are split among its
  clients (:func:`assign_groups`); each client trains only its share (plus the head when
  ``share_head``), with forward gradients and the client optimiser; the server averages each
  tensor over the clients that trained it and applies the server optimiser, FedYogi in the
  paper (``[server] optimizer = "fedyogi"``, ``lr = 0.01``; examples/spry.toml).
  ``communication = "iteration"``: each round is ONE minibatch per client, and the client
  uploads only its K jvp values (scalars); the server regenerates the client's tangents from
  the client's seed, rebuilds ``mean_k jvp_k v_k`` and steps with ``-train.lr`` times that
  through the server optimiser. This is our reading of the paper's per-iteration variant.
- ``fwdllm`` (Xu et al. 2023): forward gradients with K tangents (default 20) chosen by
  FwdLLM's discriminative sampling: ``candidates`` random tangents are scored by |cosine|
  with the previous round's global update (sent with the download, and counted in it), and
  the K best are used; in round 1 there is no previous update, so the first K are used.
  Implemented with exact jvp, so FwdLLM's perturbation scale (1e-2, for its numerical
  directional derivatives) has no role. Its variance-controlled pacing (more tangents when
  the clients' estimates disagree) is NOT implemented: K is fixed.
- ``baffle`` (Feng et al. 2023): central finite differences with K perturbations,
  ``g = mean_k (f(w + s v_k) - f(w - s v_k)) / (2 s) v_k`` with s = ``sigma`` (1e-4); both
  signs of a pair use the same batch and the same (dropout-free) function, and the trained
  tensors are restored from a copy (PEFT tensors: small) so that no rounding drifts the
  weights. The estimate drives FedAvg's local steps, as for fedfgd.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, jvp

from fedfit.algorithms.backprop import FedAvg, NoStepOptimizer
from fedfit.algorithms.base import (
    ClientContext,
    ClientData,
    ClientTask,
    ServerState,
    Update,
    apply_server_update,
    batch_indices,
    load_tensors_,
    make_optimizer,
    weighted_mean,
)
from fedfit.algorithms.peft import LoraOptions, prepare_peft
from fedfit.algorithms.registry import register
from fedfit.config import ConfigError
from fedfit.costs.spec import TrainSpec
from fedfit.planning import CostContext, Plan

log = logging.getLogger("fedfit")

Batch = dict[str, torch.Tensor]

# ---------------------------------------------------------------- the estimators (pure)


def draw_tangents(shapes: Mapping[str, torch.Size], generator: torch.Generator) -> Batch:
    """One standard-normal tangent per tensor, in the mapping's order (client and server
    draw the same tangents from the same seeded generator)."""
    return {
        n: torch.randn(s, generator=generator, device=generator.device) for n, s in shapes.items()
    }


class _FrozenLinear(torch.autograd.Function):
    """``linear(x, W, b)`` whose forward-mode derivative treats W as a constant.

    torch's own rule for linear materialises a zero tangent for a frozen W and multiplies x
    by it: one wasted matmul and one wasted output per layer (torch 2.13, measured: the jvp
    of a 1536 x 384 linear on 16 x 64 tokens took 1.1-1.3 s per 30 calls, this 0.65-0.72 s).
    W travels inside a tuple, so jvp sees no tensor input there and draws no tangent for it;
    the bias stays an input (BitFit trains it).
    """

    @staticmethod
    def forward(x: torch.Tensor, const: tuple[torch.Tensor], bias: torch.Tensor | None) -> Any:
        return torch.nn.functional.linear(x, const[0], bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.weight = inputs[1][0]

    @staticmethod
    def jvp(ctx: Any, x_t: torch.Tensor, _const_t: Any, bias_t: torch.Tensor | None) -> Any:
        out = torch.nn.functional.linear(x_t, ctx.weight)
        return out if bias_t is None else out + bias_t

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuntimeError("_FrozenLinear is for forward-mode AD only")


@contextmanager
def frozen_linears_as_constants(model: torch.nn.Module) -> Iterator[None]:
    """Inside: every ``nn.Linear`` whose weight is frozen runs through :class:`_FrozenLinear`
    (same outputs, no zero-tangent matmul under jvp); restored on exit."""
    patched = []
    for module in model.modules():
        if type(module) is torch.nn.Linear and not module.weight.requires_grad:
            weight, bias = module.weight, module.bias
            module.forward = partial(_frozen_forward, weight, bias)  # type: ignore[method-assign]
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward  # back to the class's forward


def _frozen_forward(
    weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor
) -> torch.Tensor:
    return _FrozenLinear.apply(x, (weight,), bias)  # type: ignore[no-any-return]


def loss_and_jvp(
    model: torch.nn.Module, primals: Batch, tangents: Batch, batch: Batch
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(w), grad f . v) in one forward pass, f = the model's loss as a function of the
    tensors in ``primals`` (every other parameter as it is in the model)."""

    def loss_of(params: Batch) -> torch.Tensor:
        return functional_call(model, params, args=(), kwargs=batch, strict=False).loss

    # forward AD is unaffected by no_grad; no backward graph is recorded
    with torch.no_grad(), frozen_linears_as_constants(model):
        out = jvp(loss_of, (primals,), (tangents,))
    return out[0], out[1]


def forward_gradient(
    model: torch.nn.Module,
    params: Mapping[str, torch.Tensor],
    batch: Batch,
    tangents: Sequence[Batch],
) -> tuple[torch.Tensor, Batch, list[float]]:
    """``mean_k (grad . v_k) v_k`` over the given tangents; returns (loss, estimate, jvps)."""
    primals = {n: p.detach() for n, p in params.items()}
    estimate = {n: torch.zeros_like(p) for n, p in primals.items()}
    jvps: list[float] = []
    loss = torch.tensor(float("nan"))
    for v in tangents:
        loss, d = loss_and_jvp(model, primals, v, batch)
        jvps.append(float(d))
        for n in estimate:
            estimate[n].add_(v[n], alpha=float(d) / len(tangents))
    return loss, estimate, jvps


def finite_difference_gradient(
    model: torch.nn.Module,
    params: Mapping[str, torch.nn.Parameter],
    batch: Batch,
    tangents: Sequence[Batch],
    sigma: float,
) -> tuple[torch.Tensor, Batch]:
    """Baffle's estimate ``mean_k (f(w + s v_k) - f(w - s v_k)) / (2 s) v_k``; the parameters
    are perturbed in place and restored exactly from a copy. Returns (f(w), estimate)."""
    saved = {n: p.detach().clone() for n, p in params.items()}
    estimate = {n: torch.zeros_like(p) for n, p in saved.items()}
    with torch.no_grad():
        try:
            for v in tangents:
                losses = []
                for sign in (1.0, -1.0):
                    for n, p in params.items():
                        torch.add(saved[n], v[n], alpha=sign * sigma, out=p.data)
                    losses.append(float(model(**batch).loss))
                scale = (losses[0] - losses[1]) / (2 * sigma) / len(tangents)
                for n in estimate:
                    estimate[n].add_(v[n], alpha=scale)
        finally:
            for n, p in params.items():
                p.data.copy_(saved[n])
        loss = model(**batch).loss
    return loss, estimate


def cosine(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Cosine between two tensor dicts seen as one flat vector each (names of ``a``)."""
    dot = sum(float((a[n] * b[n]).sum()) for n in a)
    na = sum(float((a[n] ** 2).sum()) for n in a) ** 0.5
    nb = sum(float((b[n] ** 2).sum()) for n in a) ** 0.5
    return dot / (na * nb) if na > 0 and nb > 0 else 0.0


def _set_grads(params: Mapping[str, torch.nn.Parameter], estimate: Batch) -> None:
    """Hand a gradient estimate to the optimiser as each parameter's ``.grad``."""
    for n, p in params.items():
        p.grad = estimate[n]


def _parameters(model: torch.nn.Module, names: Sequence[str]) -> dict[str, torch.nn.Parameter]:
    """The named parameters, in the order of ``names``."""
    named = dict(model.named_parameters())
    return {n: named[n] for n in names}


def select_tangents(
    shapes: Mapping[str, torch.Size],
    direction: Mapping[str, torch.Tensor],
    candidates: int,
    keep: int,
    generator: torch.Generator,
) -> list[Batch]:
    """FwdLLM's discriminative sampling: of ``candidates`` random tangents, the ``keep`` with
    the largest |cosine| to ``direction``, best first. Each candidate is drawn from its own
    seed and only the seeds are kept while scoring, so memory stays at one candidate."""
    seeds = [int(s) for s in torch.randint(2**62, (candidates,), generator=generator)]
    scores = [
        abs(cosine(draw_tangents(shapes, torch.Generator().manual_seed(s)), direction))
        for s in seeds
    ]
    best = np.argsort(scores, kind="stable")[::-1][:keep]
    return [draw_tangents(shapes, torch.Generator().manual_seed(seeds[i])) for i in best]


# ---------------------------------------------------------------- Spry's split (pure)


def tensor_groups(names: Sequence[str], head: Sequence[str]) -> list[list[str]]:
    """Spry's units of assignment, in model order: a LoRA module's A and B together, every
    other tensor alone; the head tensors (``head``) are left out (shared or grouped by the
    caller)."""
    groups: dict[str, list[str]] = {}
    for n in names:
        if n in head:
            continue
        key = n.replace("lora_A", "lora_*").replace("lora_B", "lora_*")
        groups.setdefault(key, []).append(n)
    return list(groups.values())


def assign_groups(num_groups: int, num_clients: int) -> list[list[int]]:
    """Group indices per client position. K <= G: group g goes to client g mod K (each group
    trained by exactly one client). K > G: client i trains group i mod G, so each group is
    trained by floor(K/G) or ceil(K/G) clients and averaged over them."""
    if num_groups < 1 or num_clients < 1:
        raise ValueError(f"need >= 1 group and client, got {num_groups} and {num_clients}")
    if num_clients <= num_groups:
        return [list(range(i, num_groups, num_clients)) for i in range(num_clients)]
    return [[i % num_groups] for i in range(num_clients)]


# ---------------------------------------------------------------- options

PEFT = ("lora", "bitfit", "ia3", "head")  # the backbone stays frozen: no "full"


@dataclass(frozen=True)
class ForwardOptions:
    peft: str = field(
        default="lora", metadata={"help": "trained tensors: lora | bitfit | ia3 | head"}
    )
    r: int = field(default=8, metadata={"help": "LoRA rank (peft = lora)"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (peft = lora)"})
    target_modules: tuple[str, ...] = field(
        default=(), metadata={"help": "LoRA/IA3 target modules; empty = the family default"}
    )
    tangents: int = field(default=1, metadata={"help": "tangents averaged per minibatch"})

    def __post_init__(self) -> None:
        if self.peft not in PEFT:
            raise ConfigError(f"method.peft: {self.peft!r} is not one of {', '.join(PEFT)}")
        if self.tangents < 1:
            raise ConfigError("method.tangents: must be >= 1")
        LoraOptions(r=self.r, alpha=self.alpha)  # same checks as lora's


@dataclass(frozen=True)
class SpryOptions(ForwardOptions):
    share_head: bool = field(
        default=True, metadata={"help": "every client also trains the task head"}
    )
    communication: str = field(
        default="epoch", metadata={"help": "epoch (upload weights) | iteration (jvp scalars)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.communication not in ("epoch", "iteration"):
            raise ConfigError("method.communication: must be 'epoch' or 'iteration'")


@dataclass(frozen=True)
class FwdLLMOptions(ForwardOptions):
    tangents: int = field(default=20, metadata={"help": "tangents used per minibatch (K)"})
    candidates: int = field(
        default=100, metadata={"help": "random tangents scored per minibatch; K best kept"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.candidates < self.tangents:
            raise ConfigError("method.candidates: must be >= method.tangents")


@dataclass(frozen=True)
class BaffleOptions(ForwardOptions):
    tangents: int = field(default=20, metadata={"help": "perturbations per minibatch (K)"})
    sigma: float = field(default=1e-4, metadata={"help": "finite-difference step"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sigma <= 0:
            raise ConfigError("method.sigma: must be > 0")


# ---------------------------------------------------------------- the methods


class FedFGD(FedAvg):
    """FedAvg whose local steps use forward gradients (every trainable tensor)."""

    name = "fedfgd"

    @property
    def opts(self) -> ForwardOptions:
        return self.options  # type: ignore[return-value]

    def prepare(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        o = self.opts
        return prepare_peft(o.peft, model, task, self.config, o.r, o.alpha, o.target_modules)

    def spec(self, ctx: CostContext) -> TrainSpec | None:
        return None  # no analytic cost model for forward-mode steps yet: measured only

    # -- the client side: which tensors, which estimator

    def trained_names(self, model: torch.nn.Module, task: ClientTask) -> list[str]:
        return [n for n, p in model.named_parameters() if p.requires_grad]

    def load_and_select(self, model: torch.nn.Module, task: ClientTask) -> list[str]:
        """Load the downloaded weights (not the extras, whose names hold a '/'), and return
        the names this client trains, in the order its tangents are drawn."""
        load_tensors_(model, {n: t for n, t in task.download.items() if "/" not in n})
        return self.trained_names(model, task)

    def step_fn(
        self, params: dict[str, torch.nn.Parameter], task: ClientTask, generator: torch.Generator
    ) -> Callable[[torch.nn.Module, Batch], torch.Tensor]:
        shapes = {n: p.shape for n, p in params.items()}

        def step(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
            tangents = [draw_tangents(shapes, generator) for _ in range(self.opts.tangents)]
            loss, estimate, _ = forward_gradient(model, params, batch, tangents)
            _set_grads(params, estimate)
            return loss

        return step

    def step_kind(self) -> tuple[str, int]:
        return ("jvp", self.opts.tangents)

    def client_update(
        self, model: torch.nn.Module, task: ClientTask, shard: ClientData, ctx: ClientContext
    ) -> Update:
        names = self.load_and_select(model, task)
        params = _parameters(model, names)
        model.eval()  # dropout off: module docstring
        optimizer = make_optimizer(list(params.values()), ctx.train)
        step = self.step_fn(params, task, torch.Generator().manual_seed(task.seed))
        losses = [
            ctx.meter.train_step(
                model, optimizer, shard.batch(index), step=step, kind=self.step_kind()
            )
            for index in batch_indices(len(shard), ctx.train, task.seed)
        ]
        payload = {n: p.detach().clone() for n, p in params.items()}
        metrics = {"train_loss": float(np.mean(losses)), "steps": float(len(losses))}
        return Update(task.client_id, payload, len(shard), metrics)


class Baffle(FedFGD):
    """FedAvg whose local steps use central finite differences (module docstring)."""

    name = "baffle"

    def step_fn(
        self, params: dict[str, torch.nn.Parameter], task: ClientTask, generator: torch.Generator
    ) -> Callable[[torch.nn.Module, Batch], torch.Tensor]:
        opts: BaffleOptions = self.options  # type: ignore[assignment]
        shapes = {n: p.shape for n, p in params.items()}

        def step(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
            tangents = [draw_tangents(shapes, generator) for _ in range(opts.tangents)]
            loss, estimate = finite_difference_gradient(model, params, batch, tangents, opts.sigma)
            _set_grads(params, estimate)
            return loss

        return step

    def step_kind(self) -> tuple[str, int]:
        return ("finite-differences", self.opts.tangents)


class FwdLLM(FedFGD):
    """Forward gradients with tangents picked by cosine to the last global update."""

    name = "fwdllm"

    def init(self, model: torch.nn.Module) -> ServerState:
        state = super().init(model)
        state.extra["last_update"] = None
        return state

    def configure(
        self, state: ServerState, client_id: int, seed: int, plan: Plan | None = None
    ) -> ClientTask:
        task = super().configure(state, client_id, seed, plan)
        last = state.extra.get("last_update")
        if last is not None:  # the direction crosses the network with the weights
            task.download = {**state.params, **{f"last_update/{n}": t for n, t in last.items()}}
        return task

    def step_fn(
        self, params: dict[str, torch.nn.Parameter], task: ClientTask, generator: torch.Generator
    ) -> Callable[[torch.nn.Module, Batch], torch.Tensor]:
        opts: FwdLLMOptions = self.options  # type: ignore[assignment]
        shapes = {n: p.shape for n, p in params.items()}
        prefix = "last_update/"
        direction = {n[len(prefix) :]: t for n, t in task.download.items() if n.startswith(prefix)}

        def step(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
            if direction:
                tangents = select_tangents(
                    shapes, direction, opts.candidates, opts.tangents, generator
                )
            else:
                tangents = [draw_tangents(shapes, generator) for _ in range(opts.tangents)]
            loss, estimate, _ = forward_gradient(model, params, batch, tangents)
            _set_grads(params, estimate)
            return loss

        return step

    def aggregate(self, state: ServerState, updates: Sequence[Update]) -> ServerState:
        new = super().aggregate(state, updates)
        new.extra["last_update"] = {n: new.params[n] - state.params[n] for n in state.params}
        return new


class Spry(FedFGD):
    """Forward gradients on a per-client share of the trainable tensors (module docstring)."""

    name = "spry"

    @property
    def payload_kind(self) -> str:  # type: ignore[override]
        return "scalars" if self._spry.communication == "iteration" else "subset"

    @property
    def _spry(self) -> SpryOptions:
        return self.options  # type: ignore[return-value]

    def prepare(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        model = super().prepare(model, task)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        head = [n for n in trainable if any(h in n for h in ("classifier", "score"))]
        groups = tensor_groups(trainable, head)
        if self._spry.share_head:
            self.shared = head
        else:
            self.shared = []
            if head:
                groups.append(head)
        self.groups = groups
        self.assignment: dict[int, list[str]] = {}
        if self.config.server.optimizer != "fedyogi":
            log.info(
                "spry: server optimizer is %s; the paper's is fedyogi (server.optimizer = "
                '"fedyogi", server.lr = 0.01)',
                self.config.server.optimizer,
            )
        return model

    def start_round(self, state: ServerState, clients: Sequence[int]) -> None:
        shares = assign_groups(len(self.groups), len(clients))
        self.assignment = {
            cid: [n for g in share for n in self.groups[g]] + list(self.shared)
            for cid, share in zip(clients, shares, strict=True)
        }
        self.seeds: dict[int, int] = {}

    def configure(
        self, state: ServerState, client_id: int, seed: int, plan: Plan | None = None
    ) -> ClientTask:
        if client_id not in self.assignment:
            raise RuntimeError(
                f"spry: client {client_id} has no share this round; the engine must call "
                "start_round(state, clients) before configure"
            )
        task = super().configure(state, client_id, seed, plan)
        task.config["train"] = self.assignment[client_id]
        self.seeds[client_id] = seed  # per-iteration mode regenerates the client's tangents
        return task

    def trained_names(self, model: torch.nn.Module, task: ClientTask) -> list[str]:
        return list(task.config["train"])

    def client_update(
        self, model: torch.nn.Module, task: ClientTask, shard: ClientData, ctx: ClientContext
    ) -> Update:
        if self._spry.communication == "epoch":
            return super().client_update(model, task, shard, ctx)
        # per iteration: one minibatch, K jvp values up (the server has the seed)
        params = _parameters(model, self.load_and_select(model, task))
        model.eval()
        shapes = {n: p.shape for n, p in params.items()}
        generator = torch.Generator().manual_seed(task.seed)
        jvps: list[float] = []

        def step(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
            tangents = [draw_tangents(shapes, generator) for _ in range(self.opts.tangents)]
            loss, _, values = forward_gradient(model, params, batch, tangents)
            jvps.extend(values)
            return loss

        index = next(batch_indices(len(shard), ctx.train, task.seed))
        loss = ctx.meter.train_step(
            model,
            NoStepOptimizer(list(params.values())),
            shard.batch(index),
            step=step,
            kind=("jvp-scalars", self.opts.tangents),
        )
        payload = {"jvp": torch.tensor(jvps, dtype=torch.float32)}
        return Update(task.client_id, payload, len(shard), {"train_loss": loss, "steps": 1.0})

    def aggregate(self, state: ServerState, updates: Sequence[Update]) -> ServerState:
        if self._spry.communication == "epoch":
            return super().aggregate(state, updates)
        grads = []
        for u in updates:
            names = self.assignment[u.client_id]
            shapes = {n: state.params[n].shape for n in names}
            generator = torch.Generator().manual_seed(self.seeds[u.client_id])
            jvps = u.payload["jvp"].tolist()
            estimate = {n: torch.zeros(s) for n, s in shapes.items()}
            for d in jvps:
                v = draw_tangents(shapes, generator)
                for n in estimate:
                    estimate[n].add_(v[n], alpha=d / len(jvps))
            grads.append(estimate)
        grad = weighted_mean(grads, [u.num_examples for u in updates])
        lr = self.config.train.lr
        target = {n: state.params[n].to(g.dtype) - lr * g for n, g in grad.items()}
        return apply_server_update(state, target, self.config.server)


register("fedfgd", ForwardOptions, "FedFGD: FedAvg with forward-gradient (jvp) local steps, PEFT")(
    FedFGD
)
register("spry", SpryOptions, "Spry: forward gradients, trainable tensors split across clients")(
    Spry
)
register("fwdllm", FwdLLMOptions, "FwdLLM: forward gradients, K tangents picked by cosine")(FwdLLM)
register("baffle", BaffleOptions, "Baffle: central finite differences with K perturbations")(Baffle)
