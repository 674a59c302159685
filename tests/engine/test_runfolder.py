"""Run folder safety: one process per folder, torn rows and bad checkpoints are named, resume
leaves config.toml alone."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedfit.engine.experiment import resume_run, run
from fedfit.engine.runfolder import CheckpointError, RunFolder, RunLocked
from tests.helpers import read_rows, tiny_run_config


def test_a_second_process_on_a_locked_folder_is_refused(tmp_path: Path) -> None:
    config = tiny_run_config(tmp_path, "run.rounds=1")
    with RunFolder.of(config).lock(), pytest.raises(RunLocked, match="in use by another"):
        run(config, plots=False)
    run(config, plots=False)  # free again once the first process let go


def test_a_torn_last_line_is_dropped_and_the_run_resumes(tmp_path: Path) -> None:
    full = run(tiny_run_config(tmp_path, "run.rounds=2", "run.name=full"), plots=False)
    part = run(tiny_run_config(tmp_path, "run.rounds=2", "run.name=part"), stop_after=1,
               plots=False)  # fmt: skip
    config_before = (part / "config.toml").read_bytes()
    with (part / "rounds.jsonl").open("a") as f:
        f.write('{"round": 2, "clients": [1, ')  # killed while writing round 2's row
    resume_run(part, plots=False)
    assert (part / "rounds.jsonl").read_text() == (full / "rounds.jsonl").read_text()
    assert (part / "config.toml").read_bytes() == config_before  # resume never rewrites it


def test_a_damaged_checkpoint_is_a_named_error(tmp_path: Path) -> None:
    part = run(tiny_run_config(tmp_path, "run.rounds=2"), stop_after=1, plots=False)
    data = (part / "checkpoint.pt").read_bytes()
    (part / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="checkpoint.pt is damaged"):
        resume_run(part, plots=False)
    (part / "checkpoint.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="damaged"):
        resume_run(part, plots=False)


def test_another_runs_checkpoint_is_refused(tmp_path: Path) -> None:
    mine = run(tiny_run_config(tmp_path, "run.rounds=2", "run.name=a"), stop_after=1,
               plots=False)  # fmt: skip
    other = run(tiny_run_config(tmp_path, "run.rounds=2", "run.name=b", "train.lr=1e-3"),
                stop_after=1, plots=False)  # fmt: skip
    shutil.copy(other / "checkpoint.pt", mine / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="written by another run"):
        resume_run(mine, plots=False)


def test_a_checkpoint_ahead_of_the_logs_is_refused(tmp_path: Path) -> None:
    part = run(tiny_run_config(tmp_path, "run.rounds=3"), stop_after=2, plots=False)
    rows = (part / "rounds.jsonl").read_text().splitlines()
    (part / "rounds.jsonl").write_text("\n".join(rows[:2]) + "\n")  # rounds 0 and 1 only
    with pytest.raises(CheckpointError, match="holds round 2 but rounds.jsonl ends at round 1"):
        resume_run(part, plots=False)


def test_totals_come_from_the_rows(tmp_path: Path) -> None:
    part = run(tiny_run_config(tmp_path, "run.rounds=3"), stop_after=2, plots=False)
    resume_run(part, plots=False)
    rows = read_rows(part / "rounds.jsonl")
    assert rows[-1]["cum_upload_bytes"] == sum(r["upload_bytes"] for r in rows) > 0
