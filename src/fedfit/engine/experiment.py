"""Run or resume one federated experiment, on the executor its config names.

``run(config)`` prepares the run folder (engine/runfolder.py) and hands the job to the
executor ``run.executor`` names (engine/executors/); ``resume_run(folder)`` continues a
stopped run with the config it was started with.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedfit.config import Config
from fedfit.engine.executors import make_executor
from fedfit.engine.executors.base import Job
from fedfit.engine.runfolder import RunFolder
from fedfit.errors import ConfigError

if TYPE_CHECKING:
    from fedfit.engine.executors.ray import RayPool
    from fedfit.engine.server import ProgressFn

# [run] keys that say where clients run, not what they compute
EXECUTION_KEYS = ("executor", "workers", "ray_address")


def run(
    config: Config,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    stop_after: int | None = None,
    plots: bool = True,
    pool: RayPool | None = None,
) -> Path:
    """Run (or resume) a federated experiment; returns its run folder.

    ``stop_after`` ends the process's work after that round (as if killed), for tests and
    for running a long experiment in pieces; ``--resume`` continues it. With
    ``run.executor = "ray"`` the clients run on Ray actors: on ``pool`` if given (an entered
    RayPool matching the config, reused across runs), else on a pool opened for this run and
    closed at its end.
    """
    if config.server.secure_aggregation != "none" and config.run.executor != "flower":
        # a deployment (fedfit flower local / app) runs server_main, not this
        raise ConfigError(
            f"server.secure_aggregation = {config.server.secure_aggregation!r} runs through "
            "Flower's SecAgg+: use run.executor = 'flower' or a deployment (fedfit flower "
            f"local / app); run.executor = {config.run.executor!r} would aggregate in the clear"
        )
    if not resume:
        from fedfit.engine.tier_table import resolve_model

        config = resolve_model(config)  # model.name = "auto": the picked zoo model
    if pool is not None and config.run.executor != "ray":
        raise ValueError(f'a Ray pool was given but run.executor is "{config.run.executor}"')
    options = {"pool": pool} if pool is not None else {}
    with RunFolder.of(config).lock():  # one process per run folder
        folder = RunFolder.prepare(config, resume=resume, overwrite=overwrite)
        job = Job(config, folder, resume, stop_after, progress, plots)
        return make_executor(config.run.executor, **options).run(job)


def resume_run(
    run_dir: str | Path, run_changes: dict[str, Any] | None = None, **kwargs: Any
) -> Path:
    """Continue a run from its folder, with the config it was started with.

    ``run_changes``: [run] keys that say where clients run, not what they compute
    (``executor``, ``workers``, ``ray_address``), to continue it elsewhere."""
    folder = RunFolder(run_dir)
    config = folder.config()
    # The folder may have been moved: resume where it is now.
    config = dataclasses.replace(
        config,
        run=dataclasses.replace(
            config.run,
            output_dir=str(folder.path.parent),
            name=folder.path.name,
            **execution_only(run_changes or {}),
        ),
    )
    return run(config, resume=True, **kwargs)


def execution_only(changes: dict[str, Any]) -> dict[str, Any]:
    """``changes`` when they are all execution keys, else a ValueError naming the others."""
    other = sorted(set(changes) - set(EXECUTION_KEYS))
    if other:
        raise ValueError(
            f"a resumed run keeps its config; only run.{', run.'.join(EXECUTION_KEYS)} may "
            f"change, not run.{', run.'.join(other)}"
        )
    return changes
