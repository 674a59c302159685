"""Simulated attackers ([attack]): what each kind sends, who attacks, and runs in which the
server rejects what it must and aggregates the rest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedfit.algorithms.base import ClientTask, Update
from fedfit.attack import Attack, AttackConfig, attackers
from fedfit.engine.experiment import run
from fedfit.engine.runfolder import RunFolder
from fedfit.engine.server import sample_clients
from fedfit.errors import ConfigError
from tests.helpers import tiny_run_config

SENT = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "seeds": torch.tensor([3, 5])}
TRAINED = {"w": torch.tensor([[1.5, 1.0], [3.0, 6.0]]), "seeds": torch.tensor([3, 5])}


def attacked(kind: str, scale: float = 1.0, payload_kind: str = "weights") -> Update:
    task = ClientTask(client_id=4, round=2, seed=0, download=dict(SENT))
    update = Update(4, dict(TRAINED), 10, {"train_loss": 0.5})
    return Attack(kind, scale, frozenset({4}), seed=0).corrupt(update, task, payload_kind)


def test_sign_flip_and_scale_act_on_the_change_of_weights() -> None:
    change = TRAINED["w"] - SENT["w"]
    torch.testing.assert_close(attacked("sign_flip").payload["w"], SENT["w"] - change)
    torch.testing.assert_close(attacked("sign_flip", 3.0).payload["w"], SENT["w"] - 3 * change)
    torch.testing.assert_close(attacked("scale", 10.0).payload["w"], SENT["w"] + 10 * change)
    # a gradient (or projected-gradient scalars) is the change itself
    flipped = attacked("sign_flip", 2.0, payload_kind="gradient").payload["w"]
    torch.testing.assert_close(flipped, -2 * TRAINED["w"])
    for kind in ("sign_flip", "scale", "gaussian"):
        assert torch.equal(attacked(kind).payload["seeds"], TRAINED["seeds"])  # ints stay


def test_gaussian_noise_is_seeded_by_client_and_round() -> None:
    a, b = attacked("gaussian", 0.5).payload["w"], attacked("gaussian", 0.5).payload["w"]
    torch.testing.assert_close(a, b)
    noise = a - SENT["w"]
    assert 0.05 < float(noise.std()) < 2.0 and not torch.equal(noise, TRAINED["w"] - SENT["w"])


def test_faults_for_the_server_to_catch() -> None:
    assert torch.isnan(attacked("nan").payload["w"]).sum() == 1
    assert attacked("shape").payload["w"].shape == (2, 2, 2)
    assert attacked("count").num_examples == 10_000
    with pytest.raises(RuntimeError, match="crashed"):
        attacked("error")


def test_attackers_are_a_seeded_share_or_the_given_ids() -> None:
    cfg = AttackConfig(kind="sign_flip", fraction=0.25)
    drawn = attackers(cfg, 12, seed=3)
    assert len(drawn) == 3 and drawn == attackers(cfg, 12, seed=3)
    assert attackers(cfg, 12, seed=4) != drawn or len(drawn) == 12
    assert attackers(AttackConfig(kind="nan", clients=(1, 5)), 12, 0) == {1, 5}
    assert attackers(AttackConfig(kind="none", fraction=0.5), 12, 0) == frozenset()
    with pytest.raises(ConfigError, match="attack.clients"):
        attackers(AttackConfig(kind="nan", clients=(12,)), 12, 0)
    with pytest.raises(ConfigError, match="attack.kind"):
        AttackConfig(kind="flip")


def first_of_each_round(rounds: int = 3) -> list[int]:
    """The first client sampled in each round of the tiny run (seed 0, 12 clients, 3 each)."""
    return sorted({sample_clients(0, r, list(range(12)), 3)[0] for r in range(1, rounds + 1)})


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("nan", "values are not finite"),
        ("shape", "shape (2,"),
        ("count", "the client holds"),
        ("error", "the client failed: RuntimeError"),
    ],
)
def test_the_server_rejects_each_fault_and_the_run_goes_on(
    tmp_path: Path, kind: str, reason: str
) -> None:
    bad = first_of_each_round()
    ids = ",".join(map(str, bad))
    folder = RunFolder(
        run(tiny_run_config(tmp_path, f"attack.kind={kind}", f"attack.clients=[{ids}]"))
    )
    clients = [c for c in folder.clients() if c["round"] > 0]
    for c in clients:
        if c["client_id"] in bad:
            assert c["attack"] == kind and reason in c["rejected"]
        else:
            assert "attack" not in c and "rejected" not in c
    rounds = [r for r in folder.rounds() if r["round"] > 0]
    assert sum(r.get("rejected", 0) for r in rounds) == sum("rejected" in c for c in clients) >= 3
    assert folder.summary()["attackers"] == bad


def test_a_sign_flipper_moves_the_mean_and_not_the_median(tmp_path: Path) -> None:
    """One boosted sign-flipper among 3: the median of 3 ignores it, the mean does not."""
    flip = [
        "attack.kind=sign_flip",
        "attack.scale=20",
        f"attack.clients=[{first_of_each_round(1)[0]}]",
    ]
    base = ["run.rounds=1", "method.name=fedavg"]

    def final(*extra: str) -> dict[str, torch.Tensor]:
        name = "-".join(e.split("=")[1] for e in extra) or "clean"
        folder = RunFolder(run(tiny_run_config(tmp_path, *base, f"run.name={name}", *extra)))
        return folder.load_checkpoint()[0].params

    clean, attacked_mean = final(), final(*flip)
    attacked_median = final(*flip, "server.aggregation=median")
    clean_median = final("server.aggregation=median")

    def dist(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        return sum(float((a[n] - b[n]).double().norm() ** 2) for n in a) ** 0.5

    assert dist(attacked_mean, clean) > 5 * dist(attacked_median, clean_median)
