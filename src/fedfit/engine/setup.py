"""What every executor builds before round 1: model, data shards, held-out set, algorithm.

The model is loaded ONCE and wrapped once by the algorithm's ``prepare``; clients are data
shards plus seeds, never model copies. Tokenised data comes from the on-disk cache.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fedfit.algorithms import make_algorithm
from fedfit.algorithms.base import Algorithm, ClientData, client_steps
from fedfit.attack import Attack, make_attack
from fedfit.config import Config
from fedfit.data import TextDataset, load_configured, partition, tokenize
from fedfit.devices import Budget, Population, build_population
from fedfit.engine.channel import Channel
from fedfit.engine.seeds import derive_seed
from fedfit.errors import ConfigError
from fedfit.log import log
from fedfit.models import get_model_info, load_model
from fedfit.planning import CostContext, Plan, exclusions
from fedfit.privacy import check_supported


@dataclass
class RunSetup:
    config: Config
    dataset: TextDataset
    model: torch.nn.Module
    tokenizer: object
    algorithm: Algorithm
    shards: list[ClientData]
    test: ClientData
    task: str
    population: Population
    plans: list[Plan]
    excluded: dict[int, str]  # client id -> why it fits nothing
    channel: Channel  # serialisation and optional quantisation of what crosses the network
    # Held-out cross-entropy of predicting the training class frequencies (None for LM).
    prior_loss: float | None = None
    # The simulated attackers ([attack], fedfit/attack.py); None when no client attacks.
    attack: Attack | None = None
    # Seconds ``build`` spent on each part (Stopwatch.seconds): data, model, tokenize, planning.
    setup_s: dict[str, float] = field(default_factory=dict)

    @property
    def eligible(self) -> list[int]:
        return [cid for cid in range(len(self.shards)) if cid not in self.excluded]


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every tensor of the model (names, dtypes, shapes and values): executors
    whose clients build their own model check it against the server's."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().reshape(-1).contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass
class Stopwatch:
    """Wall seconds per named part of a piece of work: ``lap(name)`` adds the time since the
    previous lap (or the start) to ``name``."""

    seconds: dict[str, float] = field(default_factory=dict)
    last: float = field(default_factory=time.perf_counter)

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self.last, 4)
        self.last = now


def partition_clients(config: Config, dataset: TextDataset) -> list[np.ndarray]:
    """The run's client shards (train-set indices) as configured in [data]; with
    ``data.max_examples`` each larger shard keeps a seeded random subset of that size."""
    parts = partition(
        None if dataset.task == "lm" else dataset.train_labels,
        dataset.train_groups,
        config.data.num_clients,
        config.data.partition,
        alpha=config.data.alpha,
        min_examples=config.data.min_examples,
        seed=config.run.seed,
        num_examples=len(dataset.train_texts),
    )
    cap = config.data.max_examples
    if not cap:
        return parts
    return [
        part
        if len(part) <= cap
        else np.sort(np.random.default_rng([config.run.seed, cid]).choice(part, cap, replace=False))
        for cid, part in enumerate(parts)
    ]


def build(config: Config) -> RunSetup:
    """Load data and model, partition, tokenise (cached), prepare the algorithm's model."""
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    clock = Stopwatch()
    channel = make_channel(config)  # a bad [compress] fails before anything loads
    dataset = load_configured(config.data, config.run.seed)
    task = dataset.task
    info = get_model_info(config.model.name)
    if task not in info.tasks:
        raise ValueError(
            f"model {info.name!r} does not support the {task!r} task of dataset "
            f"{dataset.name!r} (it supports {', '.join(info.tasks)})"
        )
    # partitioning problems (too few clients, empty Dirichlet draws) fail before the model loads
    parts = partition_clients(config, dataset)
    if len(parts) != config.data.num_clients:
        raise ValueError(
            f"data.num_clients = {config.data.num_clients} but the {config.data.partition} "
            f"partition of {dataset.name!r} gives {len(parts)} clients"
        )
    clock.lap("data")
    model, tokenizer = load_model(
        config.model.name,
        task,
        num_labels=max(2, len(dataset.label_names)),
        seed=config.run.seed,
        label_words=config.data.label_words,  # with data.prompt: classify by next-token logits
        class_names=dataset.label_names,
    )
    clock.lap("model")
    lm = task == "lm"
    pad_id = int(tokenizer.pad_token_id)  # type: ignore[attr-defined]
    train_seqs = tokenize(
        dataset.train_texts, tokenizer, config.model.max_length, prompt=config.data.prompt
    )
    test_seqs = tokenize(
        dataset.test_texts, tokenizer, config.model.max_length, prompt=config.data.prompt
    )
    train_labels = None if lm else np.asarray(dataset.train_labels)
    test_labels = None if lm else np.asarray(dataset.test_labels)

    shards = [
        ClientData(
            cid,
            [train_seqs[i] for i in idx],
            None if train_labels is None else train_labels[idx],
            pad_id,
            lm,
        )
        for cid, idx in enumerate(parts)
    ]

    eval_idx = np.arange(len(test_seqs))
    if config.data.eval_examples and config.data.eval_examples < len(eval_idx):
        # A fixed subset (seed 0, not the run seed) so runs with different seeds compare.
        eval_idx = np.sort(
            np.random.default_rng(0).choice(len(eval_idx), config.data.eval_examples, replace=False)
        )
    test = ClientData(
        -1,
        [test_seqs[i] for i in eval_idx],
        None if test_labels is None else test_labels[eval_idx],
        pad_id,
        lm,
    )
    clock.lap("tokenize")
    num_labels = max(2, len(dataset.label_names))
    ctx = cost_context_for(config, model.config, task, num_labels, max(len(s) for s in shards))
    algorithm = make_algorithm(config)
    # prepare may draw initial values (peft's LoRA A) from torch's global generator.
    torch.manual_seed(derive_seed(config.run.seed, 0x5EED))
    model = algorithm.prepare(model, task)
    clock.lap("model")
    reference = ctx.reference() if ctx.predictable or config.devices.needs_reference else None
    population = build_population(
        config.devices, config.data.num_clients, reference, config.run.seed
    )
    plans = plan_population(algorithm, population.budgets, ctx)
    excluded = exclusions(plans)
    algorithm.plan_done(model, plans)
    log_exclusions(excluded, population.tier_names)
    if excluded:
        log(
            f"{len(excluded)} of {len(plans)} clients excluded: they fit no configuration "
            f"of {config.method.name} within their budget"
        )
    check_head_init(config, model, plans, algorithm)
    eligible = len(plans) - len(excluded)
    if config.privacy.enabled and eligible < config.data.clients_per_round:
        raise ConfigError(
            f"privacy.noise_multiplier: {eligible} clients fit their budget, fewer than "
            f"data.clients_per_round = {config.data.clients_per_round}, the fixed number of "
            "clients DP-FedAvg divides by; lower data.clients_per_round"
        )
    clock.lap("planning")
    prior = None
    if not lm and test.labels is not None:
        from fedfit.engine.head_init import prior_loss

        pooled = np.concatenate([s.labels for s in shards if s.labels is not None])
        prior = prior_loss(pooled, test.labels, num_labels)
    clock.lap("data")
    return RunSetup(
        config,
        dataset,
        model,
        tokenizer,
        algorithm,
        shards,
        test,
        task,
        population,
        plans,
        excluded,
        channel,
        prior,
        make_attack(config.attack, config.data.num_clients, config.run.seed),
        clock.seconds,
    )


def plan_population(
    algorithm: Algorithm, budgets: Sequence[Budget], ctx: CostContext
) -> list[Plan]:
    """Every client's plan, made once per distinct budget: a plan is a function of the budget
    and the run's cost context alone (``Algorithm.plan`` reads nothing else), so clients with
    equal budgets share one (frozen) Plan. A population of 10,000 devices in four tiers costs
    four plans, not 10,000 (tests/test_population.py checks this against planning each)."""
    plan_of: dict[Budget, Plan] = {}
    for budget in budgets:
        if budget not in plan_of:
            plan_of[budget] = algorithm.plan(budget, ctx)
    return [plan_of[budget] for budget in budgets]


def log_exclusions(excluded: dict[int, str], tier_names: Sequence[str], shown: int = 5) -> None:
    """One line per tier and exceeded resource (a reason's first word, ``Budget.fits``) for
    the clients that fit nothing, with the first ``shown`` ids and the reason (the first
    client's, when a trace's budgets give each its own); summary.json's ``excluded`` lists
    every one. A line per client would be 5,000 lines for half of 10,000 clients."""
    reasons: dict[tuple[str, str], dict[int, str]] = {}
    for cid, reason in excluded.items():
        reasons.setdefault((tier_names[cid], reason.split(" ")[0]), {})[cid] = reason
    for (tier, _), group in reasons.items():
        cids = list(group)
        if len(cids) == 1:
            log(f"client {cids[0]} of tier {tier} excluded: {group[cids[0]]}")
            continue
        listed = ", ".join(map(str, cids[:shown])) + (", ..." if len(cids) > shown else "")
        why = group[cids[0]]
        if len(set(group.values())) > 1:
            why = f"e.g. client {cids[0]}: {why}"
        log(f"{len(cids)} clients ({listed}) of tier {tier} excluded: {why}")


def check_head_init(
    config: Config, model: torch.nn.Module, plans: list[Plan], algorithm: Algorithm
) -> None:
    """``model.head_init = "ncm"`` needs a classifier head that the method trains (the global
    state carries it to every client), and the local or Ray executor."""
    if config.model.head_init != "ncm":
        return
    from fedfit.config import ConfigError
    from fedfit.engine.head_init import head_module

    if config.data.prompt:
        raise ConfigError(
            "model.head_init: 'ncm' would overwrite the label words' rows that data.prompt "
            "classifies with (the prompt is the task-aligned start); use head_init = 'random'"
        )
    try:
        _, linear = head_module(model)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if config.run.executor == "flower":
        raise ConfigError(
            "model.head_init: 'ncm' runs its round 0 in the server's process, which in a "
            "Flower deployment holds no client data; use run.executor = 'local' or 'ray'"
        )
    if not linear.weight.requires_grad:
        # the global state (what clients download and checkpoints hold) carries trained
        # tensors only: a frozen head set on the server would reach no one and not survive
        # a resume
        raise ConfigError(
            f"model.head_init: {config.method.name} keeps the head frozen, so the class-mean "
            "head would not reach the clients; use model.head_init = 'random'"
        )


def make_channel(config: Config) -> Channel:
    """The run's wire (engine/channel.py) for the configured method and compression."""
    # read on an instance: a method's upload may depend on its options (Spry's)
    algorithm = make_algorithm(config)
    kind = algorithm.payload_kind
    server = config.server
    robust = server.aggregation != "mean" or server.clip_norm
    if kind == "scalars" and robust and not algorithm.combines_scalars:
        raise ConfigError(
            f"server.aggregation / server.clip_norm: {config.method.name} uploads seeds and "
            "scalars, which its own aggregate combines; robust aggregation and clipping apply "
            "to uploads of tensors (weights, gradients) and to DeComFL's shared-seed scalars"
        )
    check_supported(
        config.privacy,
        method=config.method.name,
        payload_kind=kind,
        aggregation=server.aggregation,
        head_init=config.model.head_init,
    )
    return Channel(config.compress, kind, config.method.name, config.run.seed)


def cost_optimizer(optimizer: str, momentum: float) -> str:
    """The cost model's name for the client optimiser (SGD with momentum keeps a buffer)."""
    return "sgd-momentum" if optimizer == "sgd" and momentum > 0 else optimizer


def cost_context_for(
    config: Config, model_config: object, task: str, num_labels: int, largest: int
) -> CostContext:
    """The worst-case step of this run (full batch of max_length tokens) for predictions;
    ``largest``: the most examples a client holds (sets the steps of an epoch)."""
    return CostContext(
        model_config=model_config,
        task=task,
        num_labels=num_labels,
        batch_size=min(config.train.batch_size, largest),
        seq_len=config.model.max_length,
        steps=client_steps(config.train, largest),
        optimizer=cost_optimizer(config.train.optimizer, config.train.momentum),
        margin=config.devices.margin,
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: ClientData, batch_size: int) -> dict[str, float]:
    """Accuracy and mean loss (classification) or token loss and perplexity (LM).

    Examples are batched in order of length so that batches carry almost no padding.
    """
    model.eval()
    order = np.argsort([len(s) for s in data.seqs], kind="stable")
    loss_sum, count, correct = 0.0, 0, 0
    for start in range(0, len(order), batch_size):
        batch = data.batch(order[start : start + batch_size])
        out = model(**batch)
        if data.lm:
            # HF shifts labels inside; .loss is the mean over predicted (non -100) tokens.
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            loss_sum += float(out.loss) * tokens
            count += tokens
        else:
            n = len(batch["labels"])
            loss_sum += float(out.loss) * n
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            count += n
    mean = loss_sum / max(count, 1)
    if data.lm:
        return {"loss": mean, "perplexity": float(np.exp(mean)), "num_tokens": count}
    return {"loss": mean, "accuracy": correct / max(count, 1), "num_examples": count}


def majority_baseline(data: ClientData) -> float | None:
    """Accuracy of always predicting the most common held-out label."""
    if data.labels is None or len(data.labels) == 0:
        return None
    return float(np.bincount(data.labels).max() / len(data.labels))
