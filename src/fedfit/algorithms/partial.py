"""Partial variable training (Ro et al., FL4NLP 2022, arXiv 2204.09715), docs/methods.md.

Each round every client trains, and uploads, only ``k = max(1, round(fraction * L))`` of the
model's ``L`` transformer blocks (plus the small modules above them, see below); the other
blocks stay frozen on the device and are not uploaded. The result of the server's mean goes
through the configured server optimiser; a block nobody trained this round keeps its value.

How the server averages (``aggregation``):

- ``"all_clients"`` (the default): a tensor's new value moves by the example-weighted mean
  change over *every* client of the round, a client that froze it counting a zero change.
  This is FedAvg of the clients' whole-model changes, as in federated averaging with frozen
  variables (their deltas are zero); a block trained by a few of the round's clients moves by
  their share of the examples times their mean change.
- ``"holders"``: the example-weighted mean over the clients that trained it only (what layer
  fine-tuning does with blocks every deep-enough client trains). Here it is unstable: at
  ``fraction = 1/4`` with 5 clients a block is mostly trained by one client, so it takes that
  client's whole change, and the clients' corrections of one shared error made in different
  blocks add up in the merged model instead of being averaged. Measured: on smollm2-19m /
  shakespeare held-out perplexity went 920 -> 1848 between rounds 7 and 8 (the all-clients
  mean fell every round, 1476 -> 1249), and tests/algorithms/test_partial.py reproduces the
  rise on a tiny overconfident Llama.

Which blocks a client trains, per round (``selection``):

- ``"random"``: ``k`` distinct blocks drawn from the client's task seed (so from the run
  seed, the round and the client id: reproducible, different per client and round);
- ``"round_robin"``: a window of ``k`` consecutive blocks (wrapping around) that moves by
  ``k`` per round and per client position in the round, so one round's clients cover
  different blocks and every block is trained once every ``ceil(L / k)`` rounds.

Choices the paper leaves open, made here:

- Always trained and uploaded by every client: what sits above the blocks (BERT's pooler and
  classifier; Llama's final norm, and the score head for classification), a small share of
  the model. The input embeddings (for SmolLM2 also the tied output layer) are frozen unless
  ``embeddings = true``: training them makes the embedding lookup require grad, and so every
  block's activations be kept for backward, and they are a quarter of a 20M-parameter LM.
- Frozen blocks and embeddings run in eval mode (no dropout): they are fixed features.
- Download = every tensor any client may train (a client's frozen blocks must follow what
  other clients trained in earlier rounds).
- Cost model: the planner budgets the worst case a client can be given, the lowest block
  trained, i.e. backprop through every block (``TrainSpec("layers", L)``); it is an upper
  bound on memory and FLOPs, exact for the upload of ``fraction = 1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
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
from fedfit.algorithms.registry import register
from fedfit.config import ConfigError
from fedfit.costs.spec import TrainSpec
from fedfit.models.structure import embeddings, head_modules, transformer_layers
from fedfit.planning import CostContext, Plan

SELECTIONS = ("random", "round_robin")
AGGREGATIONS = ("all_clients", "holders")


@dataclass(frozen=True)
class PartialOptions:
    fraction: float = field(
        default=0.5, metadata={"help": "share of the transformer blocks a client trains"}
    )
    selection: str = field(
        default="random", metadata={"help": "random | round_robin (which blocks, per round)"}
    )
    embeddings: bool = field(
        default=False, metadata={"help": "every client also trains the input embeddings"}
    )
    aggregation: str = field(
        default="all_clients",
        metadata={
            "help": "all_clients (a tensor's mean change over every client of the round, zero "
            "where it was frozen) | holders (over the clients that trained it)"
        },
    )

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError("method.fraction: must be in (0, 1]")
        if self.selection not in SELECTIONS:
            raise ConfigError(
                f"method.selection: {self.selection!r} is not one of {', '.join(SELECTIONS)}"
            )
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(
                f"method.aggregation: {self.aggregation!r} is not one of {', '.join(AGGREGATIONS)}"
            )


def blocks_per_client(num_blocks: int, fraction: float) -> int:
    """k = round(fraction * L), at least one block."""
    return max(1, min(num_blocks, round(fraction * num_blocks)))


def choose_blocks(
    num_blocks: int, k: int, selection: str, seed: int, round_: int, position: int
) -> list[int]:
    """The blocks (sorted indices, 0 = bottom) one client trains this round (module docstring)."""
    if selection == "random":
        rng = np.random.default_rng(seed)
        return sorted(int(i) for i in rng.choice(num_blocks, size=k, replace=False))
    start = ((round_ - 1) + position) * k
    return sorted({(start + j) % num_blocks for j in range(k)})


class PartialTraining(Algorithm):
    """Each client trains a per-round subset of the blocks; layer-wise averaging."""

    name = "partial"
    payload_kind = "subset"
    options: PartialOptions

    def prepare(self, model: torch.nn.Module, task: str) -> torch.nn.Module:
        """Mark every tensor a client may train; ``client_update`` narrows it per round."""
        names = {id(p): n for n, p in model.named_parameters()}
        self.block_names = [
            [names[id(p)] for p in block.parameters()] for block in transformer_layers(model)
        ]
        self.shared_names = [
            names[id(p)] for module in head_modules(model, task) for p in module.parameters()
        ]
        self.embedding_module = embeddings(model)
        if self.options.embeddings:
            self.shared_names += [names[id(p)] for p in self.embedding_module.parameters()]
        allowed = {*self.shared_names, *(n for block in self.block_names for n in block)}
        for name, p in model.named_parameters():
            p.requires_grad_(name in allowed)
        self.k = blocks_per_client(len(self.block_names), self.options.fraction)
        self.positions: dict[int, int] = {}
        return model

    def spec(self, ctx: CostContext) -> TrainSpec:
        """Upper bound: the lowest block may be chosen, so backprop may reach every block."""
        if self.options.embeddings:
            return TrainSpec("full", optimizer=ctx.optimizer)
        layers = ctx.model_config.num_hidden_layers  # type: ignore[attr-defined]
        return TrainSpec("layers", trained_layers=layers, optimizer=ctx.optimizer)

    def start_round(self, state: ServerState, clients: Sequence[int]) -> None:
        """Round-robin windows follow the clients' order in the round."""
        self.positions = {cid: i for i, cid in enumerate(clients)}

    def configure(
        self, state: ServerState, client_id: int, seed: int, plan: Plan | None = None
    ) -> ClientTask:
        task = ClientTask(client_id, state.round + 1, seed, download=state.params)
        task.config["blocks"] = choose_blocks(
            len(self.block_names),
            self.k,
            self.options.selection,
            seed,
            task.round,
            self.positions.get(client_id, 0),
        )
        return task

    def trained_names(self, blocks: Sequence[int]) -> list[str]:
        """The tensors a client with these blocks trains and uploads."""
        return [*self.shared_names, *(n for b in blocks for n in self.block_names[b])]

    def client_update(
        self, model: torch.nn.Module, task: ClientTask, shard: ClientData, ctx: ClientContext
    ) -> Update:
        load_tensors_(model, task.download)
        blocks = [int(b) for b in task.config["blocks"]]
        names = set(self.trained_names(blocks))
        allowed = {n for n, p in model.named_parameters() if p.requires_grad}
        all_blocks = list(transformer_layers(model))
        frozen = [all_blocks[i] for i in range(len(all_blocks)) if i not in blocks]
        if not self.options.embeddings:
            frozen.append(self.embedding_module)
        payload, metrics = train_subset(
            model,
            names,
            allowed,
            lambda: local_train(model, shard, ctx, task.seed, eval_modules=frozen),
        )
        metrics["trained_blocks"] = float(len(blocks))
        return Update(task.client_id, payload, len(shard), metrics)

    def aggregate(self, state: ServerState, updates: Sequence[Update]) -> ServerState:
        mean = self.combine(state, [u.payload for u in updates], [u.num_examples for u in updates])
        if self.options.aggregation == "all_clients":
            total = sum(u.num_examples for u in updates)
            for name in mean:
                share = sum(u.num_examples for u in updates if name in u.payload) / total
                old = state.params[name].to(mean[name].dtype)
                mean[name] = old + share * (mean[name] - old)
        return apply_server_update(state, mean, self.config.server)

    def rounds_to_cover(self) -> int:
        """Rounds a round-robin schedule takes to train every block once (for docs/tests)."""
        return math.ceil(len(self.block_names) / self.k)


register(
    "partial",
    PartialOptions,
    "Partial variable training: each client trains and uploads a per-round subset of blocks",
)(PartialTraining)
