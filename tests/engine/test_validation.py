"""Updates are checked before aggregation: a bad one is dropped with its reason, a failing
client drops out of its round, a diverging run stops with valid JSON and a non-zero exit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedfit.algorithms.base import ClientTask, Update
from fedfit.cli import main
from fedfit.devices import Budget
from fedfit.engine.experiment import run
from fedfit.engine.runfolder import RunFolder, dumps
from fedfit.engine.validation import rejection
from fedfit.errors import ConfigError, RunStopped
from tests.helpers import misbehave, tiny_run_config

SENT = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}


def task() -> ClientTask:
    return ClientTask(client_id=7, round=1, seed=0, download=dict(SENT))


def check(payload: dict[str, Any], n: int = 10, kind: str = "weights", **kw: Any) -> str | None:
    budget = kw.pop("budget", Budget())
    return rejection(
        Update(7, payload, n), task(), kind, shard_size=20, upload_bytes=kw.pop("up", 100),
        budget=budget,
    )  # fmt: skip


def test_a_good_update_passes() -> None:
    assert check({"w": torch.ones(4, 3), "b": torch.ones(3)}) is None
    assert check({"b": torch.ones(3)}, kind="subset") is None  # a share of the tensors
    assert check({"seeds": torch.tensor([3, 5]), "g": torch.randn(2)}, kind="scalars") is None


@pytest.mark.parametrize(
    ("payload", "kind", "n", "reason"),
    [
        (
            {"w": torch.tensor([[float("nan")] * 3] * 4)},
            "weights",
            10,
            "12 of 12 values are not finite",
        ),
        ({"w": torch.full((4, 3), float("inf"))}, "weights", 10, "not finite"),
        ({"w": torch.ones(1, 3)}, "weights", 10, "shape (1, 3), the tensor sent is (4, 3)"),
        ({"w": torch.ones(2, 4, 3)}, "weights", 10, "shape (2, 4, 3)"),
        ({"w": torch.ones(4, 3, dtype=torch.float64)}, "weights", 10, "dtype torch.float64"),
        ({"v": torch.ones(3)}, "gradient", 10, "v: not a tensor the client was sent"),
        ({"w": [1.0]}, "weights", 10, "not a tensor (list)"),
        ({"b": torch.ones(3)}, "weights", 0, "num_examples 0: must be a positive integer"),
        ({"b": torch.ones(3)}, "weights", -5, "must be a positive integer"),
        ({"b": torch.ones(3)}, "weights", 10_000, "num_examples 10000: the client holds 20"),
        ({"seeds": torch.tensor([-1, 5])}, "scalars", 10, "negative seeds or indices"),
        ({"g": torch.tensor([float("nan")])}, "scalars", 10, "g: 1 of 1 values are not finite"),
    ],
)
def test_bad_updates_are_rejected_naming_the_problem(
    payload: dict[str, Any], kind: str, n: int, reason: str
) -> None:
    got = check(payload, n=n, kind=kind)
    assert got is not None and reason in got


def test_an_upload_over_the_budget_is_rejected() -> None:
    budget = Budget(upload_bytes=50)
    assert "upload of 100 bytes over the device's budget of 50" in str(
        check({"b": torch.ones(3)}, budget=budget, up=100)
    )
    assert check({"b": torch.ones(3)}, budget=budget, up=50) is None


def test_json_rows_never_hold_nan() -> None:
    text = dumps({"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}})
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": {"d": None}}


@pytest.mark.parametrize("key", ["train.lr=inf", "server.lr=inf", "train.lr=nan"])
def test_infinite_learning_rates_are_config_errors(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError, match="must be a finite number"):
        tiny_run_config(tmp_path, key)


def corrupt(monkeypatch: pytest.MonkeyPatch, how: str) -> list[int]:
    """Make the first client of every round misbehave in the way ``how`` names."""

    def change(update: Update, task: ClientTask) -> Update:
        if how == "raise":
            raise RuntimeError("the device ran out of battery")
        name = next(iter(update.payload))
        if how == "nan":
            update.payload[name] = torch.full_like(update.payload[name], float("nan"))
        elif how == "shape":
            update.payload[name] = update.payload[name][:1]
        elif how == "count":
            update.num_examples = 10**9
        return update

    return misbehave(monkeypatch, change)


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("nan", "values are not finite"),
        ("shape", "shape"),
        ("count", "num_examples 1000000000"),
        ("raise", "the client failed: RuntimeError: the device ran out of battery"),
    ],
)
def test_a_bad_client_is_dropped_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, reason: str
) -> None:
    hit = corrupt(monkeypatch, how)
    out = run(tiny_run_config(tmp_path, "run.rounds=2", "method.name=fedavg"), plots=False)
    folder = RunFolder(out)
    rejected = [c for c in folder.clients() if "rejected" in c]
    assert [c["client_id"] for c in rejected] == hit and len(hit) == 2  # one per round
    assert all(reason in c["rejected"] for c in rejected)
    rounds = folder.rounds()
    assert [r.get("rejected") for r in rounds] == [None, 1, 1]
    assert all(torch.isfinite(t).all() for t in folder.load_checkpoint()[0].params.values())
    assert folder.summary()["final"]["loss"] == rounds[-1]["eval"]["loss"]


def test_every_update_bad_stops_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corrupt(monkeypatch, "nan")
    config = tiny_run_config(
        tmp_path, "run.rounds=3", "method.name=fedavg", "data.clients_per_round=2",
        "run.min_clients=2",
    )  # fmt: skip
    with pytest.raises(
        RunStopped,
        match=r"round 1: 1 of 2 sampled clients sent a valid update in time, fewer than run",
    ):
        run(config, plots=False)
    folder = RunFolder(tmp_path / "default")
    assert folder.summary()["stopped"].startswith(
        "round 1: 1 of 2 sampled clients sent a valid update"
    )
    assert [r["round"] for r in folder.rounds()] == [0]  # the last good round
    assert folder.load_checkpoint()[0].round == 0


def strict_rows(path: Path) -> list[dict[str, Any]]:
    def no_nan(constant: str) -> None:
        raise AssertionError(f"{path} holds {constant}")

    return [json.loads(line, parse_constant=no_nan) for line in path.read_text().splitlines()]


def test_a_diverging_run_exits_non_zero_with_valid_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["run", "--set", "model.name=tiny-bert", "--set", "model.max_length=32",
         "--set", "data.num_clients=12", "--set", "data.clients_per_round=3",
         "--set", "data.min_examples=20", "--set", "data.eval_examples=150",
         "--set", "run.rounds=4", "--set", "train.local_steps=2",
         "--set", "train.optimizer=sgd", "--set", "train.lr=1e30",
         "--set", f"run.output_dir={tmp_path}"]
    )  # fmt: skip
    assert code == 1
    assert "run stopped" in capsys.readouterr().err
    run_dir = tmp_path / "default"
    strict_rows(run_dir / "rounds.jsonl")
    clients = strict_rows(run_dir / "clients.jsonl")
    assert clients and all("rejected" in c for c in clients if c["round"] == 1)
    summary = json.loads(
        (run_dir / "summary.json").read_text(),
        parse_constant=lambda c: pytest.fail(f"summary.json holds {c}"),
    )
    assert summary["stopped"]
