"""Secure aggregation (Flower's SecAgg+) in the Flower executor: the sum form against every
allowed method's aggregate; three SuperNodes, in Flower's simulation and in a real loopback
deployment, against the local executor's plain aggregate within SecAgg+'s quantisation
bound; and the refusals.

Costs (2 cores): the simulation test about 40-60 s (Ray, three actors building their setup
once, the protocol's four stages per round); the deployment test about as long as the old
two-node plain deployment test (SuperLink, three SuperNodes, the ServerApp process, and a
fresh ``flwr-clientapp`` process per message: three load torch, fedfit and the model to
train, the key-exchange stages' load Flower only); the local plain run both compare with is
run once for the module; the rest well under a second.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fedfit.algorithms import make_algorithm
from fedfit.algorithms.base import ServerState, Update
from fedfit.config import load_config
from fedfit.engine.executors.flower import deploy_local, write_app
from fedfit.engine.experiment import run
from fedfit.engine.flower_secagg import (
    Summand,
    check_secure_aggregation,
    secagg_max_weight,
    secagg_vector,
    secagg_weight,
    secure_mean,
)
from fedfit.engine.runfolder import RunFolder
from fedfit.errors import ConfigError
from tests.helpers import TINY_RUN, processes_of, read_rows, tiny_run_config

SECAGG = "server.secure_aggregation=secaggplus"


# ---------------------------------------------------------------- the sum form, exactly


def _exact_sum(vectors: list[list[np.ndarray]], weights: list[int]) -> list[np.ndarray]:
    """What SecAgg+ returns, without its quantisation: sum_i q_i y_i / sum_i q_i."""
    total = sum(weights)
    return [
        sum(q * v[k] for v, q in zip(vectors, weights, strict=True)) / total
        for k in range(len(vectors[0]))
    ]


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("fedavg", []),
        ("fedsgd", []),
        ("layers", ["method.aggregation=weighted"]),
        ("layers", ["method.aggregation=r_weighted"]),
        ("hetlora", []),
        ("partial", []),
    ],
)
def test_the_secure_sum_gives_each_methods_own_aggregate(method: str, options: list[str]) -> None:
    """Uploads shaped as each method's clients shape them (all tensors; a subset per client,
    layers and partial; lower-rank corners, HetLoRA), summed as SecAgg+ sums them: the
    aggregate of ``secure_mean``'s stand-ins equals the aggregate of the real uploads."""
    config = load_config(None, [f"method.name={method}", *options])
    algorithm = make_algorithm(config)
    gradient = algorithm.payload_kind == "gradient"
    g = torch.Generator().manual_seed(0)
    params = {
        "a.lora_A.w": torch.randn(4, 3, generator=g, dtype=torch.float64),
        "a.lora_B.w": torch.randn(5, 4, generator=g, dtype=torch.float64),
        "head": torch.randn(2, generator=g, dtype=torch.float64),
    }
    state = ServerState(3, params)
    frame = [(n, tuple(t.shape)) for n, t in params.items()]
    counts = [7, 12, 3]
    downloads = [params] * 3
    if method == "hetlora":  # ranks 4, 2, 1: A's first rows, B's first columns
        a, b = params["a.lora_A.w"], params["a.lora_B.w"]
        downloads = [
            {"a.lora_A.w": a[:r], "a.lora_B.w": b[:, :r], "head": params["head"]} for r in (4, 2, 1)
        ]
    names = {  # what each client uploads
        "layers": [["head", "a.lora_B.w", "a.lora_A.w"], ["head", "a.lora_B.w"], ["head"]],
        "partial": [["a.lora_A.w"], ["a.lora_B.w", "head"], ["a.lora_A.w", "head"]],
    }.get(method, [list(params)] * 3)

    def trained(download: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        noise = torch.randn(download[name].shape, generator=g, dtype=torch.float64)
        return download[name] + noise

    updates = [
        Update(i, {n: trained(d, n) for n in ns}, c)
        for i, (d, ns, c) in enumerate(zip(downloads, names, counts, strict=True))
    ]
    vectors = [
        secagg_vector(u.payload, d, frame, gradient)
        for u, d in zip(updates, downloads, strict=True)
    ]
    max_weight = secagg_max_weight(counts, 2**22)
    weights = [secagg_weight(c, max_weight, 2**22) for c in counts]
    assert weights == [c * (2**22 // 12) for c in counts]  # exactly proportional to the counts
    summands = [
        Summand(q, {n: (tuple(t.shape), t.dtype) for n, t in u.payload.items()}, d)
        for q, u, d in zip(weights, updates, downloads, strict=True)
    ]
    stand_ins = secure_mean(_exact_sum(vectors, weights), frame, summands, gradient)
    for u, s in zip(updates, stand_ins, strict=True):  # what the server validates per client
        assert {n: t.shape for n, t in s.items()} == {n: t.shape for n, t in u.payload.items()}
    secure = [
        Update(u.client_id, s, u.num_examples) for u, s in zip(updates, stand_ins, strict=True)
    ]
    want = algorithm.aggregate(state, updates).params
    got = algorithm.aggregate(state, secure).params
    for name in params:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-12)


# ---------------------------------------------------------------- three SuperNodes

CLIP, LEVELS = 0.5, 2**16  # coarse enough that SecAgg+'s rounding shows, far above 1e-6

# Three clients (one per SuperNode), all in the one round: with one round the bound holds as
# derived (a second round would train from downloads already apart by the rounding).
TINY = [
    *TINY_RUN,
    "data.num_clients=3",
    "data.clients_per_round=3",
    "run.rounds=1",
    "run.threads=1",
    f"server.secagg_clipping_range={CLIP}",
    f"server.secagg_quantization_range={LEVELS}",
]


def _config(tmp_path: Path, *extra: str):
    return tiny_run_config(tmp_path, *extra, base=TINY)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The local executor's plain run of TINY, which both SecAgg+ runs are compared with."""
    return run(_config(tmp_path_factory.mktemp("plain"), "run.name=plain"), plots=False)


def _assert_within_quantisation(plain: Path, secure: Path) -> None:
    """The SecAgg+ run folder ``secure`` against the plain one: the same rows per client,
    and every global value within SecAgg+'s quantisation bound of the plain aggregate.

    Bound, per value: each client's weighted change ``q_i / Q * y_i`` is stochastically
    rounded to a multiple of ``2c / Q`` (error < one step; nothing is clipped since
    |y| < c), so the summed error is < ``k * 2c / Q`` and, divided by the summed weight
    ``sum_i q_i / Q`` with ``q_i = n_i * (Q // N)`` (N the largest shard), the mean's error is
    < ``2 c k / ((Q // N) * sum_i n_i)``; plus float32 rounding of the stored model."""
    clients = read_rows(secure / "clients.jsonl")
    plain_clients = read_rows(plain / "clients.jsonl")
    assert [c["client_id"] for c in clients] == [0, 1, 2]
    for c, p in zip(clients, plain_clients, strict=True):  # rows still come back per client
        for key in ("num_examples", "steps", "upload_bytes", "flops"):
            assert c[key] == p[key], key
        assert c["train_loss"] == pytest.approx(p["train_loss"], abs=1e-6)
        assert c["secagg_clipped"] == 0 and "rejected" not in c
        assert c["secagg_upload_bytes"] > c["upload_bytes"]  # int64 per value of every tensor
    counts = [c["num_examples"] for c in clients]
    bound = 2 * CLIP * len(counts) / ((LEVELS // max(counts)) * sum(counts))
    want = RunFolder(plain).load_checkpoint()[0].params
    got = RunFolder(secure).load_checkpoint()[0].params
    assert got.keys() == want.keys()
    worst = max(float((got[n].double() - want[n].double()).abs().max()) for n in want)
    ulp = max(float(want[n].abs().max()) for n in want) * 2**-23
    print(f"SecAgg+ vs plain aggregate: max |diff| = {worst:.3g}, bound = {bound:.3g} (+{ulp:.2g})")
    assert 0 < worst <= bound + 2 * ulp  # quantised (not the plain path), and within the bound
    rows = read_rows(secure / "rounds.jsonl")
    assert rows[-1]["eval"]["loss"] == pytest.approx(
        read_rows(plain / "rounds.jsonl")[-1]["eval"]["loss"], abs=1e-3
    )


def test_secaggplus_aggregate_equals_the_plain_one_within_its_quantisation(
    tmp_path: Path, plain: Path
) -> None:
    """LoRA on three virtual SuperNodes (Flower's simulation) through SecAgg+ (num_shares 3,
    threshold 2): the global model after the round against the local executor's plain
    aggregate, within the quantisation bound (``_assert_within_quantisation``)."""
    secure = run(
        _config(tmp_path, "run.name=secure", "run.executor=flower", "run.workers=3", SECAGG),
        plots=False,
    )
    _assert_within_quantisation(plain, secure)
    assert len({c["node_id"] for c in read_rows(secure / "clients.jsonl")}) == 3


def test_secaggplus_on_a_loopback_deployment_equals_the_plain_aggregate(
    tmp_path: Path, plain: Path
) -> None:
    """Acceptance: a SuperLink and three SuperNodes on 127.0.0.1 as separate processes
    (``deploy_local``, Flower's network transport), one round of LoRA through SecAgg+: the
    global model equals the local executor's plain aggregate within the quantisation bound,
    and every process the deployment started is stopped. (The plain path over a deployment is
    the simulation's equality to the local executor, test_flower.py, plus the same transport
    here.)"""
    work = tmp_path / "deploy"
    try:
        secure = deploy_local(_config(tmp_path, "run.name=deployed", SECAGG), work)
    finally:
        left = processes_of(work.resolve() / "flwr-home")
        assert not left, f"processes left running: {[p.cmdline() for p in left]}"
    _assert_within_quantisation(plain, secure)
    clients = read_rows(secure / "clients.jsonl")
    # Each SuperNode trained its own client (the node checks its partition-id against the
    # task), each in a fresh flwr-clientapp process (Flower 1.41: one per message).
    assert len({c["node_id"] for c in clients}) == 3
    pids = {c["pid"] for c in clients}
    assert len(pids) == 3 and os.getpid() not in pids
    assert "Successfully started run" in (work / "flwr-run.log").read_text()


# ---------------------------------------------------------------- refusals


def test_a_seed_and_scalar_method_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path, "method.name=fedkseed", "run.executor=flower", SECAGG)
    with pytest.raises(ConfigError, match="fedkseed uploads seeds and projected-gradient"):
        run(config, plots=False)
    with pytest.raises(ConfigError, match="bit-exact"):  # fedfit flower app / local too
        write_app(config, tmp_path / "app")


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["server.aggregation=median"], "need every client's upload"),
        (["server.clip_norm=1.0"], "need every client's upload"),
        (["privacy.noise_multiplier=1.0"], "DP-FedAvg"),
        (["model.head_init=ncm"], "class sums"),
        (["data.clients_per_round=2"], "at least 3 clients"),
        (["server.secagg_quantization_range=2147483648"], "overflow"),
        (["server.secagg_reconstruction_threshold=3"], "must be < server.secagg_num_shares"),
        (["server.secagg_num_shares=2"], "count > 2"),
        (["method.name=spry", "method.communication=iteration"], "seeds and projected"),
    ],
)
def test_what_secaggplus_cannot_sum_is_refused(
    tmp_path: Path, extra: list[str], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        check_secure_aggregation(_config(tmp_path, SECAGG, *extra))


def test_methods_whose_uploads_sum_are_accepted(tmp_path: Path) -> None:
    for method in ("lora", "fedsgd", "layers", "hetlora", "partial", "fedmezo", "fwdllm"):
        check_secure_aggregation(_config(tmp_path, SECAGG, f"method.name={method}"))
    check_secure_aggregation(_config(tmp_path, "method.name=fedkseed"))  # "none": no check
