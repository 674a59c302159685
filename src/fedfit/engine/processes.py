"""Stopping processes that a run started, and whatever they started in turn.

A Flower deployment (engine/executors/flower.py) and the engine benchmark (each engine in a
subprocess of its own, benchmarks/procs.py) both end by stopping a set of processes that may
have left their parent's session. psutil's handles check a process's start time, so a pid
the OS has recycled since it was found is never signalled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import psutil

REAP_S = 5.0  # how long to wait for killed processes to go


def with_descendants(pids: Iterable[int]) -> dict[int, psutil.Process]:
    """Each process of ``pids`` still running and every descendant it has now, by pid."""
    found: dict[int, psutil.Process] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(pid)
            for p in [parent, *parent.children(recursive=True)]:
                found[p.pid] = p
    return found


def stop_processes(procs: Iterable[psutil.Process], grace_s: float = 10.0) -> list[psutil.Process]:
    """SIGTERM each process of ``procs`` that still runs, SIGKILL those alive ``grace_s``
    seconds later (at once when ``grace_s`` is 0), then wait up to ``REAP_S`` for them to
    go. Returns the processes that were still running when called."""
    running = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running():
                running.append(p)
    alive = running
    if grace_s > 0:
        for p in running:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(running, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=REAP_S)
    return running
