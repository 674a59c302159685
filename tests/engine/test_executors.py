"""Executors are plug-ins: registered by module name, validated by the config, and a new one
is one new file whose clients run through the Server's two calls."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import fedfit.engine.executors as executors
from fedfit.engine.executors import executor_names, make_executor
from fedfit.engine.experiment import run
from fedfit.errors import ConfigError
from tests.helpers import read_rows, tiny_run_config


def test_registered_executors() -> None:
    assert executor_names() == ("flower", "local", "ray")
    with pytest.raises(ValueError, match="unknown executor 'nope'; registered: flower, local"):
        make_executor("nope")


def test_config_names_the_registered_executors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run.executor"):
        tiny_run_config(tmp_path, "run.executor=nope")


# A new executor: the local executor's loop, each round's clients run in reverse order and
# put back in the round's order (what an executor that gathers results out of order does).
REVERSED = """
from fedfit.engine.client import in_process
from fedfit.engine.executors import base
from fedfit.engine.meter import CostMeter
from fedfit.engine.server import Server
from fedfit.engine.setup import build


class Executor(base.Executor):
    def run(self, job):
        setup = build(job.config)
        server = Server(setup, job.folder, job.progress)
        server.begin(resume=job.resume, startup_s=job.startup_s())
        clients = in_process(setup, CostMeter())
        for round_ in range(server.next_round, job.last_round + 1):
            opened = server.open_round(round_)
            results = []
            for task in reversed(opened.tasks):
                results += clients(server.state, opened.clients, [task])
            server.close_round(opened, results[::-1])
        return server.finish(job.plots)
"""


def test_a_new_executor_is_one_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "reversed.py").write_text(textwrap.dedent(REVERSED))
    monkeypatch.setattr(executors, "__path__", [*executors.__path__, str(plugins)])
    assert "reversed" in executor_names()
    local = run(tiny_run_config(tmp_path, "run.rounds=2", "run.name=local"), plots=False)
    mine = run(
        tiny_run_config(tmp_path, "run.rounds=2", "run.name=mine", "run.executor=reversed"),
        plots=False,
    )
    assert read_rows(mine / "rounds.jsonl") == read_rows(local / "rounds.jsonl")
