"""The in-process executor (default): one model, clients run one after another.

Per round: sample K clients (seeded by run seed and round); server side, ``start_round`` and,
client by client in that order, ``configure`` -> the download through the channel
(``client_tasks``); client side, per client, ``client_update`` on the shared model -> the
payload goes through real serialisation (its byte count is the upload, and the server only
ever sees the deserialised copy) (``run_client``); server side again, ``aggregate`` of the
updates in the round's order. Evaluation every ``run.eval_every`` rounds and at the last
round. With ``run.executor = "ray"`` the same loop runs here and only the client side moves to
Ray actors (engine/ray.py), through the same ``run_client``.

Run folder (``runs/NAME/``): config.toml (resolved), rounds.jsonl (one line per round, only
deterministic content, so two runs with the same seed write identical files), clients.jsonl
(per client per round: measured FLOPs, peak memory by category, bytes up/down, wall time),
timing.jsonl (wall times per round), checkpoint.pt (server state after the last finished
round, written atomically), summary.json, plots/.

Resume: everything random derives from (seed, round, client), so restarting from the
checkpoint of round r and running r+1.. gives the same rounds as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedfit.algorithms.base import (
    Algorithm,
    ClientContext,
    ClientData,
    ClientTask,
    ServerState,
    Update,
    load_tensors_,
)
from fedfit.config import Config, load_config, to_toml
from fedfit.devices import Budget
from fedfit.engine.channel import Channel
from fedfit.engine.meter import CostMeter
from fedfit.engine.setup import (
    RunSetup,
    build,
    derive_seed,
    evaluate,
    log,
    majority_baseline,
    model_fingerprint,
)
from fedfit.planning import Plan

if TYPE_CHECKING:
    from fedfit.engine.ray import RayPool

ProgressFn = Callable[[int, int, dict[str, Any] | None], None]


CUMULATIVE = ("upload_bytes", "download_bytes", "client_flops")


class RunExistsError(FileExistsError):
    pass


def sample_clients(seed: int, round_: int, eligible: list[int], per_round: int) -> list[int]:
    """The round's clients: a seeded sample without replacement from the eligible ones
    (those that fit their budget), in increasing id order."""
    rng = np.random.default_rng([seed, round_])
    picked = rng.choice(len(eligible), min(per_round, len(eligible)), replace=False)
    return sorted(eligible[int(i)] for i in picked)


def _append(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")


def _truncate_jsonl(path: Path, last_round: int) -> None:
    """Drop rows of rounds after the checkpoint (a run killed between log and checkpoint)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if json.loads(r)["round"] <= last_round]
    path.write_text("".join(r + "\n" for r in kept))


def save_checkpoint(run_dir: Path, state: ServerState, extra: dict[str, Any]) -> None:
    tmp = run_dir / "checkpoint.pt.tmp"
    torch.save({"state": state.__dict__, **extra}, tmp)
    os.replace(tmp, run_dir / "checkpoint.pt")


def load_checkpoint(run_dir: Path) -> tuple[ServerState, dict[str, Any]]:
    data = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    return ServerState(**data.pop("state")), data


@dataclass
class ClientResult:
    """What the client side of one client's round hands back to the server: the update as
    the server receives it (after the channel) and the measured part of its clients.jsonl row
    (num_examples, steps, train_loss, upload_bytes, flops, peak_memory_bytes, memory, wall_s)."""

    update: Update
    row: dict[str, Any]


# The client side of a round: (state, the round's clients, their tasks) -> results in order.
ClientRunner = Callable[[ServerState, list[int], list[ClientTask]], list[ClientResult]]


def client_tasks(
    setup: RunSetup, state: ServerState, round_: int, clients: list[int]
) -> list[tuple[ClientTask, int]]:
    """Server side, before any client trains: ``configure`` each client in the round's order
    with its (seed, round, client) seed, and send its download through the channel; returns
    the tasks as the clients receive them, with each download's size in bytes."""
    seed = setup.config.run.seed
    tasks = []
    for cid in clients:
        task = setup.algorithm.configure(
            state, cid, derive_seed(seed, round_, cid), setup.plans[cid]
        )
        tasks.append(setup.channel.download(task, round_))
    return tasks


def run_client(
    algorithm: Algorithm,
    model: torch.nn.Module,
    task: ClientTask,
    shard: ClientData,
    channel: Channel,
    ctx: ClientContext,
    meter: CostMeter,
) -> ClientResult:
    """Client side of one client's round, on whichever process holds ``model``:
    ``client_update`` measured by ``meter``, then the upload through the channel (the update's
    payload becomes what the server receives). Both executors run every client through this."""
    meter.start_client()
    t0 = time.perf_counter()
    update = algorithm.client_update(model, task, shard, ctx)
    wall = time.perf_counter() - t0
    upload_bytes = channel.upload(update, task)
    memory = meter.memory.as_dict() if meter.memory else {}
    row = {
        "num_examples": update.num_examples,
        "steps": int(update.metrics.get("steps", 0)),
        "train_loss": update.metrics.get("train_loss"),
        "upload_bytes": upload_bytes,
        "flops": meter.flops,
        "peak_memory_bytes": memory.get("peak_bytes"),
        "memory": memory,
        "wall_s": round(wall, 4),
    }
    return ClientResult(update, row)


def run_tasks(
    setup: RunSetup, tasks: list[ClientTask], ctx: ClientContext, meter: CostMeter
) -> list[ClientResult]:
    """``run_client`` for each task, one after another, on ``setup``'s one model."""
    return [
        run_client(
            setup.algorithm,
            setup.model,
            task,
            setup.shards[task.client_id],
            setup.channel,
            ctx,
            meter,
        )
        for task in tasks
    ]


def worker_threads(config: Config) -> int:
    """Torch threads of a process that runs clients beside others (a Ray actor, a Flower
    node): ``run.threads``, or 1 when it is 0 (torch's default, all cores, would
    oversubscribe)."""
    return config.run.threads or 1


@dataclass
class ClientSide:
    """The client side of a run in a process of its own (a Ray actor, a Flower node): its own
    RunSetup built from the run's config (model loaded once, shards, the algorithm prepared
    under the run seed), a meter, and the model's fingerprint for the server to compare."""

    setup: RunSetup
    ctx: ClientContext
    meter: CostMeter
    fingerprint: str

    @classmethod
    def build(cls, config: Config) -> ClientSide:
        threads = worker_threads(config)
        torch.set_num_threads(threads)
        # build() logs client exclusions that the server already logs once.
        with contextlib.redirect_stderr(io.StringIO()):
            setup = build(config)
        torch.set_num_threads(threads)
        meter = CostMeter()
        ctx = ClientContext(train=config.train, meter=meter)
        return cls(setup, ctx, meter, model_fingerprint(setup.model))

    def run(
        self, state: ServerState, clients: list[int], tasks: list[ClientTask]
    ) -> list[ClientResult]:
        """``tasks`` (some of the round ``clients``' tasks), one after another: the
        algorithm is told the whole round first (Spry and partial training assign shares)."""
        self.setup.algorithm.start_round(state, clients)
        self.setup.channel.start_round()
        return run_tasks(self.setup, tasks, self.ctx, self.meter)


def in_process(setup: RunSetup, meter: CostMeter) -> ClientRunner:
    """The local executor's client side: every client on the one shared model, in order."""
    ctx = ClientContext(train=setup.config.train, meter=meter)

    def run_clients(
        state: ServerState, clients: list[int], tasks: list[ClientTask]
    ) -> list[ClientResult]:
        return run_tasks(setup, tasks, ctx, meter)

    return run_clients


@dataclass
class OpenRound:
    """A round after its server-side start: the sampled clients (in order) and their tasks as
    the clients receive them, with each download's size in bytes."""

    round: int
    clients: list[int]
    sent: list[tuple[ClientTask, int]]

    @property
    def tasks(self) -> list[ClientTask]:
        return [task for task, _ in self.sent]


def open_round(setup: RunSetup, state: ServerState, round_: int) -> OpenRound:
    """Server side, before any client trains: sample the round's clients, ``start_round``,
    then ``configure`` and the download of every client in that order."""
    cfg = setup.config
    clients = sample_clients(cfg.run.seed, round_, setup.eligible, cfg.data.clients_per_round)
    setup.algorithm.start_round(state, clients)
    setup.channel.start_round()
    return OpenRound(round_, clients, client_tasks(setup, state, round_, clients))


def close_round(
    setup: RunSetup, state: ServerState, opened: OpenRound, results: list[ClientResult]
) -> tuple[ServerState, list[dict[str, Any]], dict[str, Any]]:
    """Server side, after the clients: ``aggregate`` the updates in the round's order; returns
    the new state, the per-client rows and the round row."""
    got = [r.update.client_id for r in results]
    if got != opened.clients:
        raise RuntimeError(f"round {opened.round}: updates of clients {got}, sent {opened.clients}")
    updates = [r.update for r in results]
    client_rows = [
        {
            "round": opened.round,
            "client_id": cid,
            **result.row,
            "download_bytes": download_bytes,
            **plan_fields(
                setup.plans[cid], setup.population.budgets[cid], setup.population.tier_names[cid]
            ),
        }
        for cid, result, (_, download_bytes) in zip(
            opened.clients, results, opened.sent, strict=True
        )
    ]
    new_state = setup.algorithm.aggregate(state, updates)
    weights = np.array([u.num_examples for u in updates], dtype=float)
    losses = np.array([u.metrics.get("train_loss", np.nan) for u in updates])
    round_row = {
        "round": opened.round,
        "clients": opened.clients,
        "num_clients": len(opened.clients),
        "train_loss": float(np.sum(weights * losses) / weights.sum()),
        "upload_bytes": sum(r["upload_bytes"] for r in client_rows),
        "download_bytes": sum(r["download_bytes"] for r in client_rows),
        "client_flops": sum(r["flops"] for r in client_rows),
    }
    return new_state, client_rows, round_row


def run_round(
    setup: RunSetup,
    state: ServerState,
    round_: int,
    meter: CostMeter,
    run_clients: ClientRunner | None = None,
) -> tuple[ServerState, list[dict[str, Any]], dict[str, Any]]:
    """One federated round; returns the new state, per-client rows and the round row.

    The server's part runs here (``open_round``, ``close_round``). ``run_clients`` runs the
    clients' part (default: in process, one after another; engine/ray.py spreads them over
    actors) and returns their results in the tasks' order. (engine/flower.py calls the two
    halves from a Flower Strategy, with the clients behind Flower's messages.)
    """
    opened = open_round(setup, state, round_)
    runner = run_clients or in_process(setup, meter)
    results = runner(state, opened.clients, opened.tasks)
    return close_round(setup, state, opened, results)


def round0_clients(setup: RunSetup) -> list[int]:
    """Round 0's clients: every eligible one, or a seeded sample of
    ``model.head_init_clients`` (the same for the federated run and its central reference)."""
    k = setup.config.model.head_init_clients
    if not k or k >= len(setup.eligible):
        return list(setup.eligible)
    return sample_clients(setup.config.run.seed, 0, setup.eligible, k)


def plan_fields(plan: Plan, budget: Budget, tier: str) -> dict[str, Any]:
    """What the client was assigned, its budget and the predicted cost, beside the measured."""
    fields: dict[str, Any] = {"tier": tier, "trained": plan.describe() if plan.spec else None}
    if not budget.unlimited:
        fields["budget"] = {
            "memory_bytes": budget.memory_bytes,
            "flops_per_round": budget.flops_per_round,
            "upload_bytes": budget.upload_bytes,
        }
    if plan.estimate is not None:
        fields["predicted"] = {
            "peak_memory_bytes": plan.estimate.peak_bytes,
            "flops": plan.flops_per_round,
            "upload_bytes": plan.estimate.upload_bytes,
        }
    return fields


def _per_client(clients: list[dict[str, Any]]) -> dict[str, float | None]:
    """Peak memory (max) and mean FLOPs / bytes over every client update of the run."""
    if not clients:
        return dict.fromkeys(
            ("peak_memory_bytes_max", "flops_mean", "upload_bytes_mean", "download_bytes_mean")
        )
    return {
        "peak_memory_bytes_max": float(max(c["peak_memory_bytes"] or 0 for c in clients)),
        "flops_mean": float(np.mean([c["flops"] for c in clients])),
        "upload_bytes_mean": float(np.mean([c["upload_bytes"] for c in clients])),
        "download_bytes_mean": float(np.mean([c["download_bytes"] for c in clients])),
    }


def _summary(
    setup: RunSetup, rounds: list[dict[str, Any]], clients: list[dict[str, Any]], wall_s: float
) -> dict[str, Any]:
    cfg = setup.config
    evals = [r for r in rounds if "eval" in r]
    lm = setup.task == "lm"

    def score(r: dict[str, Any]) -> float:
        return -r["eval"]["perplexity"] if lm else r["eval"]["accuracy"]

    best = max(evals, key=score) if evals else None
    start = next((r["eval"] for r in evals if r["round"] == 0), None)
    final = evals[-1]["eval"] if evals else None
    gain = None
    if start is not None and final is not None and final is not start:
        metric = "perplexity" if lm else "accuracy"
        gain = {metric: final[metric] - start[metric], "loss": final["loss"] - start["loss"]}
    trainable = sum(p.numel() for p in setup.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in setup.model.parameters())
    return {
        "name": cfg.run.name,
        "method": cfg.method.name,
        "model": cfg.model.name,
        "dataset": cfg.data.name,
        "task": setup.task,
        "server_optimizer": cfg.server.optimizer,
        "rounds_completed": rounds[-1]["round"] if rounds else 0,
        "start": start,
        "final": final,
        "best": dict(best["eval"], round=best["round"]) if best else None,
        "gain_over_start": gain,
        "learned": _learned(start, final, setup.prior_loss, lm),
        "majority_baseline": majority_baseline(setup.test),
        "prior_loss": setup.prior_loss,
        "head_init": cfg.model.head_init,
        "labels": list(setup.dataset.label_names) if not lm else None,
        "wall_s": round(wall_s, 2),
        "num_clients": cfg.data.num_clients,
        "excluded_clients": len(setup.excluded),
        "excluded": {str(cid): reason for cid, reason in setup.excluded.items()},
        "trainable_params": trainable,
        "total_params": total,
        "cum_upload_bytes": sum(r["upload_bytes"] for r in rounds),
        "cum_client_flops": sum(r["client_flops"] for r in rounds),
        # per-client figures of training rounds; round 0's (the class-mean head's pass) apart
        "per_client": _per_client([c for c in clients if c["round"] > 0]),
        "round0_per_client": _per_client([c for c in clients if c["round"] == 0]),
    }


def _learned(
    start: dict[str, Any] | None,
    final: dict[str, Any] | None,
    prior_loss: float | None,
    lm: bool,
) -> bool | None:
    """Did the run learn? Its final eval loss is below its round-0 loss and, for
    classification, below the class-prior cross-entropy (the loss of predicting the training
    class frequencies, which a model reaches without reading the text); None without both
    evaluations."""
    if start is None or final is None or final is start:
        return None
    below_start = final["loss"] < start["loss"]
    if lm or prior_loss is None:
        return bool(below_start)
    return bool(below_start and final["loss"] < prior_loss)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(
    config: Config,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    stop_after: int | None = None,
    plots: bool = True,
    pool: RayPool | None = None,
) -> Path:
    """Run (or resume) a federated experiment; returns its run folder.

    ``stop_after`` ends the process's work after that round (as if killed), for tests and
    for running a long experiment in pieces; ``--resume`` continues it. With
    ``run.executor = "ray"`` the clients run on Ray actors (engine/ray.py): on ``pool`` if
    given (an entered RayPool matching the config, reused across runs), else on a pool
    opened for this run and closed at its end.
    """
    run_dir = prepare_run_dir(config, resume=resume, overwrite=overwrite)

    with ExitStack() as stack:
        t_start = time.perf_counter()
        if config.run.executor == "flower":
            if pool is not None:
                raise ValueError('a Ray pool was given but run.executor is "flower"')
            from fedfit.engine.flower import simulate

            return simulate(
                config,
                run_dir,
                resume=resume,
                stop_after=stop_after,
                progress=progress,
                plots=plots,
            )
        if config.run.executor == "ray":
            from fedfit.engine.ray import RayPool

            if pool is None:
                # Ray and its actors start (and import torch) while this process builds.
                pool = stack.enter_context(RayPool.for_config(config))
            pool.check(config)
        elif pool is not None:
            raise ValueError('a Ray pool was given but run.executor is "local"')
        setup = build(config)
        state = setup.algorithm.init(setup.model)
        run_clients = pool.start(setup) if pool is not None else None
        book = RunLog(run_dir, setup, progress)
        if resume:
            state = book.resume()  # the checkpoint's wall time, then this process's start-up
        book.add_wall(time.perf_counter() - t_start)
        if not resume:
            state = book.start(state)
        meter = CostMeter()
        last = config.run.rounds if stop_after is None else min(config.run.rounds, stop_after)
        for round_ in range(state.round + 1, last + 1):
            t0 = time.perf_counter()
            state, client_rows, row = run_round(setup, state, round_, meter, run_clients)
            book.record(state, client_rows, row, time.perf_counter() - t0)
    return book.finish(plots)


def prepare_run_dir(config: Config, *, resume: bool, overwrite: bool) -> Path:
    """The run folder, checked (resume needs a checkpoint; an existing run needs
    ``overwrite``, which clears its files) and holding the resolved config.toml."""
    run_dir = Path(config.run.output_dir) / config.run.name
    if resume:
        if not (run_dir / "checkpoint.pt").exists():
            raise FileNotFoundError(f"{run_dir}: no checkpoint.pt to resume from")
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunExistsError(
                f"{run_dir} already exists: resume it with --resume {run_dir}, pick another "
                "name with --set run.name=..., or replace it with --overwrite"
            )
        for name in (
            "rounds.jsonl",
            "clients.jsonl",
            "timing.jsonl",
            "summary.json",
            "checkpoint.pt",
        ):
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(to_toml(config))
    return run_dir


class RunLog:
    """A run folder's bookkeeping, the same whichever executor runs the clients: after each
    round ``record`` evaluates the global model when due, appends the round's rows, writes
    the checkpoint and reports progress; ``finish`` writes summary.json and the plots."""

    def __init__(self, run_dir: Path, setup: RunSetup, progress: ProgressFn | None = None):
        self.run_dir, self.setup, self.progress = run_dir, setup, progress
        self.wall = 0.0
        self.cum = dict.fromkeys(CUMULATIVE, 0)

    def resume(self) -> ServerState:
        """The checkpoint's state; rows of later rounds are dropped, totals carried on."""
        state, extra = load_checkpoint(self.run_dir)
        self.wall = float(extra.get("wall_s", 0.0))
        for name in ("rounds.jsonl", "clients.jsonl", "timing.jsonl"):
            _truncate_jsonl(self.run_dir / name, state.round)
        previous = _read_jsonl(self.run_dir / "rounds.jsonl")
        if previous:
            self.cum = {k: previous[-1][f"cum_{k}"] for k in CUMULATIVE}
        log(f"resuming {self.run_dir} after round {state.round}")
        return state

    def add_wall(self, seconds: float) -> None:
        self.wall += seconds

    def start(self, state: ServerState) -> ServerState:
        """Round 0, before any training: the class-mean head's federated round when
        ``model.head_init = "ncm"`` (engine/head_init.py), then the starting model's
        evaluation, recorded like any round; returns the state round 1 starts from."""
        from fedfit.engine.head_init import ncm_round, start_row

        t0 = time.perf_counter()
        config, setup = self.setup.config, self.setup
        if config.model.head_init == "ncm":
            state, client_rows, row = ncm_round(setup, state, round0_clients(setup))
            for c in client_rows:
                cid = c["client_id"]
                budget, tier = setup.population.budgets[cid], setup.population.tier_names[cid]
                c.update(plan_fields(setup.plans[cid], budget, tier))
        else:
            client_rows, row = [], start_row()
        self.record(state, client_rows, row, time.perf_counter() - t0)
        return state

    def record(
        self,
        state: ServerState,
        client_rows: list[dict[str, Any]],
        row: dict[str, Any],
        train_s: float,
    ) -> None:
        config, setup, round_ = self.setup.config, self.setup, row["round"]
        eval_s = 0.0
        if round_ % config.run.eval_every == 0 or round_ == config.run.rounds:
            t1 = time.perf_counter()
            load_tensors_(setup.model, state.params)
            row["eval"] = evaluate(setup.model, setup.test, config.train.eval_batch_size)
            if setup.prior_loss is not None:
                row["eval"]["prior_loss"] = setup.prior_loss
            eval_s = time.perf_counter() - t1
        self.wall += train_s + eval_s
        for k in CUMULATIVE:
            self.cum[k] += row[k]
            row[f"cum_{k}"] = self.cum[k]
        for c in client_rows:
            _append(self.run_dir / "clients.jsonl", c)
        _append(self.run_dir / "rounds.jsonl", row)
        timing = {"round": round_, "train_s": round(train_s, 3), "eval_s": round(eval_s, 3)}
        _append(self.run_dir / "timing.jsonl", {**timing, "wall_s": round(self.wall, 3)})
        save_checkpoint(self.run_dir, state, {"wall_s": self.wall})
        if self.progress:
            self.progress(round_, config.run.rounds, row.get("eval"))

    def finish(self, plots: bool = True) -> Path:
        rounds = _read_jsonl(self.run_dir / "rounds.jsonl")
        clients = _read_jsonl(self.run_dir / "clients.jsonl")
        summary = _summary(self.setup, rounds, clients, self.wall)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if plots and rounds:
            from fedfit.report import load_run, write_plots

            write_plots(load_run(self.run_dir))
        return self.run_dir


def resume_run(
    run_dir: str | Path, run_changes: dict[str, Any] | None = None, **kwargs: Any
) -> Path:
    """Continue a run from its folder, with the config it was started with.

    ``run_changes``: [run] keys that say where clients run, not what they compute
    (``executor``, ``workers``, ``ray_address``), to continue it elsewhere."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").exists():
        raise FileNotFoundError(f"{run_dir}: not a run folder (no config.toml)")
    config = load_config(run_dir / "config.toml")
    # The folder may have been moved: resume where it is now.
    import dataclasses

    config = dataclasses.replace(
        config,
        run=dataclasses.replace(
            config.run,
            output_dir=str(run_dir.parent),
            name=run_dir.name,
            **_execution_only(run_changes or {}),
        ),
    )
    return run(config, resume=True, **kwargs)


EXECUTION_KEYS = ("executor", "workers", "ray_address")


def _execution_only(changes: dict[str, Any]) -> dict[str, Any]:
    other = sorted(set(changes) - set(EXECUTION_KEYS))
    if other:
        raise ValueError(
            f"a resumed run keeps its config; only run.{', run.'.join(EXECUTION_KEYS)} may "
            f"change, not run.{', run.'.join(other)}"
        )
    return changes
