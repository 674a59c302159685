"""The Flower executor: any fedfit algorithm as a Flower ServerApp and ClientApp.

The server side is a Flower ``Strategy`` on Flower's Message API (``FedfitStrategy``):
``configure_train`` is the server half of a fedfit round (``Server.open_round``,
engine/server.py: sampling, ``start_round``, ``configure`` and the download of every client,
in the round's order) and turns each client's task into a Message for the node that holds
that client's data; ``aggregate_train`` puts the replies back in the round's order and runs
the other half (``Server.close_round``: ``aggregate``, evaluation of the global model on the
server's held-out set, rows, checkpoint), so a Flower run writes the same run folder as the
local executor. ``configure_evaluate`` sends nothing:
fedfit evaluates centrally, as the other executors do. The ServerApp's ``main`` finds which
node holds which client (one QUERY message per node; each node answers its
``partition-id``), then calls Flower's own ``Strategy.start`` round loop.

What crosses the wire (one Message per client per round, both ways):

- down, a TRAIN message: the task's download as an ``ArrayRecord`` ("download"), tensors of
  the task's config (FedKSeed's starting point) as more ArrayRecords ("config.<key>"), and a
  ``ConfigRecord`` ("task") with the client id, round, seed, the round's client list (Spry
  and partial training assign shares from it), the task's other config as JSON, and the
  driver model's fingerprint;
- up, the reply: the update's payload as it left fedfit's channel (``ArrayRecord``
  "update", so a quantised upload arrives as the dequantised tensors the server would see),
  and a ``ConfigRecord`` ("result") with the number of examples, the method's metrics and
  the client's measured row: FLOPs, peak memory by category, upload bytes, wall time, its
  plan and budget come from the server's side. A ``MetricRecord`` ("metrics") repeats the
  numbers Flower's own tools read (``num-examples``, ``train_loss``).

Byte counts are fedfit's channel's (the serialised payload, as for every executor); Flower's
framing around it is transport and not counted.

Secure aggregation (``server.secure_aggregation = "secaggplus"``, docs/secure-aggregation.md):
the rounds run through Flower's SecAgg+ workflow instead and every node's train handler sits
inside Flower's ``secaggplus_mod``; what a client masks, how the server rebuilds the mean
from the sum and what is refused are engine/flower_secagg.py's (``run_secure``,
``masked_reply``, ``check_secure_aggregation``). This module hands it the task codec.

Client side: a node builds its fedfit setup (``engine.setup.build``: data, partition, the
model prepared under the run seed) the first time it gets a task of a run, keeps it for the
process's life and checks the model's fingerprint against the server's: under the simulation
runtime a node's ClientApp runs in a long-lived Ray actor, so the model loads once per actor.
In a deployment Flower 1.41 starts a fresh ``flwr-clientapp`` process for every message
(SuperExec's subprocess isolation), so there the model is loaded from fedfit's local cache
once per round per client: Flower does not let a ClientApp keep it.

Three ways to run it:

- ``fedfit run --executor flower [--workers N]``: ``simulate`` runs Flower's simulation
  runtime in this process (``flwr.simulation.run_simulation``, Ray backend, one virtual
  SuperNode per client, N actors with ``run.threads`` torch threads each (1 when 0));
- a deployment: ``write_app`` writes a Flower App folder (pyproject.toml naming
  ``fedfit.engine.flower_app:serverapp`` / ``:clientapp``, the fedfit config in its run config);
  a SuperLink and one SuperNode per client (``--node-config "partition-id=K"``) are started
  with Flower's own commands, and ``flwr run`` submits it (README, "Scaling out and
  deploying"). fedfit must be installed on the SuperLink's and every SuperNode's machine;
- ``fedfit flower local``: ``deploy_local`` does that whole sequence on 127.0.0.1 (SuperLink,
  SuperNodes, ``flwr run``), waits for the run folder's summary and stops every process it
  started, whatever happens.

Flower's telemetry is turned off (``FLWR_TELEMETRY_ENABLED=0``) before Flower is imported.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read when flwr is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import Strategy  # noqa: E402

from fedfit.algorithms.base import ClientTask, ServerState, Update  # noqa: E402
from fedfit.config import Config, ConfigError, from_toml, to_toml  # noqa: E402
from fedfit.engine.client import ClientResult, ClientSide, worker_threads  # noqa: E402
from fedfit.engine.executors import base  # noqa: E402
from fedfit.engine.executors.ray import import_ray  # noqa: E402
from fedfit.engine.flower_context import (  # noqa: E402
    CONFIG_KEY,
    NODE_WAIT_S,
    REPLY_TIMEOUT_S,
    answer_query,
    node_partition,
    run_config_text,
    secure_aggregation_mod,
)
from fedfit.engine.flower_secagg import (  # noqa: E402
    check_secure_aggregation,
    from_fitins,
    masked_reply,
    run_secure,
)
from fedfit.engine.processes import stop_processes, with_descendants  # noqa: E402
from fedfit.engine.runfolder import SUMMARY, RunFolder  # noqa: E402
from fedfit.engine.server import OpenRound, ProgressFn, Server  # noqa: E402
from fedfit.engine.setup import build, model_fingerprint  # noqa: E402
from fedfit.errors import RunStopped  # noqa: E402
from fedfit.log import log  # noqa: E402

# ------------------------------------------------------------------ the wire: records


def to_arrays(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Tensors as an ArrayRecord (numpy arrays, names and order kept)."""
    record = ArrayRecord()
    for name, tensor in tensors.items():
        t = tensor.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            raise TypeError(f"flower: {name} is bfloat16, which Flower's numpy arrays lack")
        record[name] = Array(t.numpy())
    return record


def from_arrays(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Inverse of ``to_arrays``."""
    return {name: torch.from_numpy(np.array(array.numpy())) for name, array in record.items()}


def _tensor_map(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(v, torch.Tensor) for v in value.values())
    )


def task_content(
    task: ClientTask,
    clients: list[int],
    fingerprint: str,
    assigned: Mapping[str, Any] | None = None,
) -> RecordDict:
    """A client's task as a Message's content (see the module docstring). ``assigned``: what
    the server's planner gave this device (tier, what it trains, its budget, the predicted
    cost), carried so that the device knows its budget."""
    tensors = {k: v for k, v in task.config.items() if _tensor_map(v)}
    plain = {k: v for k, v in task.config.items() if k not in tensors}
    try:
        plain_json = json.dumps(plain)
    except TypeError as err:
        raise TypeError(
            f"flower: task config {sorted(plain)} of client {task.client_id} is neither JSON "
            f"nor a mapping of tensors, so it cannot travel in a Message ({err})"
        ) from err
    meta = {
        "client_id": task.client_id,
        "round": task.round,
        "seed": task.seed,
        "clients": clients,
        "tensor_config": sorted(tensors),
        "fingerprint": fingerprint,
        "assigned": dict(assigned or {}),
    }
    content = RecordDict(
        {
            "download": to_arrays(task.download),
            "task": ConfigRecord({"meta": json.dumps(meta), "config": plain_json}),
        }
    )
    for key, value in tensors.items():
        content[f"config.{key}"] = to_arrays(value)
    return content


def task_from_content(content: RecordDict) -> tuple[ClientTask, list[int], str]:
    """(task, the round's clients, the server model's fingerprint) from ``task_content``;
    the planner's assignment is ``task.config["assigned"]`` when the server sent one."""
    record = content.config_records["task"]
    meta = json.loads(str(record["meta"]))
    config = json.loads(str(record["config"]))
    for key in meta["tensor_config"]:
        config[key] = from_arrays(content.array_records[f"config.{key}"])
    if meta.get("assigned"):
        config["assigned"] = meta["assigned"]
    task = ClientTask(
        int(meta["client_id"]),
        int(meta["round"]),
        int(meta["seed"]),
        download=from_arrays(content.array_records["download"]),
        config=config,
    )
    return task, [int(c) for c in meta["clients"]], str(meta["fingerprint"])


def result_content(result: ClientResult) -> RecordDict:
    """A client's result (update after the channel + measured row) as a reply's content."""
    update = result.update
    numbers = {
        k: float(v) for k, v in update.metrics.items() if isinstance(v, int | float) and v == v
    }
    return RecordDict(
        {
            "update": to_arrays(update.payload),
            "result": ConfigRecord(
                {
                    "client_id": update.client_id,
                    "num_examples": update.num_examples,
                    "metrics": json.dumps(update.metrics),
                    "row": json.dumps(result.row),
                }
            ),
            "metrics": MetricRecord({"num-examples": update.num_examples, **numbers}),
        }
    )


def result_from_content(content: RecordDict) -> ClientResult:
    """Inverse of ``result_content``."""
    record = content.config_records["result"]
    update = Update(
        int(record["client_id"]),  # type: ignore[arg-type]
        from_arrays(content.array_records["update"]),
        int(record["num_examples"]),  # type: ignore[arg-type]
        json.loads(str(record["metrics"])),
    )
    return ClientResult(update, json.loads(str(record["row"])))


# ------------------------------------------------------------------ client side


_NODE: dict[str, ClientSide] = {}  # config hash -> this process's client side (one run)


def node_client(config_text: str) -> ClientSide:
    """This process's client side for the run ``config_text`` describes (built on first use:
    data, partition, model; the previous run's is dropped)."""
    key = hashlib.sha256(config_text.encode()).hexdigest()
    if key not in _NODE:
        _NODE.clear()
        _NODE[key] = ClientSide.build(from_toml(config_text))
    return _NODE[key]


def train_client(message: Message, context: Context, config_text: str) -> Message:
    """The ClientApp's train handler: one fedfit client's round on this node. Under secure
    aggregation it is the masked-vector stage of SecAgg+: the task arrives inside a legacy
    FitIns (``flower_secagg.from_fitins``) and the reply is the FitRes the mod masks
    (``flower_secagg.masked_reply``)."""
    node = node_client(config_text)
    secure = node.setup.config.server.secure_aggregation == "secaggplus"
    content, secagg = from_fitins(message.content) if secure else (message.content, {})
    task, clients, fingerprint = task_from_content(content)
    result = run_task(node, context, task, clients, fingerprint)
    reply = masked_reply(node, task, result, secagg) if secure else result_content(result)
    return Message(reply, reply_to=message)


def run_task(
    node: ClientSide, context: Context, task: ClientTask, clients: list[int], fingerprint: str
) -> ClientResult:
    """One client's round on this node, after checking that the node holds that client's
    data and the server's model."""
    partition = node_partition(context)
    if partition is not None and partition != task.client_id:
        raise ValueError(
            f"flower: node {context.node_id} holds partition {partition} but got the task of "
            f"client {task.client_id}"
        )
    if node.fingerprint != fingerprint:
        raise RuntimeError(
            f"flower: node {context.node_id}'s model differs from the server's (fingerprint "
            f"{node.fingerprint[:12]} vs {fingerprint[:12]}): another fedfit version, model "
            "file or seed; the client would train another model"
        )
    # The client side needs the round's client list, not the server's tensors.
    (result,) = node.run(ServerState(task.round - 1, {}), clients, [task])
    result.row["node_id"] = int(context.node_id)
    result.row["pid"] = os.getpid()
    return result


def client_app(config_text: str | None = None) -> ClientApp:
    """A ClientApp running fedfit clients: ``config_text`` (simulation) or, when None, the
    run config's ``fedfit-config`` (deployment); its train handler inside Flower's
    ``secaggplus_mod`` when that config asks for secure aggregation."""
    app = ClientApp()

    app.query()(answer_query)

    @app.train(mods=[secure_aggregation_mod(config_text)])
    def train(message: Message, context: Context) -> Message:
        return train_client(message, context, config_text or run_config_text(context))

    return app


# ------------------------------------------------------------------ server side


class FedfitStrategy(Strategy):
    """A fedfit algorithm as a Flower Strategy (see the module docstring).

    ``nodes`` maps fedfit client ids to Flower node ids. The fedfit server (state, run
    folder) is ``server``; the ArrayRecord Flower passes around is its global tensors.
    """

    def __init__(
        self,
        server: Server,
        nodes: dict[int, int],
        reply_timeout_s: float = REPLY_TIMEOUT_S,
    ) -> None:
        self.server, self.nodes = server, nodes
        self.fingerprint = model_fingerprint(server.setup.model)
        self.reply_timeout_s = reply_timeout_s
        self.opened: OpenRound | None = None

    def summary(self) -> None:
        cfg = self.server.setup.config
        log(
            f"flower: fedfit {cfg.method.name} on {cfg.model.name}, {len(self.nodes)} nodes, "
            f"{cfg.data.clients_per_round} clients per round"
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        opened = self.opened = self.server.open_round(server_round)
        assigned = self.server.assigned
        return [
            Message(
                task_content(task, opened.clients, self.fingerprint, assigned(task.client_id)),
                dst_node_id=self.nodes[task.client_id],
                message_type=MessageType.TRAIN,
                group_id=str(server_round),
            )
            for task in opened.tasks
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        opened = self.opened
        assert opened is not None and opened.round == server_round, "configure_train first"
        node_client_ids = {node: cid for cid, node in self.nodes.items()}
        results: dict[int, ClientResult] = {}
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            if reply.has_error():
                raise RuntimeError(
                    f"flower: round {server_round}: client {node_client_ids.get(node)} (node "
                    f"{node}) failed: {reply.error.reason}"
                )
            result = result_from_content(reply.content)
            results[result.update.client_id] = result
        missing = [cid for cid in opened.clients if cid not in results]
        if missing:
            raise RuntimeError(
                f"flower: round {server_round}: no reply from clients {missing} (nodes "
                f"{[self.nodes[c] for c in missing]}) within {self.reply_timeout_s:g} s"
            )
        ordered = [results[cid] for cid in opened.clients]
        row = self.server.close_round(opened, ordered)
        metrics = MetricRecord(
            {
                "train_loss": float(row["train_loss"]),
                "upload_bytes": int(row["upload_bytes"]),
                "download_bytes": int(row["download_bytes"]),
                "client_flops": float(row["client_flops"]),
            }
        )
        return to_arrays(self.server.state.params), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # the global model is evaluated on the server's held-out set (Server)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None


def discover_nodes(grid: Grid, clients: list[int], wait_s: float = NODE_WAIT_S) -> dict[int, int]:
    """fedfit client id -> Flower node id for every client in ``clients``: each node answers
    a QUERY with its ``partition-id``. Waits up to ``wait_s`` for the nodes to connect."""
    deadline = time.monotonic() + wait_s
    wanted = set(clients)
    found: dict[int, int] = {}
    asked: set[int] = set()
    while True:
        new = [n for n in grid.get_node_ids() if n not in asked]
        if new:
            queries = [
                Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in new
            ]
            for reply in grid.send_and_receive(queries, timeout=wait_s):
                node = int(reply.metadata.src_node_id)
                if reply.has_error():
                    raise RuntimeError(f"flower: node {node} failed a query: {reply.error.reason}")
                partition = int(reply.content.config_records["node"]["partition-id"])  # type: ignore[arg-type]
                if partition in found and found[partition] != node:
                    raise ConfigError(
                        f"flower: nodes {found[partition]} and {node} both hold partition "
                        f"{partition}; give each SuperNode its own --node-config partition-id"
                    )
                if partition >= 0:
                    found[partition] = node
                asked.add(node)
        missing = sorted(wanted - set(found))
        if not missing:
            return {cid: found[cid] for cid in clients}
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"flower: no node holds clients {missing[:10]} after {wait_s:g} s ("
                f"{len(found)} nodes answered); start one SuperNode per client with "
                "--node-config 'partition-id=K'"
            )
        time.sleep(0.5)


def server_main(
    grid: Grid,
    context: Context,
    config: Config,
    folder: RunFolder,
    progress: ProgressFn | None = None,
    plots: bool = True,
) -> Path:
    """The ServerApp's work: build the server side, find the nodes, run Flower's round loop
    (``Strategy.start``) with a FedfitStrategy, or under secure aggregation Flower's SecAgg+
    workflow (``run_secure``), then write the run folder's summary."""
    t_start = time.perf_counter()
    server = Server(build(config), folder, progress)
    check_secure_aggregation(config, server.setup.algorithm.payload_kind)
    nodes = discover_nodes(grid, server.setup.eligible)
    log(f"flower: {len(nodes)} nodes hold the run's clients")
    # round 0: the starting model evaluated
    server.begin(resume=False, startup_s=time.perf_counter() - t_start)
    if config.server.secure_aggregation == "secaggplus":
        run_secure(grid, context, server, nodes, task_content)
    else:
        strategy = FedfitStrategy(server, nodes)
        strategy.start(grid, to_arrays(server.state.params), num_rounds=config.run.rounds)
    return server.finish(plots)


def server_app(
    config: Config, folder: RunFolder, progress: ProgressFn | None = None, plots: bool = True
) -> ServerApp:
    """A ServerApp running ``config`` into ``folder`` (the simulation's)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        server_main(grid, context, config, folder, progress, plots)

    return app


def serve_deployment(grid: Grid, context: Context) -> None:
    """The deployed ServerApp (flower_app.serverapp): the run config's fedfit config, into
    the run folder it names (absolute, written by ``write_app``)."""
    config = from_toml(run_config_text(context))
    overwrite = bool(context.run_config.get("overwrite", False))
    folder = RunFolder.prepare(config, resume=False, overwrite=overwrite)
    server_main(grid, context, config, folder)


# ------------------------------------------------------------------ simulation


class Executor(base.Executor):
    """``run.executor = "flower"``: the run through Flower's simulation runtime (``simulate``);
    no options."""

    def run(self, job: base.Job) -> Path:
        return simulate(
            job.config,
            job.folder,
            resume=job.resume,
            stop_after=job.stop_after,
            progress=job.progress,
            plots=job.plots,
        )


def simulate(
    config: Config,
    folder: RunFolder,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    progress: ProgressFn | None = None,
    plots: bool = True,
) -> Path:
    """The run through Flower's simulation runtime (Ray backend): one virtual SuperNode per
    fedfit client, ``run.workers`` actors of ``run.threads`` threads (1 when 0)."""
    if resume or stop_after is not None:
        raise ConfigError(
            'run.executor: "flower" runs a whole run; continue a stopped run with '
            "--executor local or ray"
        )
    check_secure_aggregation(config)
    import logging

    from flwr.simulation import run_simulation

    import_ray(loopback=True)  # Flower's Ray backend starts Ray here: keep it on 127.0.0.1
    threads = worker_threads(config)
    backend = {
        "client_resources": {"num_cpus": threads, "num_gpus": 0.0},
        "init_args": {"num_cpus": config.run.workers * threads, "include_dashboard": False},
    }
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)  # fedfit reports progress itself
    try:
        run_simulation(
            server_app=server_app(config, folder, progress, plots),
            client_app=client_app(to_toml(config)),
            num_supernodes=config.data.num_clients,
            backend_name="ray",
            backend_config=backend,  # type: ignore[arg-type]
        )
    finally:
        flwr_logger.setLevel(level)
    if not folder.has_summary():
        raise RuntimeError(f"flower: the simulation ended without finishing {folder.path}")
    stopped = folder.summary().get("stopped")
    if stopped:
        raise RunStopped(f"{stopped}. The run stopped; see {folder.path}")
    return folder.path


# ------------------------------------------------------------------ deployment


def deployed_folder(config: Config) -> RunFolder:
    """The run folder of a deployment: ``run.output_dir`` made absolute (the SuperLink's
    working directory is not the caller's), then ``run.name``."""
    return RunFolder(Path(config.run.output_dir).expanduser().resolve() / config.run.name)


def write_app(config: Config, app_dir: str | Path, overwrite_run: bool = False) -> Path:
    """A Flower App folder for ``flwr run``: pyproject.toml naming fedfit's ServerApp and
    ClientApp, the fedfit config (run.output_dir made absolute) in its run config."""
    check_secure_aggregation(config)
    app_dir = Path(app_dir)
    app_dir.mkdir(parents=True, exist_ok=True)
    output = Path(config.run.output_dir).expanduser().resolve()
    config = replace(config, run=replace(config.run, output_dir=str(output)))
    text = to_toml(config)
    pyproject = f"""# A Flower App that runs fedfit's {config.method.name} (written by `fedfit flower app`).
# fedfit must be installed where the SuperLink and the SuperNodes run.
[project]
name = "fedfit-{_slug(config.run.name)}"
version = "1.0.0"
description = "fedfit run {config.run.name} through Flower"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedfit"

[tool.flwr.app.components]
serverapp = "fedfit.engine.flower_app:serverapp"
clientapp = "fedfit.engine.flower_app:clientapp"

[tool.flwr.app.config]
overwrite = {str(overwrite_run).lower()}
{CONFIG_KEY} = {json.dumps(text)}
"""
    (app_dir / "pyproject.toml").write_text(pyproject)
    return app_dir


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "run"


DEPLOY_READY_S = 60.0  # how long the SuperLink may take to listen


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 now (asked from the OS)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + DEPLOY_READY_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"flower: the SuperLink exited with code {process.returncode}:\n" + _tail(log_path)
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1.0):
            return
        time.sleep(0.3)
    raise RuntimeError(
        f"flower: the SuperLink did not listen on 127.0.0.1:{port} in {DEPLOY_READY_S:g} s:\n"
        + _tail(log_path)
    )


def _tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return f"({path} is empty)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _stop(processes: list[subprocess.Popen[bytes]], home: Path) -> None:
    """Stop what a deployment started: each process, its descendants (Flower's SuperExecs
    start the app processes, some in sessions of their own) and anything else running with
    this deployment's FLWR_HOME; SIGTERM, then SIGKILL after 10 s."""
    import psutil

    found = with_descendants(process.pid for process in processes)
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.pid not in found and p.environ().get("FLWR_HOME") == str(home):
                found[p.pid] = p
    stop_processes(found.values(), grace_s=10.0)
    for process in processes:  # reap our own children
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=1.0)


def deploy_commands(app_dir: Path, port: int, node_ports: list[int], connection: str) -> list[str]:
    """The shell commands of a loopback deployment (what ``deploy_local`` runs): the
    SuperLink on ``port``, SuperNode k (fedfit client k) with its runtime API on
    ``node_ports[k]``, then ``flwr run``."""
    clients = len(node_ports)
    commands = [
        "flower-superlink --insecure --disable-runtime-dependency-installation "
        f"--host 127.0.0.1 --port {port}"
    ]
    commands += [
        f"flower-supernode --insecure --superlink 127.0.0.1:{port} --host 127.0.0.1 "
        f"--port {node_port} --node-config 'partition-id={k} num-partitions={clients}'"
        for k, node_port in enumerate(node_ports)
    ]
    commands.append(f"flwr run {app_dir} {connection} --stream")
    return commands


def deploy_local(
    config: Config,
    work_dir: str | Path,
    *,
    overwrite: bool = False,
    timeout_s: float = 1800.0,
) -> Path:
    """The run as a Flower deployment on 127.0.0.1: a SuperLink and one SuperNode per
    client as separate processes (Flower's own commands, ``deploy_commands``), the app
    written by ``write_app`` and submitted with ``flwr run``; waits for the run to finish
    and stops every process it started, whatever happens. Logs and the Flower config
    (FLWR_HOME) go to ``work_dir``. Returns the run folder."""
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    folder = deployed_folder(config)
    run_dir = folder.path
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{run_dir} already exists: pass overwrite=True (--overwrite)")
    app_dir = write_app(config, work / "app", overwrite_run=overwrite)
    home = work / "flwr-home"
    home.mkdir(exist_ok=True)
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedfit"\n\n[superlink.fedfit]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    node_ports = [free_port() for _ in range(config.data.num_clients)]
    commands = deploy_commands(app_dir, port, node_ports, "fedfit")
    processes: list[subprocess.Popen[bytes]] = []

    def start(command: str, log_name: str) -> subprocess.Popen[bytes]:
        log_file = (work / log_name).open("wb")
        process = subprocess.Popen(
            shlex.split(command),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=work,
            start_new_session=True,  # its own process group: _stop reaches its children
        )
        log_file.close()
        processes.append(process)
        return process

    try:
        link = start(commands[0], "superlink.log")
        _wait_listening(port, link, work / "superlink.log")
        for k, command in enumerate(commands[1:-1]):
            start(command, f"supernode-{k}.log")
        log(
            f"flower: SuperLink on 127.0.0.1:{port}, {len(commands) - 2} SuperNodes; logs in {work}"
        )
        submit = start(commands[-1], "flwr-run.log")
        try:
            submit.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(
                f"flower: the run did not finish in {timeout_s:g} s:\n"
                + _tail(work / "flwr-run.log")
            ) from err
        if submit.returncode != 0 or not folder.has_summary():
            raise RuntimeError(
                f"flower: the deployed run failed (flwr run exit code {submit.returncode}, no "
                f"{folder.file(SUMMARY)}):\n" + _tail(work / "flwr-run.log")
            )
    finally:
        _stop(processes, home)
    return run_dir
