"""The ``[run]`` config section: the run's name, seed, rounds, and where its clients train."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedfit.engine.executors import executor_names
from fedfit.errors import check, check_choice


@dataclass(frozen=True)
class RunConfig:
    name: str = field(default="default", metadata={"help": "run folder name under output_dir"})
    seed: int = field(default=0, metadata={"help": "seeds sampling, partitions, client steps"})
    rounds: int = field(default=20, metadata={"help": "federated rounds"})
    eval_every: int = field(default=5, metadata={"help": "evaluate every k rounds (and last)"})
    output_dir: str = field(default="runs", metadata={"help": "where run folders go"})
    threads: int = field(
        default=0,
        metadata={"help": "torch CPU threads (per Ray worker too); 0 = torch default (Ray: 1)"},
    )
    executor: str = field(
        default="local",
        metadata={
            "help": "local (in process) | ray (clients spread over Ray actors) | flower "
            "(Flower's simulation runtime)"
        },
    )
    workers: int = field(
        default=2, metadata={"help": "Ray actors (executor = ray) or Flower simulation actors"}
    )
    lanes: int = field(
        default=1,
        metadata={
            "help": "local executor: clients of a round trained side by side in this many "
            "forked processes (run.threads torch threads each, 1 when 0); results equal lanes = 1"
        },
    )
    min_clients: int = field(
        default=1,
        metadata={"help": "fewest valid updates a round aggregates; fewer stop the run"},
    )
    retries: int = field(
        default=0,
        metadata={"help": "a round with too few valid updates is retried with a fresh sample"},
    )
    deadline_s: float = field(
        default=0.0,
        metadata={
            "help": "simulated round deadline: updates of devices slower than this (their "
            "[devices] speed / bandwidth) are dropped; 0 = none"
        },
    )
    ray_address: str = field(
        default="",
        metadata={"help": "existing Ray cluster host:port; '' = start a local Ray instance"},
    )

    def __post_init__(self) -> None:
        check(self.rounds >= 1, "run.rounds", "must be >= 1")
        check(self.eval_every >= 1, "run.eval_every", "must be >= 1")
        check(self.threads >= 0, "run.threads", "must be >= 0")
        check(
            bool(self.name)
            and "/" not in self.name
            and self.name not in (".", "..")
            and "\0" not in self.name,
            "run.name",
            "must be a plain folder name",
        )
        check_choice(self.executor, "run.executor", executor_names())
        check(self.workers >= 1, "run.workers", "must be >= 1")
        check(self.lanes >= 1, "run.lanes", "must be >= 1")
        check(
            self.lanes == 1 or self.executor == "local",
            "run.lanes",
            "is the local executor's; Ray and Flower spread clients over run.workers",
        )
        check(self.min_clients >= 1, "run.min_clients", "must be >= 1")
        check(self.retries >= 0, "run.retries", "must be >= 0")
        check(self.deadline_s >= 0, "run.deadline_s", "must be >= 0 (0 = no deadline)")
        if self.ray_address:
            check(self.executor == "ray", "run.ray_address", 'needs run.executor = "ray"')
            host, _, port = self.ray_address.removeprefix("ray://").rpartition(":")
            check(
                bool(host) and port.isdigit(),
                "run.ray_address",
                f"{self.ray_address!r} is not host:port (e.g. 127.0.0.1:6379)",
            )
