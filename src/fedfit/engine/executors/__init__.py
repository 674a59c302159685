"""Executors: where a run's clients train. Registered by name, one module each.

An executor only moves the clients' work: it takes the tasks ``Server.open_round`` hands
out to wherever the clients run, runs each through ``engine.client.run_client`` there and
brings the results back to ``Server.close_round`` (engine/server.py). Every module of this
package other than ``base`` is one executor, named by its module name (``run.executor``):

- ``local``: every client in this process on one model, one after another (the default);
- ``ray``: the clients of a round spread over Ray actors, on this machine or a cluster;
- ``flower``: Flower's simulation runtime (and, through ``fedfit flower``, a deployment).

A new executor is one new module here defining ``Executor``, a subclass of
``base.Executor`` (see there). Listing the names imports none of the modules, so config
validation does not load Ray or Flower.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedfit.engine.executors.base import Executor

NOT_EXECUTORS = frozenset({"base"})


def executor_names() -> tuple[str, ...]:
    """The registered executors' names, sorted (the modules of this package)."""
    found = (m.name for m in pkgutil.iter_modules(__path__))
    return tuple(sorted(n for n in found if n not in NOT_EXECUTORS and not n.startswith("_")))


def make_executor(name: str, **options: Any) -> Executor:
    """The executor ``name`` with its options (the Ray executor takes ``pool``)."""
    if name not in executor_names():
        raise ValueError(f"unknown executor {name!r}; registered: {', '.join(executor_names())}")
    module = importlib.import_module(f"{__name__}.{name}")
    executor: Executor = module.Executor(**options)
    return executor
