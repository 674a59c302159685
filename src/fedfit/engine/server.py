"""The server side of a run, written once for every executor.

A ``Server`` holds the run's setup (engine/setup.py), the server state and the run folder
(engine/runfolder.py). One round is two calls, whichever executor moves the clients' work:

- ``open_round(r)``: sample the round's clients (seeded by run seed and round, among the
  clients that fit their budget), ``start_round``, then, client by client in that order,
  ``configure`` with the client's (seed, round, client) seed and the download through the
  channel; returns the round's tasks as the clients receive them;
- the executor runs every task's client side (engine/client.py ``run_client``) wherever its
  clients live and brings the results back;
- ``close_round(opened, results)``: ``aggregate`` the updates in the round's order, evaluate
  the global model when due (every ``run.eval_every`` rounds and at the last), append the
  round's rows, write the checkpoint and report progress.

``start()`` is round 0 (the starting model evaluated, after the class-mean head's federated
round when ``model.head_init = "ncm"``), ``finish()`` writes summary.json and the plots.
``serve(run_clients, last)`` is the round loop of the executors that call clients as a
function (local, ray); Flower's Strategy calls the same two methods from Flower's own loop.

Resume: everything random derives from (seed, round, client), so restarting from the
checkpoint of round r and running r+1.. gives the same rounds as an uninterrupted run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from fedfit.algorithms.base import ClientTask, ServerState, load_tensors_
from fedfit.devices import Budget
from fedfit.engine.client import NO_WORK, ClientResult, ClientRunner
from fedfit.engine.runfolder import CLIENTS, ROUNDS, TIMING, RunFolder
from fedfit.engine.seeds import derive_seed
from fedfit.engine.setup import RunSetup, evaluate, majority_baseline
from fedfit.engine.validation import client_failure, non_finite, rejection
from fedfit.errors import RunStopped
from fedfit.log import log
from fedfit.planning import Plan
from fedfit.privacy import epsilon_spent

ProgressFn = Callable[[int, int, dict[str, Any] | None], None]

CUMULATIVE = ("upload_bytes", "download_bytes", "client_flops")


def sample_clients(
    seed: int, round_: int, eligible: list[int], per_round: int, attempt: int = 0
) -> list[int]:
    """The round's clients: a seeded sample without replacement from the eligible ones
    (those that fit their budget), in increasing id order; ``attempt`` > 0 draws the fresh
    sample of a retried round."""
    rng = np.random.default_rng([seed, round_] if attempt == 0 else [seed, round_, attempt])
    picked = rng.choice(len(eligible), min(per_round, len(eligible)), replace=False)
    return sorted(eligible[int(i)] for i in picked)


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
    if plan.method:  # a mixed run: this client's method
        fields["method"] = plan.method
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


# salt of the simulated dropouts' draws ("drop")
DROPOUT_SALT = 0x64726F70


@dataclass
class OpenRound:
    """A round after its server-side start: the clients that train (in order) and their tasks
    as the clients receive them, with each download's size in bytes; ``dropped``: sampled
    clients that dropped out after their download (simulated churn), with why and the
    download's size; ``attempt``: 0, or the retry (run.retries) this sample is."""

    round: int
    clients: list[int]
    sent: list[tuple[ClientTask, int]]
    opened_at: float = field(default_factory=time.perf_counter)
    dropped: dict[int, tuple[str, int]] = field(default_factory=dict)
    attempt: int = 0

    @property
    def tasks(self) -> list[ClientTask]:
        return [task for task, _ in self.sent]


class RetryRound(Exception):
    """A round with too few valid updates, to be drawn again (``run.retries``)."""


class Server:
    """The server side of one run (see the module docstring)."""

    def __init__(
        self, setup: RunSetup, folder: RunFolder, progress: ProgressFn | None = None
    ) -> None:
        self.setup, self.folder, self.progress = setup, folder, progress
        self.state: ServerState = setup.algorithm.init(setup.model)
        self.wall = 0.0
        self.cum = dict.fromkeys(CUMULATIVE, 0)
        # client rows of a round's failed attempts (run.retries), written with the round
        self.retried_rows: list[dict[str, Any]] = []
        self.can_retry = False  # only serve() redraws a round; Flower's loop cannot

    @property
    def next_round(self) -> int:
        return self.state.round + 1

    # ---------------------------------------------------------------- start-up

    def begin(self, *, resume: bool, startup_s: float) -> None:
        """Before round 1 (or the round after the checkpoint): the checkpoint's state when
        resuming, the process's start-up wall time, and round 0 for a new run."""
        if resume:
            self.resume()  # the checkpoint's wall time, then this process's start-up
        self.wall += startup_s
        if not resume:
            self.start()

    def resume(self) -> None:
        """The checkpoint's state; rows of later rounds are dropped, totals carried on."""
        self.folder.truncate_torn()
        self.state, extra = self.folder.resumable_checkpoint()
        self.wall = float(extra.get("wall_s", 0.0))
        self.folder.truncate(self.state.round)
        # totals from the rows that are there (not copied from the last row)
        previous = self.folder.rounds()
        self.cum = {k: sum(r[k] for r in previous) for k in CUMULATIVE}
        log(f"resuming {self.folder.path} after round {self.state.round}")

    def start(self) -> None:
        """Round 0, before any training: the class-mean head's federated round when
        ``model.head_init = "ncm"`` (engine/head_init.py), then the starting model's
        evaluation, recorded like any round."""
        from fedfit.engine.head_init import ncm_round, start_row

        t0 = time.perf_counter()
        setup = self.setup
        if setup.config.model.head_init == "ncm":
            self.state, client_rows, row = ncm_round(setup, self.state, round0_clients(setup))
            for c in client_rows:
                c.update(self.assigned(c["client_id"]))
        else:
            client_rows, row = [], start_row()
        self._record(client_rows, row, time.perf_counter() - t0)

    # ---------------------------------------------------------------- one round

    def open_round(self, round_: int, attempt: int = 0) -> OpenRound:
        """Server side, before any client trains: sample the round's clients,
        ``start_round``, then ``configure`` and the download of every client in that order;
        a device with a ``dropout`` chance may drop out after its download (seeded)."""
        setup, state = self.setup, self.state
        cfg = setup.config
        opened_at = time.perf_counter()
        sampled = sample_clients(
            cfg.run.seed, round_, setup.eligible, cfg.data.clients_per_round, attempt
        )
        setup.algorithm.start_round(state, sampled)
        setup.channel.start_round()
        clients, sent, dropped = [], [], {}
        for cid in sampled:
            task = setup.algorithm.configure(
                state, cid, derive_seed(cfg.run.seed, round_, cid), setup.plans[cid]
            )
            delivered = setup.channel.download(task, round_)
            p = setup.population.budgets[cid].dropout
            draw = np.random.default_rng([cfg.run.seed, round_, attempt, cid, DROPOUT_SALT])
            if p and draw.random() < p:
                dropped[cid] = (f"dropped out (the device's dropout chance is {p:g})", delivered[1])
            else:
                clients.append(cid)
                sent.append(delivered)
        return OpenRound(round_, clients, sent, opened_at, dropped, attempt)

    def close_round(self, opened: OpenRound, results: list[ClientResult]) -> dict[str, Any]:
        """Server side, after the clients: ``aggregate`` the updates in the round's order,
        then evaluate (when due), append the rows, checkpoint and report; returns the round's
        row."""
        got = [r.update.client_id for r in results]
        if got != opened.clients:
            raise RuntimeError(
                f"round {opened.round}: updates of clients {got}, sent {opened.clients}"
            )
        setup, round_ = self.setup, opened.round
        client_rows, updates, rejected, dropped = [], [], {}, {}
        for cid, (why, download_bytes) in opened.dropped.items():
            dropped[cid] = why
            client_rows.append(self.dropped_row(round_, cid, why, download_bytes))
        for cid, result, (task, download_bytes) in zip(
            opened.clients, results, opened.sent, strict=True
        ):
            client_row = {
                "round": round_,
                "client_id": cid,
                **result.row,
                "download_bytes": download_bytes,
                **self.assigned(cid),
            }
            reason = self.rejection(result, task)
            late = self.late(client_row) if reason is None else None
            if reason is not None:
                client_row["rejected"] = rejected[cid] = reason
                log(f"round {round_}: client {cid}'s update rejected: {reason}")
            elif late is not None:
                client_row["dropped"] = dropped[cid] = late
            else:
                updates.append(result.update)
            client_rows.append(client_row)
        if opened.attempt:
            for c in client_rows:
                c["attempt"] = opened.attempt
        sampled = len(opened.clients) + len(opened.dropped)
        need = min(setup.config.run.min_clients, sampled)
        if len(updates) < need:
            reasons = "; ".join(
                f"client {c}: {why}" for c, why in sorted({**rejected, **dropped}.items())
            )
            message = (
                f"round {round_}: {len(updates)} of {sampled} sampled clients sent a valid "
                f"update in time, fewer than run.min_clients = {need} ({reasons})"
            )
            if self.can_retry and opened.attempt < setup.config.run.retries:
                log(f"{message}; drawing a fresh sample (retry {opened.attempt + 1})")
                self.retried_rows += client_rows
                raise RetryRound(message)
            self.stop(message, [*self.retried_rows, *client_rows])
        client_rows = [*self.retried_rows, *client_rows]
        self.retried_rows = []
        weights = np.array([u.num_examples for u in updates], dtype=float)
        losses = np.array([u.metrics.get("train_loss", np.nan) for u in updates])
        train_loss = float(np.sum(weights * losses) / weights.sum())
        self.state = setup.algorithm.aggregate(self.state, updates)
        bad = non_finite(self.state.params)
        if bad:
            self.stop(
                f"round {round_}: after aggregation the global model holds non-finite values "
                f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): the run diverged",
                client_rows,
            )
        row = {
            "round": round_,
            "clients": opened.clients,
            "num_clients": len(opened.clients),
            "train_loss": train_loss,
            "upload_bytes": sum(r["upload_bytes"] for r in client_rows),
            "download_bytes": sum(r["download_bytes"] for r in client_rows),
            "client_flops": sum(r["flops"] for r in client_rows),
        }
        if rejected:
            row["rejected"] = len(rejected)
        if dropped:
            row["dropped"] = len(dropped)
        if opened.attempt:
            row["attempts"] = opened.attempt + 1
        self._record(client_rows, row, time.perf_counter() - opened.opened_at)
        return row

    def dropped_row(self, round_: int, cid: int, why: str, download_bytes: int) -> dict[str, Any]:
        """The clients.jsonl row of a client that dropped out after its download."""
        return {
            "round": round_,
            "client_id": cid,
            **NO_WORK,
            "download_bytes": download_bytes,
            "dropped": why,
            **self.assigned(cid),
        }

    def late(self, client_row: dict[str, Any]) -> str | None:
        """Why a valid update missed the round's deadline (``run.deadline_s``) on its
        device's simulated speeds, or None; the simulated duration goes in its row."""
        budget = self.setup.population.budgets[client_row["client_id"]]
        transferred = client_row["download_bytes"] + client_row["upload_bytes"]
        seconds = budget.round_seconds(client_row["flops"], transferred)
        if seconds is None:
            return None
        client_row["simulated_s"] = round(seconds, 3)
        deadline = self.setup.config.run.deadline_s
        if deadline and seconds > deadline:
            return (
                f"straggler: its round takes {seconds:.3g} s on the device "
                f"({client_row['flops']} FLOPs, {transferred} bytes), over run.deadline_s = "
                f"{deadline:g}"
            )
        return None

    def rejection(self, result: ClientResult, task: ClientTask) -> str | None:
        """Why a client's result must not be aggregated (engine/validation.py), or None."""
        cid = task.client_id
        return client_failure(result.row, result.update.metrics) or rejection(
            result.update,
            task,
            self.setup.algorithm.payload_kind,
            shard_size=len(self.setup.shards[cid]),
            upload_bytes=result.row["upload_bytes"],
            budget=self.setup.population.budgets[cid],
        )

    def stop(self, message: str, client_rows: Sequence[dict[str, Any]] = ()) -> NoReturn:
        """End the run: the failed round's client rows (with each rejection's reason) are
        appended, summary.json says why (the rows so far stay, the checkpoint is the last
        good round's), then ``RunStopped``."""
        for c in client_rows:
            self.folder.append(CLIENTS, c)
        rounds = self.folder.rounds()
        summary = summarize(self.setup, rounds, self.folder.clients(), self.wall)
        self.folder.write_summary({**summary, "stopped": message})
        kept = f"round {rounds[-1]['round']}" if rounds else "none"
        raise RunStopped(
            f"{message}. The run stopped; {self.folder.path} keeps its rows and the "
            f"checkpoint of its last good round ({kept}); lower train.lr or server.lr"
        )

    def serve(self, run_clients: ClientRunner, last_round: int) -> None:
        """Rounds ``next_round .. last_round``, the clients' part by ``run_clients`` (which
        returns their results in the tasks' order)."""
        self.can_retry = True
        for round_ in range(self.next_round, last_round + 1):
            for attempt in range(self.setup.config.run.retries + 1):
                opened = self.open_round(round_, attempt)
                results = (
                    run_clients(self.state, opened.clients, opened.tasks) if opened.clients else []
                )
                try:
                    self.close_round(opened, results)
                    break
                except RetryRound:
                    continue

    def privacy_spent(self, rounds: int) -> dict[str, float]:
        """The (epsilon, delta) of ``rounds`` rounds of DP-FedAvg (fedfit/privacy.py), by
        opacus's accountant at sampling rate clients_per_round / eligible clients."""
        privacy = self.setup.config.privacy
        rate = self.setup.config.data.clients_per_round / len(self.setup.eligible)
        return {"epsilon": epsilon_spent(privacy, rate, rounds), "delta": privacy.delta}

    def assigned(self, client_id: int) -> dict[str, Any]:
        """The planner's assignment of a client: tier, trained part, budget, prediction."""
        population = self.setup.population
        return plan_fields(
            self.setup.plans[client_id],
            population.budgets[client_id],
            population.tier_names[client_id],
        )

    def _record(
        self, client_rows: list[dict[str, Any]], row: dict[str, Any], train_s: float
    ) -> None:
        config, setup, round_ = self.setup.config, self.setup, row["round"]
        eval_s = 0.0
        if round_ % config.run.eval_every == 0 or round_ == config.run.rounds:
            t1 = time.perf_counter()
            load_tensors_(setup.model, self.state.params)
            row["eval"] = evaluate(setup.model, setup.test, config.train.eval_batch_size)
            if setup.prior_loss is not None:
                row["eval"]["prior_loss"] = setup.prior_loss
            if not math.isfinite(row["eval"]["loss"]):
                self.stop(
                    f"round {round_}: the evaluation loss is {row['eval']['loss']}", client_rows
                )
            eval_s = time.perf_counter() - t1
        self.wall += train_s + eval_s
        if config.privacy.enabled:
            row["privacy"] = self.privacy_spent(round_)
        for k in CUMULATIVE:
            self.cum[k] += row[k]
            row[f"cum_{k}"] = self.cum[k]
        for c in client_rows:
            self.folder.append(CLIENTS, c)
        self.folder.append(ROUNDS, row)
        timing = {"round": round_, "train_s": round(train_s, 3), "eval_s": round(eval_s, 3)}
        if round_ == 0 and setup.setup_s:
            timing["setup_s"] = setup.setup_s  # build's parts, inside round 0's wall_s
        self.folder.append(TIMING, {**timing, "wall_s": round(self.wall, 3)})
        self.folder.save_checkpoint(self.state, {"wall_s": self.wall})
        if self.progress:
            self.progress(round_, config.run.rounds, row.get("eval"))

    # ---------------------------------------------------------------- the end

    def finish(self, plots: bool = True) -> Path:
        """summary.json (and the plots); returns the run folder."""
        rounds = self.folder.rounds()
        self.folder.write_summary(summarize(self.setup, rounds, self.folder.clients(), self.wall))
        if plots and rounds:
            from fedfit.report import load_run, write_plots

            write_plots(load_run(self.folder.path))
        return self.folder.path


def per_client_costs(clients: list[dict[str, Any]]) -> dict[str, float | None]:
    """Peak memory (max) and mean FLOPs / bytes over the given client updates."""
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


def learned(
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


def summarize(
    setup: RunSetup, rounds: list[dict[str, Any]], clients: list[dict[str, Any]], wall_s: float
) -> dict[str, Any]:
    """summary.json's content from a run's rows."""
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
        "model_picked": cfg.model.picked or None,  # model.name = "auto": which and why
        "dataset": cfg.data.name,
        "task": setup.task,
        "server_optimizer": cfg.server.optimizer,
        "rounds_completed": rounds[-1]["round"] if rounds else 0,
        "start": start,
        "final": final,
        "best": dict(best["eval"], round=best["round"]) if best else None,
        "gain_over_start": gain,
        "learned": learned(start, final, setup.prior_loss, lm),
        "majority_baseline": majority_baseline(setup.test),
        "prior_loss": setup.prior_loss,
        "head_init": cfg.model.head_init,
        "privacy": rounds[-1].get("privacy") if rounds else None,
        "attackers": sorted(setup.attack.clients) if setup.attack else [],
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
        # (clients that dropped out before training left out)
        "per_client": per_client_costs(
            [c for c in clients if c["round"] > 0 and (c["steps"] or "dropped" not in c)]
        ),
        "dropped_updates": sum("dropped" in c for c in clients),
        "rejected_updates": sum("rejected" in c for c in clients),
        "round0_per_client": per_client_costs([c for c in clients if c["round"] == 0]),
    }
