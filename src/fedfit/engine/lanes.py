"""Client lanes: the local executor's clients of a round trained side by side (``run.lanes``).

On a CPU, one process running one client at a time over torch's intra-op threads leaves
cores idle (small matmuls, Python between ops); N single-threaded processes, each training a
different client, keep N cores busy. ``run.lanes = N`` forks N lane processes once per run,
after the setup is built: each inherits the model, the shards and the prepared algorithm
(fork shares their memory copy-on-write, so the frozen backbone is not copied; only what a
lane writes, its trainable tensors and optimiser state, becomes its own), sets torch to
``run.threads`` threads (1 when 0) and keeps its own cost meter.

Per round the driver sends every lane the round (the server state without the optimiser's
moments, the clients, their tasks as they left the channel: one pickle per lane, a download
shared by the round's clients is pickled once in it), and each lane calls ``start_round``
with the round's clients as a Ray actor does. The driver then hands out clients one at a
time to whichever lane is free (a client goes back to the lane that trained it before when
that lane is free, so a lane-local cache such as the frozen-prefix cache keeps its entries),
and puts the results back in the round's order. Each client runs through
``engine.client.run_client`` on its lane's model, and a client's work depends only on its
task (seeded by (seed, round, client)), so which lane trained it changes nothing: the rows
and the global model equal those of ``lanes = 1`` with the same ``run.threads``
(tests/engine/test_lanes.py). ``lane`` in each client row says where it ran.

Fork is needed (Linux; macOS's default is spawn, and Windows has no fork): a platform
without it gets a config error. A lane that dies (killed, out of memory) stops the run with
its exit code; the run folder keeps the checkpoint of the last finished round.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import traceback
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from types import TracebackType
from typing import Any

import torch

from fedfit.algorithms.base import ClientContext, ClientTask, ServerState
from fedfit.engine.client import ClientResult, ClientRunner, run_tasks, worker_threads
from fedfit.engine.meter import CostMeter
from fedfit.engine.setup import RunSetup
from fedfit.errors import ConfigError


@dataclass(frozen=True)
class LaneRound:
    """What each lane gets once per round."""

    state: ServerState  # without opt_state
    clients: list[int]
    tasks: list[ClientTask]


def _send(conn: Connection, message: Any) -> None:
    # Plain pickle (torch's multiprocessing reductions would move every tensor into shared
    # memory and pass file descriptors through a helper thread; a copy is simpler and cheap).
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _receive(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def _lane(setup: RunSetup, conn: Connection) -> None:
    """A lane's loop: ``LaneRound`` -> start the round; an index -> that client's result;
    ``None`` (or the driver gone) -> exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver stops the lanes itself
    torch.set_num_threads(worker_threads(setup.config))
    meter = CostMeter()
    ctx = ClientContext(train=setup.config.train, meter=meter)
    work: LaneRound | None = None
    while True:
        try:
            message = _receive(conn)
        except (EOFError, OSError):
            return
        if message is None:
            return
        try:
            if isinstance(message, LaneRound):
                work = message
                setup.algorithm.start_round(work.state, work.clients)
                setup.channel.start_round()
                reply: Any = ("ready", None)
            else:
                assert work is not None, "a client before its round"
                reply = ("done", run_tasks(setup, [work.tasks[message]], ctx, meter)[0])
        except BaseException:
            reply = ("error", traceback.format_exc())
        _send(conn, reply)


class Lanes:
    """N forked lane processes for one run's setup; a context manager whose ``runner()`` is
    the ``ClientRunner`` for ``Server.serve``."""

    def __init__(self, setup: RunSetup, lanes: int) -> None:
        if "fork" not in multiprocessing.get_all_start_methods():
            raise ConfigError(
                "run.lanes: lanes > 1 fork the process, which this platform cannot; "
                "use run.lanes = 1 or run.executor = 'ray'"
            )
        self.setup, self.count = setup, lanes
        self.processes: list[Any] = []
        self.conns: list[Connection] = []
        self.home: dict[int, int] = {}  # client -> the lane that last trained it

    def __enter__(self) -> Lanes:
        fork = multiprocessing.get_context("fork")
        try:
            for _ in range(self.count):
                mine, theirs = fork.Pipe()
                process = fork.Process(target=_lane, args=(self.setup, theirs), daemon=True)
                process.start()
                theirs.close()
                self.processes.append(process)
                self.conns.append(mine)
        except BaseException:
            self.close()
            raise
        return self

    def _died(self, lane: int) -> RuntimeError:
        process = self.processes[lane]
        process.join(timeout=5)
        return RuntimeError(
            f"run.lanes: lane {lane} (pid {process.pid}) died with exit code "
            f"{process.exitcode} (killed, or out of memory?); the run folder keeps the "
            "checkpoint of the last finished round: resume it, with fewer lanes if memory "
            "was short"
        )

    def _tell(self, lane: int, message: Any) -> None:
        try:
            _send(self.conns[lane], message)
        except OSError:  # a broken pipe: the lane is gone
            raise self._died(lane) from None

    def _reply(self, lane: int) -> Any:
        try:
            kind, value = _receive(self.conns[lane])
        except (EOFError, OSError):
            raise self._died(lane) from None
        if kind == "error":
            raise RuntimeError(f"run.lanes: lane {lane} failed:\n{value}")
        return value

    def run_round(
        self, state: ServerState, clients: list[int], tasks: list[ClientTask]
    ) -> list[ClientResult]:
        """Every task on a free lane; the results in the tasks' order."""
        work = LaneRound(replace(state, opt_state={}), clients, tasks)
        active = range(min(self.count, len(tasks)))
        for lane in active:
            self._tell(lane, work)
        for lane in active:
            self._reply(lane)
        pending = list(range(len(tasks)))
        results: list[ClientResult | None] = [None] * len(tasks)
        running: dict[int, int] = {}  # lane -> task index

        def give(lane: int) -> None:
            mine = [i for i in pending if self.home.get(tasks[i].client_id) == lane]
            index = mine[0] if mine else pending[0]
            pending.remove(index)
            running[lane] = index
            self._tell(lane, index)

        for lane in active:
            give(lane)
        by_conn = {id(self.conns[lane]): lane for lane in active}
        while running:
            for conn in wait([self.conns[lane] for lane in running]):
                lane = by_conn[id(conn)]
                index = running.pop(lane)
                result: ClientResult = self._reply(lane)
                result.row["lane"] = lane
                results[index] = result
                self.home[tasks[index].client_id] = lane
                if pending:
                    give(lane)
        return [r for r in results if r is not None]

    def runner(self) -> ClientRunner:
        return self.run_round

    def close(self) -> None:
        """Tell every lane to stop; kill one that does not within a few seconds."""
        for conn in self.conns:
            with contextlib.suppress(OSError, ValueError):
                _send(conn, None)
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
                process.join()
        for conn in self.conns:
            conn.close()
        self.processes, self.conns = [], []

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()
