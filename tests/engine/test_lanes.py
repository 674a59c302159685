"""Client lanes (``run.lanes``, engine/lanes.py): N forked processes train a round's clients
side by side, with the rows and the global model of one lane, bit for bit."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from fedfit.engine.experiment import run
from fedfit.engine.lanes import Lanes
from fedfit.engine.runfolder import RunFolder
from fedfit.engine.server import Server
from fedfit.engine.setup import build
from fedfit.errors import ConfigError
from tests.helpers import read_rows, tiny_run_config

# Fields that say where and how fast a client ran, not what it computed.
WHERE = {"wall_s", "lane", "measured_steps", "measured_s"}


def same_run(one: Path, two: Path, memory_rtol: float = 0.0) -> None:
    a, b = read_rows(one / "rounds.jsonl"), read_rows(two / "rounds.jsonl")
    assert [r["eval"] for r in a] == [r["eval"] for r in b]
    ca, cb = read_rows(one / "clients.jsonl"), read_rows(two / "clients.jsonl")
    assert len(ca) == len(cb) > 0
    for x, y in zip(ca, cb, strict=True):
        mx, my = x.pop("memory"), y.pop("memory")
        px, py = x.pop("peak_memory_bytes"), y.pop("peak_memory_bytes")
        assert {k: v for k, v in x.items() if k not in WHERE} == {
            k: v for k, v in y.items() if k not in WHERE
        }
        assert py == pytest.approx(px, rel=memory_rtol, abs=0)
        for key, value in mx.items():
            assert my[key] == pytest.approx(value, rel=memory_rtol, abs=0), key
    assert {c["lane"] for c in cb} == {0, 1}
    pa = RunFolder(one).load_checkpoint()[0].params
    pb = RunFolder(two).load_checkpoint()[0].params
    assert pa.keys() == pb.keys() and pa
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


@pytest.mark.parametrize(
    ("method", "memory_rtol"),
    [
        ("lora", 0.0),
        ("spry", 0.0),  # start_round assigns each client its share of tensors
        ("layers", 0.0),
        # exact-restore corrections vary with the values (engine/meter.py): memory to 1e-3
        ("fedkseed", 1e-3),
    ],
)
def test_two_lanes_equal_one(tmp_path: Path, method: str, memory_rtol: float) -> None:
    common = ["run.rounds=2", f"method.name={method}"]
    one = run(tiny_run_config(tmp_path, *common, "run.name=one", "run.threads=1"), plots=False)
    two = run(tiny_run_config(tmp_path, *common, "run.name=two", "run.lanes=2"), plots=False)
    same_run(one, two, memory_rtol)


def test_lanes_are_the_local_executors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run\.lanes.*run\.workers"):
        tiny_run_config(tmp_path, "run.lanes=2", "run.executor=ray")
    with pytest.raises(ConfigError, match=r"run\.lanes.*>= 1"):
        tiny_run_config(tmp_path, "run.lanes=0")


def test_a_dead_lane_stops_the_round_with_its_exit_code(tmp_path: Path) -> None:
    config = tiny_run_config(tmp_path, "run.lanes=2")
    setup = build(config)
    server = Server(setup, RunFolder.prepare(config, resume=False, overwrite=False))
    opened = server.open_round(1)
    with Lanes(setup, 2) as lanes:
        os.kill(lanes.processes[1].pid, signal.SIGKILL)
        lanes.processes[1].join()
        with pytest.raises(RuntimeError, match=r"lane 1 .*died with exit code -9"):
            lanes.run_round(server.state, opened.clients, opened.tasks)
