"""A run folder: the one place that writes and reads what a run leaves behind.

``runs/NAME/`` holds:

- ``config.toml``: the resolved config the run was started with;
- ``rounds.jsonl``: one object per round, round 0 (the starting model) first, with an
  ``eval`` dict on evaluation rounds; only deterministic content, so two runs with the same
  seed write identical files;
- ``clients.jsonl``: one object per client per round (measured FLOPs, peak memory by
  category, bytes up and down, wall time, the planner's assignment);
- ``timing.jsonl``: wall times per round (kept out of rounds.jsonl, which stays
  deterministic);
- ``checkpoint.pt``: the server state after the last finished round, written atomically;
- ``summary.json``: written when the run ends;
- ``plots/``: written by ``fedfit.report``.

Every executor, ``fedfit central``, ``fedfit report``, the benchmarks and the tests go through
``RunFolder``; nothing else opens these files by name.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedfit.algorithms.base import ServerState
    from fedfit.config import Config

CONFIG = "config.toml"
ROUNDS = "rounds.jsonl"
CLIENTS = "clients.jsonl"
TIMING = "timing.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"
LOGS = (ROUNDS, CLIENTS, TIMING)


class RunExistsError(FileExistsError):
    """A new run would write into a folder that already holds one."""


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    """One JSON object per line; blank lines skipped; a bad line raises naming ``file:line``."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
                )
            yield row


class RunFolder:
    """The files of one run folder (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @classmethod
    def of(cls, config: Config) -> RunFolder:
        """The folder ``config``'s run writes: ``run.output_dir / run.name``."""
        return cls(Path(config.run.output_dir) / config.run.name)

    @classmethod
    def prepare(cls, config: Config, *, resume: bool, overwrite: bool) -> RunFolder:
        """The run's folder, checked (resume needs a checkpoint; an existing run needs
        ``overwrite``, which clears its files) and holding the resolved config.toml."""
        folder = cls.of(config)
        run_dir = folder.path
        if resume:
            if not folder.has_checkpoint():
                raise FileNotFoundError(f"{run_dir}: no {CHECKPOINT} to resume from")
        elif run_dir.exists() and any(run_dir.iterdir()):
            if not overwrite:
                raise RunExistsError(
                    f"{run_dir} already exists: resume it with --resume {run_dir}, pick "
                    "another name with --set run.name=..., or replace it with --overwrite"
                )
            folder.clear()
        run_dir.mkdir(parents=True, exist_ok=True)
        folder.write_config(config)
        return folder

    def file(self, name: str) -> Path:
        return self.path / name

    def clear(self) -> None:
        """Remove the run's logs, summary and checkpoint (not config.toml or plots)."""
        for name in (*LOGS, SUMMARY, CHECKPOINT):
            self.file(name).unlink(missing_ok=True)

    # ---------------------------------------------------------------- config

    def has_config(self) -> bool:
        return self.file(CONFIG).is_file()

    def write_config(self, config: Config) -> None:
        from fedfit.config import to_toml

        self.file(CONFIG).write_text(to_toml(config))

    def config(self) -> Config:
        """The resolved config the run was started with."""
        from fedfit.config import load_config

        if not self.has_config():
            raise FileNotFoundError(f"{self.path}: not a run folder (no {CONFIG})")
        return load_config(self.file(CONFIG))

    def config_text(self) -> str:
        return self.file(CONFIG).read_text()

    def config_table(self) -> dict[str, Any]:
        """config.toml as plain TOML tables (no validation: reports read old runs too)."""
        try:
            return tomllib.loads(self.file(CONFIG).read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{self.file(CONFIG)}: not valid TOML ({err})") from err

    # ---------------------------------------------------------------- logs

    def append(self, name: str, row: dict[str, Any]) -> None:
        """One row at the end of a log (rounds.jsonl, clients.jsonl or timing.jsonl)."""
        with self.file(name).open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")

    def rows(self, name: str) -> list[dict[str, Any]]:
        """Every row of a log; none when it does not exist yet."""
        path = self.file(name)
        return list(_rows(path)) if path.is_file() else []

    def rounds(self) -> list[dict[str, Any]]:
        return self.rows(ROUNDS)

    def clients(self) -> list[dict[str, Any]]:
        return self.rows(CLIENTS)

    def timing(self) -> list[dict[str, Any]]:
        return self.rows(TIMING)

    def truncate(self, last_round: int) -> None:
        """Drop every log's rows of rounds after ``last_round`` (a run killed between its
        rows and its checkpoint)."""
        for name in LOGS:
            path = self.file(name)
            if not path.exists():
                continue
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if json.loads(line)["round"] <= last_round]
            path.write_text("".join(line + "\n" for line in kept))

    # ---------------------------------------------------------------- summary

    def has_summary(self) -> bool:
        return self.file(SUMMARY).is_file()

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.file(SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")

    def summary(self) -> dict[str, Any]:
        """summary.json (written when the run ended)."""
        path = self.file(SUMMARY)
        if not self.has_summary():
            raise FileNotFoundError(f"{self.path}: no {SUMMARY} (the run has not finished)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return data

    # ---------------------------------------------------------------- checkpoint

    def has_checkpoint(self) -> bool:
        return self.file(CHECKPOINT).exists()

    def save_checkpoint(self, state: ServerState, extra: dict[str, Any]) -> None:
        """The server state (and ``extra``), written atomically."""
        import torch

        tmp = self.file(CHECKPOINT + ".tmp")
        torch.save({"state": state.__dict__, **extra}, tmp)
        os.replace(tmp, self.file(CHECKPOINT))

    def load_checkpoint(self) -> tuple[ServerState, dict[str, Any]]:
        """The server state of the last finished round, and what was saved beside it."""
        import torch

        from fedfit.algorithms.base import ServerState

        data = torch.load(self.file(CHECKPOINT), weights_only=False)
        return ServerState(**data.pop("state")), data
