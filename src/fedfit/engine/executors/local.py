"""The local executor (default): one model in this process, the clients one after another.

Per round the Server (engine/server.py) opens the round; each task runs through
``engine.client.run_client`` on the one shared model, in the round's order; the Server
closes the round with the results in that order. With ``run.lanes = N > 1`` the clients run
side by side in N forked processes that share the model's memory (engine/lanes.py), with the
same results.
"""

from __future__ import annotations

from pathlib import Path

from fedfit.engine.client import in_process
from fedfit.engine.executors import base
from fedfit.engine.lanes import Lanes
from fedfit.engine.meter import CostMeter
from fedfit.engine.server import Server
from fedfit.engine.setup import build


class Executor(base.Executor):
    """``run.executor = "local"``: no options (``run.lanes`` is read from the config)."""

    def run(self, job: base.Job) -> Path:
        setup = build(job.config)
        server = Server(setup, job.folder, job.progress)
        server.begin(resume=job.resume, startup_s=job.startup_s())
        if setup.config.run.lanes == 1:
            server.serve(in_process(setup, CostMeter()), job.last_round)
        else:
            with Lanes(setup, setup.config.run.lanes) as lanes:
                server.serve(lanes.runner(), job.last_round)
        return server.finish(job.plots)
