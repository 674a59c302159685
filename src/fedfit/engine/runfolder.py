"""A run folder: the one place that writes and reads what a run leaves behind.

``runs/NAME/`` holds:

- ``config.toml``: the resolved config the run was started with;
- ``rounds.jsonl``: one object per round, round 0 (the starting model) first, with an
  ``eval`` dict on evaluation rounds; only deterministic content, so two runs with the same
  seed write identical files;
- ``clients.jsonl``: one object per client per round (measured FLOPs, peak memory by
  category, bytes up and down, wall time, the planner's assignment);
- ``timing.jsonl``: wall times per round (kept out of rounds.jsonl, which stays
  deterministic); round 0's row also holds ``setup_s``, the seconds the setup's parts took
  (engine/setup.py ``build``: data, model, tokenize, planning);
- ``checkpoint.pt``: the server state after the last finished round, written atomically;
- ``summary.json``: written when the run ends;
- ``plots/``: written by ``fedfit.report``.

Every executor, ``fedfit central``, ``fedfit report``, the benchmarks and the tests go through
``RunFolder``; nothing else opens these files by name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedfit.log import log

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


class RunLocked(RunExistsError):
    """Another process is running (or resuming) this run."""


class CheckpointError(ValueError):
    """checkpoint.pt cannot be resumed from: damaged, another run's, or ahead of the logs."""


def finite_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None: JSON has no NaN, and a
    file holding a bare ``NaN`` is not valid JSON for other tools."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    return json.dumps(finite_json(value), allow_nan=False, **kwargs)


def _row(path: Path, lineno: int, line: str) -> dict[str, Any]:
    """One log line as its JSON object; a bad line raises naming ``file:line``."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
    if not isinstance(row, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    return row


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    """One JSON object per line, blank lines skipped."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield _row(path, lineno, line)


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
            return folder  # config.toml stays the run's own
        if run_dir.exists() and any(run_dir.iterdir()):
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

    @contextlib.contextmanager
    def lock(self) -> Iterator[RunFolder]:
        """Hold the run exclusively (a lock file beside the folder, filelock): a second run
        or resume on the same folder is refused with ``RunLocked`` while this one works."""
        from filelock import FileLock, Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path.parent / f".{self.path.name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise RunLocked(
                f"{self.path} is in use by another fedfit process (run or resume); wait for "
                "it to end, or give this run another name with --set run.name=..."
            ) from None
        try:
            yield self
        finally:
            lock.release()

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
            f.write(dumps(row, sort_keys=True) + "\n")

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

    def _lines(self, name: str) -> list[str]:
        """A log's non-blank lines, a torn last line (a process killed while writing it)
        dropped with a warning naming the file."""
        path = self.file(name)
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if lines:
            try:
                json.loads(lines[-1])
            except json.JSONDecodeError:
                log(f"{path}:{len(lines)}: torn last line (the run was killed while writing "
                    "it): dropped")  # fmt: skip
                lines.pop()
        return lines

    def truncate_torn(self) -> None:
        """Drop a torn last line from every log (see ``_lines``)."""
        for name in LOGS:
            if self.file(name).exists():
                self.file(name).write_text("".join(line + "\n" for line in self._lines(name)))

    def truncate(self, last_round: int) -> None:
        """Drop every log's rows of rounds after ``last_round`` (a run killed between its
        rows and its checkpoint), and a torn last line."""
        for name in LOGS:
            path = self.file(name)
            if not path.exists():
                continue
            lines = self._lines(name)
            kept = [line for lineno, line in enumerate(lines, start=1)
                    if _row(path, lineno, line)["round"] <= last_round]  # fmt: skip
            path.write_text("".join(line + "\n" for line in kept))

    # ---------------------------------------------------------------- summary

    def has_summary(self) -> bool:
        return self.file(SUMMARY).is_file()

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.file(SUMMARY).write_text(dumps(summary, indent=2) + "\n")

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

    def config_fingerprint(self) -> str:
        """sha256 of config.toml as the run wrote it (a checkpoint records it)."""
        return hashlib.sha256(self.file(CONFIG).read_bytes()).hexdigest()

    def save_checkpoint(self, state: ServerState, extra: dict[str, Any]) -> None:
        """The server state (and ``extra``, and the run's config fingerprint), written
        atomically."""
        import torch

        tmp = self.file(CHECKPOINT + ".tmp")
        meta = {"config_sha256": self.config_fingerprint()} if self.has_config() else {}
        torch.save({"state": state.__dict__, **meta, **extra}, tmp)
        os.replace(tmp, self.file(CHECKPOINT))

    def load_checkpoint(self) -> tuple[ServerState, dict[str, Any]]:
        """The server state of the last finished round, and what was saved beside it;
        ``CheckpointError`` when the file is damaged."""
        import torch

        from fedfit.algorithms.base import ServerState

        path = self.file(CHECKPOINT)
        try:
            data = torch.load(path, weights_only=False)
            state = ServerState(**data.pop("state"))
        except FileNotFoundError:
            raise
        except Exception as err:  # a truncated zip, garbage, another program's file
            raise CheckpointError(
                f"{path} is damaged and cannot be read ({type(err).__name__}: "
                f"{str(err)[:200]}); start the run again with --overwrite"
            ) from None
        return state, data

    def resumable_checkpoint(self) -> tuple[ServerState, dict[str, Any]]:
        """``load_checkpoint``, checked against this folder: the checkpoint must be this
        run's (its config fingerprint equals config.toml's) and no later than the logs."""
        state, extra = self.load_checkpoint()
        recorded = extra.get("config_sha256")
        if recorded is not None and recorded != self.config_fingerprint():
            raise CheckpointError(
                f"{self.file(CHECKPOINT)} was written by another run, or {CONFIG} changed "
                "since the run started (their fingerprints differ): not resumed"
            )
        rounds = self.rounds() if self.file(ROUNDS).is_file() else []
        logged = max((r["round"] for r in rounds), default=-1)
        if state.round > logged:
            raise CheckpointError(
                f"{self.file(CHECKPOINT)} holds round {state.round} but {ROUNDS} ends at "
                f"round {logged}: the checkpoint is not this folder's; not resumed"
            )
        return state, extra
