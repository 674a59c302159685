"""The in-process engine: determinism, resume equivalence, run folder contents, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedfit.cli import main
from fedfit.engine.experiment import resume_run, run
from fedfit.engine.runfolder import RunFolder
from fedfit.engine.server import sample_clients
from tests.helpers import TINY_RUN, read_rows, tiny_run_config

TINY = TINY_RUN


def tiny(tmp_path: Path, *extra: str):
    return tiny_run_config(tmp_path, *extra)


rows = read_rows


def test_sampling_is_seeded_and_without_replacement() -> None:
    everyone = list(range(100))
    a = sample_clients(0, 5, everyone, 10)
    assert a == sample_clients(0, 5, everyone, 10) and len(set(a)) == 10
    assert a != sample_clients(0, 6, everyone, 10) and a != sample_clients(1, 5, everyone, 10)


@pytest.mark.parametrize("method", ["lora", "fedavg"])
def test_same_seed_identical_rounds(tmp_path: Path, method: str) -> None:
    a = run(tiny(tmp_path, "run.name=a", f"method.name={method}"), plots=False)
    b = run(tiny(tmp_path, "run.name=b", f"method.name={method}"), plots=False)
    assert (a / "rounds.jsonl").read_bytes() == (b / "rounds.jsonl").read_bytes()
    c = run(tiny(tmp_path, "run.name=c", f"method.name={method}", "run.seed=1"), plots=False)
    assert (a / "rounds.jsonl").read_bytes() != (c / "rounds.jsonl").read_bytes()


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    full = run(
        tiny(tmp_path, "run.name=full", "server.optimizer=fedadam", "server.lr=0.01"), plots=False
    )
    part = run(
        tiny(tmp_path, "run.name=part", "server.optimizer=fedadam", "server.lr=0.01"),
        stop_after=1,
        plots=False,
    )
    assert len(rows(part / "rounds.jsonl")) == 2  # round 0 (the start) and round 1
    resumed = resume_run(part, plots=False)
    assert (resumed / "rounds.jsonl").read_bytes() == (full / "rounds.jsonl").read_bytes()
    s_full = RunFolder(full).summary()
    s_res = RunFolder(resumed).summary()
    assert s_full["final"] == s_res["final"]


def test_run_folder_contents(tmp_path: Path) -> None:
    out = run(tiny(tmp_path, "run.name=r"))
    rs, cs = rows(out / "rounds.jsonl"), rows(out / "clients.jsonl")
    assert [r["round"] for r in rs] == [0, 1, 2, 3] and len(cs) == 9
    for c in cs:
        mem = c["memory"]
        assert c["flops"] > 0 and c["upload_bytes"] > 0 and c["download_bytes"] > 0
        assert mem["peak_bytes"] >= mem["weights_bytes"] > 0 and mem["grads_bytes"] > 0
    # the round's upload is the sum of its clients' measured payload sizes
    assert rs[1]["upload_bytes"] == sum(c["upload_bytes"] for c in cs if c["round"] == 1)
    summary = RunFolder(out).summary()
    assert 0 <= summary["final"]["accuracy"] <= 1 and summary["majority_baseline"] > 0.3
    assert list((out / "plots").glob("*.png"))
    with pytest.raises(FileExistsError, match="--resume"):
        run(tiny(tmp_path, "run.name=r"))


def test_cli_run_and_bad_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["run"] + [
        a for s in [*TINY, f"run.output_dir={tmp_path}", "run.rounds=2"] for a in ("--set", s)
    ]
    assert main(args) == 0
    summary = RunFolder(tmp_path / "default").summary()
    assert summary["rounds_completed"] == 2
    assert main(["run", "--set", "train.learning_rate=0.1"]) == 2
    assert "train.learning_rate" in capsys.readouterr().err
