"""The Flower executor against the local one: the wire records, Flower's simulation runtime
and a deployment that is cut short (a SuperLink and two SuperNodes as separate processes on
127.0.0.1). A whole deployment (three SuperNodes, through SecAgg+) against the local
executor is tests/engine/test_secagg.py's: one deployment start-up for both checks.

Costs (2 cores): the simulation tests about 45 s each (Ray and two actors start, each builds
its setup once); the cut deployment a few seconds; the rest well under a second.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedfit.algorithms.base import ClientTask, Update
from fedfit.engine.executors.flower import (
    ClientResult,
    deploy_local,
    result_content,
    result_from_content,
    task_content,
    task_from_content,
    write_app,
)
from fedfit.engine.experiment import run
from fedfit.errors import ConfigError
from tests.helpers import (
    TINY_RUN,
    assert_same_as_local,
    processes_of,
    read_rows,
    tiny_run_config,
)

# Two clients (one per SuperNode), both in every round, two rounds.
TINY = [
    *TINY_RUN,
    "data.num_clients=2",
    "data.clients_per_round=2",
    "run.rounds=2",
    "run.threads=1",
]


def tiny(tmp_path: Path, *extra: str):
    return tiny_run_config(tmp_path, *extra, base=TINY)


def test_task_and_result_cross_the_wire_unchanged() -> None:
    download = {
        "w": torch.randn(3, 4),
        "seeds": torch.tensor([3, 5, 2**40], dtype=torch.int64),
        "scalar": torch.tensor(0.25),
    }
    start = {"a": torch.randn(2), "b": torch.arange(6, dtype=torch.int32).reshape(2, 3)}
    task = ClientTask(7, 3, 123456789, download, {"blocks": [0, 2], "depth": 4, "start": start})
    assigned = {"tier": "phone", "budget": {"memory_bytes": 2**30}, "predicted": {"flops": 5}}
    sent_content = task_content(task, [1, 7, 9], "abc", assigned)
    got, clients, fingerprint = task_from_content(sent_content)
    assert got.config.pop("assigned") == assigned  # the device learns its budget and plan
    assert (got.client_id, got.round, got.seed) == (7, 3, 123456789)
    assert (clients, fingerprint) == ([1, 7, 9], "abc")
    assert got.config["blocks"] == [0, 2] and got.config["depth"] == 4
    for sent, received in ((download, got.download), (start, got.config["start"])):
        assert list(received) == list(sent)  # names and order
        for name, tensor in sent.items():
            assert received[name].dtype == tensor.dtype
            assert torch.equal(received[name], tensor)

    update = Update(7, {"lora_A": torch.randn(8, 5)}, 64, {"train_loss": 1.5, "steps": 4})
    row = {"flops": 123, "memory": {"peak_bytes": 10}, "train_loss": 1.5, "wall_s": 0.1}
    back = result_from_content(result_content(ClientResult(update, row)))
    assert back.row == row
    assert (back.update.client_id, back.update.num_examples) == (7, 64)
    assert back.update.metrics == update.metrics
    assert torch.equal(back.update.payload["lora_A"], update.payload["lora_A"])


def test_a_task_config_that_cannot_travel_is_named() -> None:
    task = ClientTask(1, 1, 0, {"w": torch.zeros(1)}, {"odd": object()})
    with pytest.raises(TypeError, match=r"\['odd'\] of client 1"):
        task_content(task, [1], "x")


def test_flower_executor_refuses_resume(tmp_path: Path) -> None:
    config = tiny(tmp_path, "run.executor=flower")
    with pytest.raises(ConfigError, match="whole run"):
        run(config, stop_after=1)


def test_write_app_names_fedfit_components(tmp_path: Path) -> None:
    import tomllib

    from fedfit.config import from_toml

    config = tiny(tmp_path, "run.output_dir=rel/runs")
    app = tomllib.loads((write_app(config, tmp_path / "app") / "pyproject.toml").read_text())
    flwr = app["tool"]["flwr"]["app"]
    assert flwr["components"] == {
        "serverapp": "fedfit.engine.flower_app:serverapp",
        "clientapp": "fedfit.engine.flower_app:clientapp",
    }
    carried = from_toml(flwr["config"]["fedfit-config"])
    assert Path(carried.run.output_dir).is_absolute()  # the SuperLink's cwd is not ours
    assert carried.train == config.train and carried.method == config.method


def test_flower_simulation_equals_the_local_executor(tmp_path: Path) -> None:
    """The same run on Flower's simulation and on the local executor, with one node whose
    client sends NaN (attack.kind = "nan", in the node's own process): rows and tensors
    agree, and the server rejects the NaN update with its reason and aggregates the rest,
    as the local executor does. (One simulation for both checks: each takes a Ray start.)"""
    bad = 0  # of the two clients, both in every round
    nan = ["attack.kind=nan", f"attack.clients=[{bad}]"]
    local = run(tiny(tmp_path, "run.name=local", *nan), plots=False)
    simulated = run(
        tiny(tmp_path, "run.name=sim", "run.executor=flower", "run.workers=2", *nan), plots=False
    )
    assert_same_as_local(local, simulated, rounds=2)
    clients = read_rows(simulated / "clients.jsonl")
    # Both virtual nodes trained, in long-lived actors: each process served both rounds.
    assert len({c["node_id"] for c in clients}) == 2
    pids = {c["pid"] for c in clients}
    assert 1 <= len(pids) <= 2 and os.getpid() not in pids
    rejected = [c for c in clients if "rejected" in c]
    assert [(c["round"], c["client_id"]) for c in rejected] == [(1, bad), (2, bad)]
    assert "values are not finite" in rejected[0]["rejected"]
    # the honest client's update is the round's aggregate: the model moved
    rounds = read_rows(simulated / "rounds.jsonl")
    assert rounds[-1]["eval"]["loss"] != rounds[0]["eval"]["loss"]


def test_a_failed_deployment_stops_every_process(tmp_path: Path) -> None:
    work = tmp_path / "deploy"
    with pytest.raises(RuntimeError, match="did not finish in 1 s"):
        deploy_local(tiny(tmp_path, "run.name=cut"), work, timeout_s=1.0)
    assert (work / "superlink.log").exists() and (work / "supernode-1.log").exists()
    left = processes_of(work.resolve() / "flwr-home")
    assert not left, f"processes left running: {[p.cmdline() for p in left]}"
