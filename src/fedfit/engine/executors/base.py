"""What every executor implements (see the package docstring)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fedfit.config import Config
from fedfit.engine.runfolder import RunFolder

if TYPE_CHECKING:
    from fedfit.engine.server import ProgressFn


@dataclass
class Job:
    """One run to execute: its config, its prepared folder, and how far to go.

    ``stop_after`` ends the process's work after that round (as if killed), for tests and for
    running a long experiment in pieces; ``resume`` continues from the folder's checkpoint.
    ``started`` is when the process began the run (its start-up wall time counts)."""

    config: Config
    folder: RunFolder
    resume: bool = False
    stop_after: int | None = None
    progress: ProgressFn | None = None
    plots: bool = True
    started: float = field(default_factory=time.perf_counter)

    @property
    def last_round(self) -> int:
        rounds = self.config.run.rounds
        return rounds if self.stop_after is None else min(rounds, self.stop_after)

    def startup_s(self) -> float:
        return time.perf_counter() - self.started


class Executor(ABC):
    """Runs a job: builds a ``Server`` for it (engine/server.py), moves each round's tasks to
    where the clients train and their results back, and returns the run folder after
    ``Server.finish``. Options (keyword arguments of the constructor) say where, never what
    is computed: every executor writes the same rows for the same config."""

    @abstractmethod
    def run(self, job: Job) -> Path:
        """Execute ``job``; returns its run folder."""
