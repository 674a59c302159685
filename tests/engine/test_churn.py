"""Simulated churn: dropouts drawn per device, stragglers past the round deadline, and
rounds retried with a fresh sample, each against a recomputation of what must happen."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedfit.devices import Budget
from fedfit.engine.experiment import run
from fedfit.engine.runfolder import RunFolder
from fedfit.engine.server import DROPOUT_SALT, sample_clients
from fedfit.errors import ConfigError, RunStopped
from tests.helpers import tiny_run_config

TIERS = "devices.population=tiers"


def test_dropouts_are_the_seeded_draws_of_each_device(tmp_path: Path) -> None:
    tiers = 'devices.tiers=["flaky share=0.5 dropout=0.6", "steady share=0.5"]'
    folder = RunFolder(run(tiny_run_config(tmp_path, TIERS, tiers, "data.clients_per_round=6")))
    rows = [c for c in folder.clients() if c["round"] > 0]
    dropped = {(c["round"], c["client_id"]) for c in rows if "dropped" in c}
    want = set()
    for c in rows:
        if c["tier"] == "flaky":
            draw = np.random.default_rng([0, c["round"], 0, c["client_id"], DROPOUT_SALT])
            if draw.random() < 0.6:
                want.add((c["round"], c["client_id"]))
    assert dropped == want and dropped  # some dropped, none of the steady tier
    for c in rows:
        if "dropped" in c:
            assert "dropout chance is 0.6" in c["dropped"]
            assert (c["flops"], c["upload_bytes"], c["steps"]) == (0, 0, 0)
            assert c["download_bytes"] > 0  # it dropped out after its download
    for r in folder.rounds()[1:]:
        sampled = sample_clients(0, r["round"], list(range(12)), 6)
        gone = [cid for cid in sampled if (r["round"], cid) in dropped]
        assert r["clients"] == [cid for cid in sampled if cid not in gone]
        assert r.get("dropped", 0) == len(gone)


def test_stragglers_past_the_deadline_are_dropped(tmp_path: Path) -> None:
    tiers = (
        'devices.tiers=["slow share=0.5 speed=1MFLOP bandwidth=1kB", "fast share=0.5 speed=1PFLOP"]'
    )
    folder = RunFolder(run(tiny_run_config(tmp_path, TIERS, tiers, "run.deadline_s=60")))
    rows = [c for c in folder.clients() if c["round"] > 0]
    slow = Budget(flops_per_s=10**6, bytes_per_s=1000)
    for c in rows:
        moved = c["download_bytes"] + c["upload_bytes"]
        if c["tier"] == "slow":
            want = c["flops"] / 1e6 + moved / 1000
            assert c["simulated_s"] == pytest.approx(want, abs=1e-3) and want > 60
            assert slow.round_seconds(c["flops"], moved) == pytest.approx(want)
            assert c["dropped"].startswith("straggler") and "run.deadline_s = 60" in c["dropped"]
        else:
            assert c["simulated_s"] == pytest.approx(c["flops"] / 1e15, abs=1e-3)
            assert "dropped" not in c
    assert folder.summary()["dropped_updates"] == sum(c["tier"] == "slow" for c in rows) > 0


def test_a_failed_round_is_retried_with_a_fresh_sample(tmp_path: Path) -> None:
    first = sample_clients(0, 1, list(range(12)), 3)
    crash = ["attack.kind=error", f"attack.clients=[{','.join(map(str, first))}]", "run.rounds=1"]
    with pytest.raises(RunStopped, match="fewer than run.min_clients"):
        run(tiny_run_config(tmp_path, *crash, "run.name=once"))
    folder = RunFolder(run(tiny_run_config(tmp_path, *crash, "run.retries=2")))
    row = folder.rounds()[1]
    fresh = sample_clients(0, 1, list(range(12)), 3, attempt=1)
    assert row["attempts"] == 2 and row["clients"] == fresh
    rows = [c for c in folder.clients() if c["round"] == 1]
    assert [(c.get("attempt", 0), c["client_id"]) for c in rows] == [
        *((0, c) for c in first),
        *((1, c) for c in fresh),
    ]
    assert all("rejected" in c for c in rows[:3])
    # the failed attempt's work counts in the round's totals
    assert row["client_flops"] == sum(c["flops"] for c in rows)


def test_bad_churn_settings_are_named(tmp_path: Path) -> None:
    for bad, key in [
        ('devices.tiers=["a share=1 dropout=1.5"]', "dropout"),
        ('devices.tiers=["a share=1 speed=fast"]', "speed"),
        ("run.deadline_s=-1", "run.deadline_s"),
        ("run.retries=-1", "run.retries"),
    ]:
        with pytest.raises(ConfigError, match=key):
            tiny_run_config(tmp_path, TIERS, 'devices.tiers=["a share=1"]', bad)
