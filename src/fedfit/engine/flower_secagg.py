"""Secure aggregation for the Flower executor: Flower's SecAgg+.

With ``server.secure_aggregation = "secaggplus"`` (docs/secure-aggregation.md) a Flower run's
rounds go through Flower's SecAgg+ workflow instead of the plain Message-API loop
(``run_secure``: Flower's legacy ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))``
driving ``SecureStrategy``, the same two Server calls in a legacy Strategy), and every node's
train handler sits inside Flower's ``secaggplus_mod`` (``flower_context.secure_aggregation_mod``).
A client uploads, per global tensor, its change (upload minus download; a gradient as is) at
the tensor's top-left corner of zeros (``secagg_vector``); the mod weights it by the example
count, quantises and masks it, so the server receives only ``sum_i q_i y_i / sum_i q_i``
(``q_i`` the client's integer weight) plus, per client and in the clear, its example count,
its measured row and the names, shapes and dtypes it uploaded. ``secure_mean`` turns that
into the example-weighted mean over the clients that uploaded each value, and every summed
client's update is replaced by that mean, cut to what it declared: ``Server.close_round``
then checks each declaration against the client's download and aggregates, which for the
methods allowed (``check_secure_aggregation``) gives the aggregate of the real uploads up to
SecAgg+'s quantisation.

The executor (engine/executors/flower.py) imports this module and never the reverse: its
train handler runs the client's round and hands the result to ``masked_reply``; its
ServerApp hands ``run_secure`` its task codec (``task_content``). This module sits outside
executors/, where every module is registered as an executor.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read when flwr is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict  # noqa: E402
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
from flwr.serverapp import Grid  # noqa: E402

from fedfit.algorithms import make_algorithm  # noqa: E402
from fedfit.algorithms.base import ClientTask, Update  # noqa: E402
from fedfit.config import Config, ConfigError  # noqa: E402
from fedfit.engine.client import NO_WORK, ClientResult, ClientSide  # noqa: E402
from fedfit.engine.flower_context import NODE_WAIT_S, REPLY_TIMEOUT_S  # noqa: E402
from fedfit.engine.server import OpenRound, Server  # noqa: E402
from fedfit.engine.setup import model_fingerprint  # noqa: E402
from fedfit.engine.validation import client_failure, rejection  # noqa: E402
from fedfit.log import log  # noqa: E402
from fedfit.payload import Payload  # noqa: E402
from fedfit.server_opt import SECAGG_MODULUS  # noqa: E402

# Payload kinds whose uploads SecAgg+ can sum: tensors combined by an example-weighted mean
# over the clients that uploaded each one. Seed-and-scalar uploads are replayed client by
# client and must arrive bit-exact, which a quantised sum is not.
SUMMABLE = ("weights", "gradient", "subset")

Frame = list[tuple[str, tuple[int, ...]]]  # the global tensors, in order: (name, shape)

# A task as a Message's content (executors/flower.py ``task_content``: task, the round's
# clients, the server model's fingerprint, the planner's assignment), handed in by the
# executor, which imports this module.
TaskContent = Callable[[ClientTask, list[int], str, Mapping[str, Any] | None], RecordDict]


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
    if kind == "slices":
        raise ConfigError(
            f"{key}: {method} uploads slices of different widths per client, averaged entry "
            "by entry over the clients that hold each; SecAgg+ sums vectors of one length. Use "
            "secure_aggregation = 'none'"
        )
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
    setup, cid = node.setup, task.client_id
    return client_failure(result.row, result.update.metrics) or rejection(
        result.update,
        task,
        setup.algorithm.payload_kind,
        shard_size=len(setup.shards[cid]),
        upload_bytes=result.row["upload_bytes"],
        budget=setup.population.budgets[cid],
    )


def masked_reply(
    node: ClientSide, task: ClientTask, result: ClientResult, secagg: Mapping[str, Any]
) -> RecordDict:
    """The reply of the train handler inside ``secaggplus_mod`` (its masked-vector stage):
    one client's round (``result``, of ``task``; ``secagg`` from ``from_fitins``) as the
    legacy FitRes the mod masks. Its arrays are the client's SecAgg+ vector
    (``secagg_vector``) and its weight is the example count; its metrics carry in the clear
    what the server still reads per client: the example count, the method's metrics, the
    measured row and the declaration of what it uploaded. An update that fails the server's
    checks on the client itself is withheld: zeros of weight 0 (the protocol still
    completes) and the reason in its row, which the server then rejects."""
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
    return compat.fitres_to_recorddict(reply, keep_input=False)


def _dropped_row(round_: int) -> dict[str, Any]:
    return {
        **NO_WORK,
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
    hooks do nothing: fedfit evaluates on the server's held-out set. ``task_content``: the
    executor's codec of a task as a Message's content, which ``to_fitins`` wraps."""

    def __init__(self, server: Server, nodes: dict[int, int], task_content: TaskContent) -> None:
        self.server, self.nodes, self.task_content = server, nodes, task_content
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
                    self.task_content(
                        task, opened.clients, self.fingerprint, assigned(task.client_id)
                    ),
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


def run_secure(
    grid: Grid,
    context: Context,
    server: Server,
    nodes: dict[int, int],
    task_content: TaskContent,
) -> None:
    """The run's rounds through Flower's legacy ``DefaultWorkflow`` with the SecAgg+ fit
    workflow (``SecureStrategy``), as Flower's secure-aggregation ServerApps run it."""
    from flwr.server import LegacyContext
    from flwr.server import ServerConfig as FlowerRounds
    from flwr.server.workflow import DefaultWorkflow

    strategy = SecureStrategy(server, nodes, task_content)
    rounds = server.setup.config.run.rounds
    legacy = LegacyContext(context, config=FlowerRounds(num_rounds=rounds), strategy=strategy)
    DefaultWorkflow(fit_workflow=strategy.workflow())(grid, legacy)
