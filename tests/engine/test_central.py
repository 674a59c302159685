"""The centralised reference: same model, tensors, start and step budget on the pooled data;
gradient-free methods with their own estimator."""

from __future__ import annotations

from pathlib import Path

from fedfit.engine.central import run_central, steps_per_round
from fedfit.engine.experiment import run
from fedfit.engine.runfolder import RunFolder
from fedfit.engine.setup import build
from tests.helpers import read_rows, tiny_run_config

ZO = ["method.name=fedmezo", "method.peft=full", "train.optimizer=sgd", "train.lr=1e-4"]


def test_zero_order_central_uses_its_own_estimator(tmp_path: Path) -> None:
    config = tiny_run_config(tmp_path, *ZO, "run.rounds=2", "train.batch_size=8", "run.name=zo")
    out = run_central(config)
    summary = RunFolder(out).summary()
    assert summary["estimator"].startswith("the method's own")
    rows = read_rows(out / "rounds.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[0]["client_flops"] == 0
    # A MeZO step is two forward passes; a backprop step of every weight (forward, input and
    # weight gradients) about three: the ZO reference must cost what ZO steps cost.
    backprop = run_central(
        tiny_run_config(
            tmp_path, "method.name=fedavg", "run.rounds=2", "train.batch_size=8", "run.name=bp"
        )
    )
    bp = read_rows(backprop / "rounds.jsonl")
    steps = steps_per_round(config, build(config).shards)
    assert summary["steps"] == 2 * steps
    ratio = rows[1]["client_flops"] / bp[1]["client_flops"]
    assert 0.55 < ratio < 0.8, ratio
    # the federated run of the same config: a ZO client step costs what a central one does
    fed = read_rows(run(config, plots=False) / "clients.jsonl")
    per_step = fed[0]["flops"] / fed[0]["steps"]
    assert abs(rows[1]["client_flops"] / steps - per_step) / per_step < 0.5


def test_central_starts_from_the_class_mean_head(tmp_path: Path) -> None:
    config = tiny_run_config(
        tmp_path, "model.head_init=ncm", "model.head_init_clients=5", "run.rounds=1"
    )
    central = read_rows(run_central(config) / "rounds.jsonl")
    federated = read_rows(run(config, stop_after=0, plots=False) / "rounds.jsonl")
    # the same 5 round-0 clients' sums: the same head, the same start
    assert central[0]["eval"]["accuracy"] == federated[0]["eval"]["accuracy"]
