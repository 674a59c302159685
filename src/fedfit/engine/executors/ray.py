"""The Ray executor: the local executor's loop, with each round's clients spread over Ray actors.

``fedfit run --executor ray --workers N [--ray-address HOST:PORT]`` (``run.executor``,
``run.workers``, ``run.ray_address``). The server stays in this process and runs exactly the
Server (engine/server.py) every executor runs: sampling, ``start_round``,
``configure`` and the download through the channel for every client in the round's order,
``aggregate``, evaluation, rows, checkpoints. Only the client side moves:

- N long-lived actors (``ClientWorker``), created once per run. Each builds its own RunSetup
  with ``engine.setup.build`` from the same config (model loaded once per actor, shards, the
  algorithm prepared under the same seed, so peft draws the same initial adapters) and checks
  that its model's fingerprint equals the driver's (a mismatch is an error, never a silently
  different run). Model loads per run: 1 (driver, for evaluation) + N.
- Per round, ONE object goes into Ray's object store (``ray.put``): the round's clients, their
  tasks as they left the channel (downloads included) and the server state without the server
  optimiser's moments (``start_round`` may read it; the client side never needs the moments).
  A download shared by several clients (the global tensors of FedAvg, LoRA, ...) is one object,
  serialised once per round; every actor reads that one copy.
- The clients are split into N contiguous chunks of the sampled order; each actor calls
  ``start_round`` on its own algorithm with the whole round (Spry and partial training assign
  shares there) and then runs its chunk one client after another on its one model through
  ``engine.client.run_client``, the function the local executor calls: ``client_update``, the upload
  through the channel (quantised uploads too, with the same seeds), the measured row.
- Each actor returns its clients' updates as the server receives them, with their rows; the
  driver puts them back in the sampled order, so ``aggregate`` sums in the local executor's
  order and floating-point results match it. (Partial sums on the actors would change that
  order, and several aggregates are not sums: FedKSeed-Pro's |g| history, Spry's tangent
  regeneration, DeComFL's per-step weights; so the payloads come back whole.)

Byte counts are the channel's, as in the local executor: the download is counted on the driver
(one broadcast per distinct payload per round), the upload on the actor; what Ray itself moves
(pickled tasks and updates) is transport, not the simulated wire.

Threads: each actor sets torch to ``run.threads`` threads, or 1 when it is 0 (the local
executor's default is torch's, all cores: N actors x all cores would oversubscribe), and
reserves that many Ray CPUs. A local Ray instance is started with N x threads CPUs, on loopback
only (no dashboard, usage stats off), and shut down at the end whatever happens; with
``run.ray_address`` the driver joins that cluster (which needs fedfit installed on its nodes),
checks that it has the CPUs, and leaves it running. An address where nothing answers is an
error within seconds, never a hang.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import torch

from fedfit.algorithms.base import ClientTask, ServerState
from fedfit.config import Config, ConfigError
from fedfit.engine.client import ClientResult, ClientRunner, ClientSide, worker_threads
from fedfit.engine.executors import base
from fedfit.engine.server import Server
from fedfit.engine.setup import RunSetup, build, model_fingerprint
from fedfit.log import log

INSTALL = 'pip install "ray[default]"'
# What a worker on an existing cluster must see as this process does (a local instance
# inherits this process's environment anyway): the fedfit cache, and no hub access.
FORWARDED_ENV = ("FEDFIT_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class RoundWork:
    """What the actors get for one round (one object in Ray's store)."""

    state: ServerState  # without opt_state
    clients: list[int]
    tasks: list[ClientTask]


def split(count: int, parts: int) -> list[tuple[int, int]]:
    """``count`` items in ``parts`` contiguous chunks [start, stop) whose sizes differ by at
    most one, larger first; empty chunks are dropped."""
    base, extra = divmod(count, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        if stop > start:
            bounds.append((start, stop))
        start = stop
    return bounds


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) of ``host:port`` or ``ray://host:port`` (validated by RunConfig)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast when nothing listens at the cluster address: Ray itself retries a dead
    address for minutes. (Something else listening there is left to Ray's own retries.)"""
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as err:
        raise ConfigError(
            f"run.ray_address: no Ray cluster answers at {address} ({err}); start one with "
            "`ray start --head --port PORT` there, or drop --ray-address to let fedfit start "
            "a local Ray instance"
        ) from err


def import_ray(loopback: bool) -> ModuleType:
    """Import Ray with usage stats off; ``loopback``: keep this node's Ray on 127.0.0.1.

    Ray replaces a loopback address (its own and a cluster's) by the machine's network
    address unless multi-node mode is off; ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` turns it off
    (so every Ray process binds to 127.0.0.1). The variable is read when Ray is imported: set
    it first, and also on the imported constant in case Ray was imported before.
    """
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0" if loopback else "1"
    try:
        import ray
        from ray._private import ray_constants
    except ImportError as err:
        raise ConfigError(
            f'run.executor: "ray" needs Ray, which is not installed here: {INSTALL}'
        ) from err
    ray_constants.ENABLE_RAY_CLUSTER = not loopback
    return ray


class ClientWorker:
    """A Ray actor: one ``ClientSide`` (one model) for the run; runs clients one after
    another."""

    def __init__(self, threads: int) -> None:
        torch.set_num_threads(threads)  # before the actor imports and builds anything
        self.side: ClientSide | None = None

    def prepare(self, config: Config) -> str:
        """Build this actor's client side once; returns its model's fingerprint."""
        self.side = ClientSide.build(config)
        return self.side.fingerprint

    def run_clients(self, work: RoundWork, start: int, stop: int) -> list[ClientResult]:
        """Clients ``start:stop`` of the round, through ``engine.client.run_client``."""
        assert self.side is not None, "prepare(config) first"
        return self.side.run(work.state, work.clients, list(work.tasks[start:stop]))


class RayPool:
    """Ray (a local instance or a cluster) and N actors; a context manager.

    ``__enter__`` connects and creates the actors (they import torch and fedfit while the
    driver builds); ``start(setup)`` has each actor build its own setup for that run, checks
    it against the driver's and returns the ``ClientRunner`` for ``Server.serve``;
    ``__exit__`` kills the actors and disconnects, shutting down a local instance it started.
    The ray executor opens one per run; a caller running many configs (a sweep, the tests)
    may open one and pass it to each ``experiment.run(config, pool=...)`` to pay Ray's
    start-up once.
    """

    def __init__(self, workers: int, threads: int = 1, address: str = "") -> None:
        self.workers, self.threads, self.address = workers, threads, address
        self.actors: list[Any] = []
        self.ray: ModuleType | None = None
        self.connected_here = False

    @classmethod
    def for_config(cls, config: Config) -> RayPool:
        """The pool ``run.workers``, ``run.threads`` and ``run.ray_address`` describe."""
        return cls(config.run.workers, worker_threads(config), config.run.ray_address)

    def check(self, config: Config) -> None:
        """A pool given to ``run`` must be the one its config records."""
        wanted = RayPool.for_config(config)
        mine = (self.workers, self.threads, self.address)
        if mine != (wanted.workers, wanted.threads, wanted.address):
            raise ValueError(
                f"ray pool (workers, threads, address) = {mine} but the config asks for "
                f"{(wanted.workers, wanted.threads, wanted.address)}"
            )

    def __enter__(self) -> RayPool:
        address = self.address
        ray = self.ray = import_ray(not address or is_loopback(parse_address(address)[0]))
        if address:
            check_reachable(address)
        t0 = time.perf_counter()
        if ray.is_initialized():
            log("ray: using this process's existing Ray connection")
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # Ray's accelerator-env tip
                try:
                    if address:
                        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
                        ray.init(
                            address=address,
                            runtime_env={"env_vars": env} if env else None,
                            logging_level=logging.WARNING,
                        )
                    else:
                        ray.init(
                            address="local",
                            num_cpus=self.workers * self.threads,
                            include_dashboard=False,
                            logging_level=logging.WARNING,
                        )
                except ConnectionError as err:
                    raise ConfigError(f"run.ray_address: cannot join {address}: {err}") from err
            self.connected_here = True
            where = f"the cluster at {address}" if address else "a local Ray instance"
            log(f"ray: connected to {where} in {time.perf_counter() - t0:.1f} s")
        try:
            self._create_actors()
        except BaseException:
            self.close()
            raise
        return self

    def _create_actors(self) -> None:
        ray = self.ray
        assert ray is not None
        needed = self.workers * self.threads
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < needed:
            raise ConfigError(
                f"run.workers: {self.workers} workers x {self.threads} thread(s) need "
                f"{needed} Ray CPUs; the cluster has {cpus:g} (lower run.workers or "
                "run.threads, or add nodes)"
            )
        actor = ray.remote(num_cpus=self.threads)(ClientWorker)
        self.actors = [actor.remote(self.threads) for _ in range(self.workers)]

    def start(self, setup: RunSetup) -> ClientRunner:
        """Each actor builds its setup for ``setup.config``; returns the round's runner."""
        ray = self.ray
        assert ray is not None and self.actors, "enter the pool first"
        t0 = time.perf_counter()
        expected = model_fingerprint(setup.model)
        prints = ray.get([a.prepare.remote(setup.config) for a in self.actors])
        wrong = [i for i, p in enumerate(prints) if p != expected]
        if wrong:
            raise RuntimeError(
                f"ray: worker {wrong[0]}'s model differs from the driver's after "
                f"{setup.config.method.name}'s prepare (not reproducible from the run seed), "
                "so its clients would train another model; use the local executor"
            )
        log(
            f"ray: {len(self.actors)} workers ready in {time.perf_counter() - t0:.1f} s "
            f"(each loaded {setup.config.model.name} once)"
        )
        actors = list(self.actors)

        def run_clients(
            state: ServerState, clients: list[int], tasks: list[ClientTask]
        ) -> list[ClientResult]:
            # One object per round: shared downloads are serialised once, read by every actor.
            work = ray.put(RoundWork(replace(state, opt_state={}), clients, tasks))
            chunks = split(len(tasks), len(actors))
            futures = [
                actor.run_clients.remote(work, start, stop)
                for actor, (start, stop) in zip(actors, chunks, strict=False)
            ]
            results: list[ClientResult] = []
            for worker, chunk in enumerate(ray.get(futures)):
                for result in chunk:
                    result.row["worker"] = worker
                results.extend(chunk)
            return results  # Server.close_round checks they are the round's, in order

        return run_clients

    def close(self) -> None:
        """Kill the actors; disconnect (and stop a local instance) if this pool connected."""
        ray = self.ray
        if ray is None:
            return
        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        self.actors = []
        if self.connected_here:
            ray.shutdown()  # stops a local instance; only disconnects from a cluster
            self.connected_here = False

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


class Executor(base.Executor):
    """``run.executor = "ray"``: the clients on ``pool`` (an entered RayPool matching the
    config, reused across runs) or on a pool opened for this run and closed at its end."""

    def __init__(self, pool: RayPool | None = None) -> None:
        self.pool = pool

    def run(self, job: base.Job) -> Path:
        with contextlib.ExitStack() as stack:
            pool = self.pool
            if pool is None:
                # Ray and its actors start (and import torch) while this process builds.
                pool = stack.enter_context(RayPool.for_config(job.config))
            pool.check(job.config)
            setup = build(job.config)
            server = Server(setup, job.folder, job.progress)
            run_clients = pool.start(setup)
            server.begin(resume=job.resume, startup_s=job.startup_s())
            server.serve(run_clients, job.last_round)
        return server.finish(job.plots)
