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
the round runs through Flower's SecAgg+ workflow instead (``run_secure``: Flower's legacy
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` driving ``SecureStrategy``, the
same two Server calls in a legacy Strategy), and every node's train handler sits inside
Flower's ``secaggplus_mod``. A client uploads, per global tensor, its change (upload minus
download; a gradient as is) at the tensor's top-left corner of zeros (``secagg_vector``); the
mod weights it by the example count, quantises and masks it, so the server receives only
``sum_i q_i y_i / sum_i q_i`` (``q_i`` the client's integer weight) plus, per client and in
the clear, its example count, its measured row and the names, shapes and dtypes it uploaded.
``secure_mean`` turns that into the example-weighted mean over the clients that uploaded
each value, and every summed client's update is replaced by that mean, cut to what it
declared: ``Server.close_round`` then checks each declaration against the client's download
and aggregates, which for the methods allowed (``check_secure_aggregation``) gives the
aggregate of the real uploads up to SecAgg+'s quantisation.

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
import math
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
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
from flwr.common import (  # noqa: E402
    Code,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat  # noqa: E402
from flwr.server.client_manager import ClientManager  # noqa: E402
from flwr.server.client_proxy import ClientProxy  # noqa: E402
from flwr.server.strategy import Strategy as LegacyStrategy  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import Strategy  # noqa: E402

from fedfit.algorithms import make_algorithm  # noqa: E402
from fedfit.algorithms.base import ClientTask, ServerState, Update  # noqa: E402
from fedfit.config import Config, ConfigError, from_toml, to_toml  # noqa: E402
from fedfit.engine.client import ClientResult, ClientSide, worker_threads  # noqa: E402
from fedfit.engine.executors import base  # noqa: E402
from fedfit.engine.executors.ray import import_ray  # noqa: E402
from fedfit.engine.flower_context import (  # noqa: E402
    CONFIG_KEY,
    answer_query,
    node_partition,
    run_config_text,
    secure_aggregation_mod,
)
from fedfit.engine.processes import stop_processes, with_descendants  # noqa: E402
from fedfit.engine.runfolder import SUMMARY, RunFolder  # noqa: E402
from fedfit.engine.server import OpenRound, ProgressFn, Server  # noqa: E402
from fedfit.engine.setup import build, model_fingerprint  # noqa: E402
from fedfit.engine.validation import rejection  # noqa: E402
from fedfit.errors import RunStopped  # noqa: E402
from fedfit.log import log  # noqa: E402
from fedfit.payload import Payload  # noqa: E402
from fedfit.server_opt import SECAGG_MODULUS  # noqa: E402

NODE_WAIT_S = 120.0  # how long the ServerApp waits for the nodes of every client
REPLY_TIMEOUT_S = 3600.0  # per round


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
    """The ClientApp's train handler: one fedfit client's round on this node (under secure
    aggregation, the masked-vector stage of SecAgg+: ``train_secure``)."""
    node = node_client(config_text)
    if node.setup.config.server.secure_aggregation == "secaggplus":
        return train_secure(message, context, node)
    task, clients, fingerprint = task_from_content(message.content)
    result = run_task(node, context, task, clients, fingerprint)
    return Message(result_content(result), reply_to=message)


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


# ------------------------------------------------------------------ secure aggregation (SecAgg+)

# Payload kinds whose uploads SecAgg+ can sum: tensors combined by an example-weighted mean
# over the clients that uploaded each one. Seed-and-scalar uploads are replayed client by
# client and must arrive bit-exact, which a quantised sum is not.
SUMMABLE = ("weights", "gradient", "subset")

Frame = list[tuple[str, tuple[int, ...]]]  # the global tensors, in order: (name, shape)


def _flower_count(value: float) -> int | float:
    """A ``secagg_*`` count or fraction as Flower takes it: an int above 1, else a float."""
    return int(value) if value > 1 else float(value)


def check_secure_aggregation(config: Config, payload_kind: str | None = None) -> None:
    """ConfigError when ``server.secure_aggregation = "secaggplus"`` cannot apply to this run
    (nothing to check when it is "none"). ``payload_kind``: the method's, when the caller has
    its instance (it is read from a fresh one otherwise)."""
    server = config.server
    if server.secure_aggregation == "none":
        return
    key, method = "server.secure_aggregation", config.method.name
    kind = payload_kind or make_algorithm(config).payload_kind
    if kind not in SUMMABLE:
        raise ConfigError(
            f"{key}: {method} uploads seeds and projected-gradient scalars, which its "
            "aggregate replays client by client and which must arrive bit-exact; SecAgg+ hands "
            "the server one quantised sum of tensors. Use a method that uploads tensors "
            "(weights, gradients or a share of them) or secure_aggregation = 'none'"
        )
    if server.aggregation != "mean" or server.clip_norm:
        raise ConfigError(
            f"{key}: server.aggregation = {server.aggregation!r} / server.clip_norm = "
            f"{server.clip_norm:g} need every client's upload at the server, and SecAgg+ "
            "shows it only their sum; use server.aggregation = 'mean' and clip_norm = 0"
        )
    if config.privacy.enabled:
        raise ConfigError(
            f"{key}: DP-FedAvg ([privacy]) clips every client's change at a trusted server, "
            "which SecAgg+ hides; set privacy.noise_multiplier = 0"
        )
    if config.model.head_init == "ncm":
        raise ConfigError(
            f"{key}: model.head_init = 'ncm' computes every client's class sums on the server "
            "in round 0, outside SecAgg+; use model.head_init = 'random'"
        )
    per_round = config.data.clients_per_round
    if per_round < 3:
        raise ConfigError(
            f"{key}: data.clients_per_round = {per_round}; SecAgg+ needs at least 3 clients "
            "per round (with 2, each one learns the other's upload from the sum)"
        )
    if per_round * server.secagg_quantization_range >= SECAGG_MODULUS:
        raise ConfigError(
            f"server.secagg_quantization_range: {per_round} clients x "
            f"{server.secagg_quantization_range} levels overflow SecAgg+'s modulus 2**32; "
            "lower it or data.clients_per_round"
        )
    shares, threshold = server.secagg_num_shares, server.secagg_reconstruction_threshold
    if threshold > 1 and threshold > min(per_round, shares if shares > 1 else per_round):
        raise ConfigError(
            f"server.secagg_reconstruction_threshold: {threshold:g} shares can never be "
            f"gathered from {min(per_round, shares if shares > 1 else per_round):g} neighbours"
        )


def secagg_max_weight(shard_sizes: Iterable[int], quantization_range: int) -> float:
    """Flower's ``max_weight`` for these clients: SecAgg+ weights a client by
    ``q = round(n / max_weight * quantization_range)``; with ``max_weight = Q / (Q // N)`` for
    the largest shard N, ``q = n * (Q // N)`` exactly, so the sum is weighted by the example
    counts themselves and no weight exceeds 1 (``n / max_weight <= 1``)."""
    largest = max(shard_sizes)
    step = quantization_range // largest
    if step < 1:
        raise ConfigError(
            f"server.secagg_quantization_range: {quantization_range} is below the largest "
            f"client's {largest} examples; raise it"
        )
    return quantization_range / step


def secagg_weight(num_examples: int, max_weight: float, quantization_range: int) -> int:
    """A client's integer weight in the SecAgg+ sum, computed as Flower's mod computes it."""
    return round(num_examples / max_weight * quantization_range)


def _corner(shape: Iterable[int]) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in shape)


def secagg_vector(
    payload: Mapping[str, torch.Tensor], download: Payload, frame: Frame, gradient: bool
) -> list[np.ndarray]:
    """What one client's SecAgg+ vector holds before Flower's mod weights, quantises and
    masks it: per global tensor of ``frame`` (in order, float64), the client's change (its
    upload minus its download; a gradient as is) in the top-left corner of zeros of the
    global shape. A tensor the client did not upload stays zero (layer-wise methods), a part
    of one fills its corner (HetLoRA's lower ranks); every client's vector has the same
    shapes, so the sum is defined."""
    vector = {name: np.zeros(shape) for name, shape in frame}
    for name, tensor in payload.items():
        if name not in vector:
            raise ValueError(f"{name}: not one of the global tensors SecAgg+ sums")
        change = tensor.detach().to(torch.float64)
        if not gradient:
            change = change - download[name].to(torch.float64)
        shape = vector[name].shape
        if change.dim() != len(shape) or any(
            a > b for a, b in zip(change.shape, shape, strict=True)
        ):
            raise ValueError(
                f"{name}: shape {tuple(change.shape)} does not fit the global {tuple(shape)}"
            )
        vector[name][_corner(change.shape)] = change.numpy()
    return list(vector.values())


@dataclass
class Summand:
    """One client's part in a SecAgg+ sum as the server knows it: its integer weight (Flower's
    ``q``), what it declared it uploaded (name -> shape, dtype) and its download (what its
    changes are against; the tasks are the server's own)."""

    weight: int
    declared: dict[str, tuple[tuple[int, ...], torch.dtype]]
    download: Payload


def secure_mean(
    average: Sequence[np.ndarray], frame: Frame, summands: Sequence[Summand], gradient: bool
) -> list[dict[str, torch.Tensor]]:
    """Per summand, the upload the server aggregates in its place, from SecAgg+'s output.

    SecAgg+ gives ``average_t = sum_i q_i y_i,t / sum_i q_i`` per global tensor t (``y`` as
    in ``secagg_vector``, the sum over every client whose vector was summed). Per element,
    with ``D`` the summed weight of the clients whose upload covers that element (from the
    declarations) and ``d_i`` client i's download (zero for gradients),

        mean_t = (average_t * sum_i q_i + sum_{i covers} q_i d_i,t) / D_t
               = sum_{i covers} q_i x_i,t / D_t,

    the example-weighted mean of the uploads x over the clients that uploaded that value.
    Each summand's stand-in is that mean cut to the shapes it declared, in its dtypes. For
    an aggregate that is the example-weighted mean over the clients holding each tensor,
    zero-padded or renormalised (every method ``check_secure_aggregation`` allows), the
    aggregate of the stand-ins is the aggregate of the real uploads: each tensor's holders
    all hold the same value, whose mean over them is that value (HetLoRA: row j of the
    padded mean is ``mean_j * D_j / sum_i q_i``, as with the real uploads).
    """
    total = float(sum(s.weight for s in summands))
    means: dict[str, torch.Tensor] = {}
    for (name, shape), summed in zip(frame, average, strict=True):
        holders = [s for s in summands if name in s.declared]
        if not holders:
            continue
        weight = torch.zeros(shape, dtype=torch.float64)
        numerator = torch.from_numpy(np.asarray(summed, dtype=np.float64) * total)
        for s in holders:
            part = _corner(s.declared[name][0])
            weight[part] += s.weight
            if not gradient:
                numerator[part] += s.weight * s.download[name].to(torch.float64)
        means[name] = numerator / weight.clamp_min(1.0)
    cut: dict[tuple[str, tuple[int, ...], torch.dtype], torch.Tensor] = {}
    stand_ins = []
    for s in summands:
        payload = {}
        for name, (shape, dtype) in s.declared.items():
            if (name, shape, dtype) not in cut:
                cut[name, shape, dtype] = means[name][_corner(shape)].to(dtype)
            payload[name] = cut[name, shape, dtype]
        stand_ins.append(payload)
    return stand_ins


def declaration(payload: Mapping[str, torch.Tensor]) -> dict[str, list[Any]]:
    """What a client declares in the clear beside its masked vector: each tensor's name,
    shape and dtype (the structure the server assigned it, not its values)."""
    return {n: [list(t.shape), str(t.dtype).removeprefix("torch.")] for n, t in payload.items()}


def parse_declaration(
    declared: Mapping[str, Any],
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Inverse of ``declaration``; ValueError for a dtype torch does not have."""
    out = {}
    for name, (shape, dtype_name) in declared.items():
        dtype = getattr(torch, str(dtype_name), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{name}: unknown dtype {dtype_name!r}")
        out[name] = (tuple(int(n) for n in shape), dtype)
    return out


def to_fitins(content: RecordDict, secagg: Mapping[str, Any]) -> FitIns:
    """A task's Message content (``task_content``) as the legacy FitIns that Flower's SecAgg+
    workflow sends, with the SecAgg+ settings a client needs (``secagg``: the global tensors'
    frame, Flower's max_weight, the clipping range) beside it."""
    names, arrays = [], []
    for key, record in content.array_records.items():
        for name, array in record.items():
            names.append([key, name])
            arrays.append(array.numpy())
    config: dict[str, Scalar] = {
        f"record.{key}": json.dumps(dict(record)) for key, record in content.config_records.items()
    }
    config["arrays"] = json.dumps(names)
    config["secagg"] = json.dumps(secagg)
    return FitIns(ndarrays_to_parameters(arrays), config)


def from_fitins(content: RecordDict) -> tuple[RecordDict, dict[str, Any]]:
    """Inverse of ``to_fitins``, from the Message a client's train handler gets inside
    ``secaggplus_mod``: (the task's content, the SecAgg+ settings)."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    config = fitins.config
    task = RecordDict()
    arrays = parameters_to_ndarrays(fitins.parameters)
    for (key, name), array in zip(json.loads(str(config["arrays"])), arrays, strict=True):
        if key not in task.array_records:
            task[key] = ArrayRecord()
        task.array_records[key][name] = Array(array)
    for key, value in config.items():
        if key.startswith("record."):
            task[key.removeprefix("record.")] = ConfigRecord(json.loads(str(value)))
    return task, json.loads(str(config["secagg"]))


def own_rejection(node: ClientSide, result: ClientResult, task: ClientTask) -> str | None:
    """Why this client's own update must not enter the sum: the server's checks
    (``Server.rejection``), run by the client on itself, since the server will not see it."""
    if "error" in result.row:
        return f"the client failed: {result.row['error']}"
    loss = result.update.metrics.get("train_loss")
    if isinstance(loss, float) and not math.isfinite(loss):
        return f"its training loss is {loss} (the client's training diverged)"
    setup, cid = node.setup, task.client_id
    return rejection(
        result.update,
        task,
        setup.algorithm.payload_kind,
        shard_size=len(setup.shards[cid]),
        upload_bytes=result.row["upload_bytes"],
        budget=setup.population.budgets[cid],
    )


def train_secure(message: Message, context: Context, node: ClientSide) -> Message:
    """The train handler inside ``secaggplus_mod`` (its masked-vector stage): one client's
    round, replied as the legacy FitRes the mod masks. Its arrays are the client's SecAgg+
    vector (``secagg_vector``) and its weight is the example count; its metrics carry in the
    clear what the server still reads per client: the example count, the method's metrics,
    the measured row and the declaration of what it uploaded. An update that fails the
    server's checks on the client itself is withheld: zeros of weight 0 (the protocol still
    completes) and the reason in its row, which the server then rejects."""
    content, secagg = from_fitins(message.content)
    task, clients, fingerprint = task_from_content(content)
    result = run_task(node, context, task, clients, fingerprint)
    update = result.update
    frame: Frame = [(name, tuple(shape)) for name, shape in secagg["frame"]]
    gradient = node.setup.algorithm.payload_kind == "gradient"
    reason = own_rejection(node, result, task)
    if reason is None:
        try:
            vector = secagg_vector(update.payload, task.download, frame, gradient)
        except ValueError as err:
            reason = str(err)
    if reason is not None:
        vector = [np.zeros(shape) for _, shape in frame]
        result.row["error"] = f"withheld from the SecAgg+ sum: {reason}"
    weight = update.num_examples if reason is None else 0
    # SecAgg+ clips weight * value to +-clipping_range (weight = n / max_weight <= 1)
    bound = float(secagg["clipping_range"]) * float(secagg["max_weight"]) / max(weight, 1)
    result.row["secagg_clipped"] = int(sum(int((np.abs(v) > bound).sum()) for v in vector))
    # the masked vector: one int64 per value, plus the weight
    result.row["secagg_upload_bytes"] = 8 * (1 + sum(int(v.size) for v in vector))
    info = {
        "client_id": update.client_id,
        "metrics": update.metrics,
        "row": result.row,
        "declared": declaration(update.payload) if reason is None else {},
    }
    reply = FitRes(
        Status(Code.OK, ""),
        ndarrays_to_parameters(vector),
        weight,
        {"fedfit": json.dumps(info)},
    )
    return Message(compat.fitres_to_recorddict(reply, keep_input=False), reply_to=message)


def _dropped_row(round_: int) -> dict[str, Any]:
    return {
        "num_examples": 0,
        "steps": 0,
        "train_loss": None,
        "upload_bytes": 0,
        "flops": 0,
        "peak_memory_bytes": None,
        "memory": {},
        "wall_s": 0.0,
        "error": f"no masked vector in round {round_}: it dropped out of SecAgg+",
    }


class SecureStrategy(LegacyStrategy):
    """fedfit's round as a legacy Flower Strategy, for Flower's SecAgg+ workflow (which only
    drives the legacy API): ``configure_fit`` opens the round (``Server.open_round``) and
    turns each task into a FitIns; ``aggregate_fit`` receives every summed client's FitRes
    (its arrays replaced by SecAgg+'s average, its metrics its own) and closes the round
    (``Server.close_round``) on the stand-ins of ``secure_mean``. Flower's own evaluation
    hooks do nothing: fedfit evaluates on the server's held-out set."""

    def __init__(self, server: Server, nodes: dict[int, int]) -> None:
        self.server, self.nodes = server, nodes
        self.fingerprint = model_fingerprint(server.setup.model)
        cfg = server.setup.config.server
        self.quantization_range = cfg.secagg_quantization_range
        self.clipping_range = cfg.secagg_clipping_range
        self.max_weight = secagg_max_weight(
            (len(server.setup.shards[c]) for c in server.setup.eligible), self.quantization_range
        )
        self.opened: OpenRound | None = None

    def workflow(self) -> Callable[[Grid, Context], None]:
        """Flower's SecAgg+ fit workflow with this run's parameters, and what fedfit adds: a
        round the protocol abandoned stops the run with the reason."""
        from flwr.server.workflow import SecAggPlusWorkflow

        cfg = self.server.setup.config.server
        secagg = SecAggPlusWorkflow(
            num_shares=_flower_count(cfg.secagg_num_shares),
            reconstruction_threshold=_flower_count(cfg.secagg_reconstruction_threshold),
            max_weight=self.max_weight,
            clipping_range=self.clipping_range,
            quantization_range=self.quantization_range,
            modulus_range=SECAGG_MODULUS,
            timeout=REPLY_TIMEOUT_S,
        )

        def fit(grid: Grid, context: Context) -> None:
            round_ = self.server.next_round
            try:
                secagg(grid, context)
            except ZeroDivisionError:  # Flower divides by the summed weights
                if self.server.state.round >= round_:
                    raise
                self.server.stop(
                    f"round {round_}: every client withheld its update from the SecAgg+ sum "
                    "(each failed, or failed the server's checks on itself)"
                )
            if self.server.state.round < round_:
                self.server.stop(
                    f"round {round_}: SecAgg+ abandoned the round (fewer than "
                    f"server.secagg_reconstruction_threshold clients answered one of its "
                    "stages, or too few shares came back to unmask the sum; Flower's log "
                    "says which)"
                )

        return fit

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return Parameters(tensors=[], tensor_type="")  # the global model is the Server's

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        opened = self.opened = self.server.open_round(server_round)
        proxies = self._proxies(client_manager, [self.nodes[c] for c in opened.clients])
        secagg = {
            "frame": [[n, list(t.shape)] for n, t in self.server.state.params.items()],
            "max_weight": self.max_weight,
            "clipping_range": self.clipping_range,
        }
        assigned = self.server.assigned
        return [
            (
                proxies[self.nodes[task.client_id]],
                to_fitins(
                    task_content(task, opened.clients, self.fingerprint, assigned(task.client_id)),
                    secagg,
                ),
            )
            for task in opened.tasks
        ]

    @staticmethod
    def _proxies(client_manager: ClientManager, node_ids: list[int]) -> dict[int, ClientProxy]:
        """The client manager's proxies of ``node_ids`` (its thread registers nodes)."""
        deadline = time.monotonic() + NODE_WAIT_S
        while True:
            proxies = {int(p.node_id): p for p in client_manager.all().values()}
            missing = [n for n in node_ids if n not in proxies]
            if not missing:
                return proxies
            if time.monotonic() > deadline:
                raise RuntimeError(f"flower: nodes {missing} are gone from the client manager")
            time.sleep(0.5)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        opened = self.opened
        assert opened is not None and opened.round == server_round, "configure_fit first"
        server = self.server
        for failure in failures:
            log(f"flower: round {server_round}: a SecAgg+ stage failed on a node: {failure}")
        replies: dict[int, tuple[dict[str, Any], int]] = {}
        node_client_ids = {node: cid for cid, node in self.nodes.items()}
        for proxy, fitres in results:
            info = json.loads(str(fitres.metrics["fedfit"]))
            replies[node_client_ids[int(proxy.node_id)]] = (info, int(fitres.num_examples))
        average = parameters_to_ndarrays(results[0][1].parameters) if results else []
        frame: Frame = [(n, tuple(t.shape)) for n, t in server.state.params.items()]
        summed: dict[int, Summand] = {}
        reasons: dict[int, str] = {}
        for cid, (task, _) in zip(opened.clients, opened.sent, strict=True):
            if cid in replies and replies[cid][1] > 0:
                info, n = replies[cid]
                try:
                    declared = parse_declaration(info["declared"])
                except ValueError as err:
                    reasons[cid] = f"its declaration: {err}"
                    declared = {}
                weight = secagg_weight(n, self.max_weight, self.quantization_range)
                summed[cid] = Summand(weight, declared, task.download)
        gradient = server.setup.algorithm.payload_kind == "gradient"
        stand_ins = dict(
            zip(summed, secure_mean(average, frame, list(summed.values()), gradient), strict=True)
        )
        ordered = []
        for cid, (task, _) in zip(opened.clients, opened.sent, strict=True):
            if cid not in replies:
                ordered.append(ClientResult(Update(cid, {}, 0, {}), _dropped_row(server_round)))
                continue
            info, n = replies[cid]
            update = Update(int(info["client_id"]), stand_ins.get(cid, {}), n, info["metrics"])
            result = ClientResult(update, info["row"])
            if cid in summed and cid not in reasons:
                reason = server.rejection(result, task)
                if reason is not None:
                    reasons[cid] = reason
            ordered.append(result)
        if reasons:
            server.stop(
                f"round {server_round}: "
                + "; ".join(f"client {c}: {why}" for c, why in reasons.items())
                + ". Under SecAgg+ an update already in the sum cannot be taken out of it, so "
                "the round cannot be aggregated"
            )
        clipped = sum(int(r.row.get("secagg_clipped", 0)) for r in ordered)
        if clipped:
            log(
                f"flower: round {server_round}: SecAgg+ clipped {clipped} values to "
                f"+-{self.clipping_range:g}; raise server.secagg_clipping_range"
            )
        row = server.close_round(opened, ordered)
        self.opened = None
        return None, {
            "train_loss": float(row["train_loss"]),
            "upload_bytes": int(row["upload_bytes"]),
            "client_flops": float(row["client_flops"]),
        }

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, Any]]:
        return []  # the global model is evaluated on the server's held-out set (Server)

    def aggregate_evaluate(
        self, server_round: int, results: list[Any], failures: list[Any]
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return None


def run_secure(grid: Grid, context: Context, server: Server, nodes: dict[int, int]) -> None:
    """The run's rounds through Flower's legacy ``DefaultWorkflow`` with the SecAgg+ fit
    workflow (``SecureStrategy``), as Flower's secure-aggregation ServerApps run it."""
    from flwr.server import LegacyContext
    from flwr.server import ServerConfig as FlowerRounds
    from flwr.server.workflow import DefaultWorkflow

    strategy = SecureStrategy(server, nodes)
    rounds = server.setup.config.run.rounds
    legacy = LegacyContext(context, config=FlowerRounds(num_rounds=rounds), strategy=strategy)
    DefaultWorkflow(fit_workflow=strategy.workflow())(grid, legacy)


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
        run_secure(grid, context, server, nodes)
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
    folder = RunFolder(Path(config.run.output_dir).expanduser().resolve() / config.run.name)
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
