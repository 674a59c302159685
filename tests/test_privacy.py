"""DP-FedAvg: the clipped noisy mean against a hand computation, the epsilon against opacus's
own accountant, and the refusals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from fedfit.engine.experiment import run
from fedfit.engine.runfolder import RunFolder
from fedfit.errors import ConfigError
from fedfit.privacy import PrivacyConfig, dp_mean, epsilon_spent
from tests.helpers import tiny_run_config


def test_dp_mean_clips_each_change_divides_by_the_sampled_count_and_adds_seeded_noise() -> None:
    ref = {"w": torch.zeros(2, 2), "b": torch.ones(3)}
    big = {"w": torch.full((2, 2), 3.0), "b": torch.ones(3) + 4.0}  # change norm sqrt(36+48)
    small = {"w": torch.full((2, 2), 0.1)}  # trained "w" only; norm 0.2, under the bound
    kw = {"clip_norm": 1.0, "noise_multiplier": 0.5, "sampled": 4}
    got = dp_mean(
        [big, small], ref, gradients=False, generator=torch.Generator().manual_seed(7), **kw
    )
    scale = 1.0 / math.sqrt(4 * 9 + 3 * 16)
    noise = torch.Generator().manual_seed(7)
    std = 0.5 * 1.0 / 4
    want_w = (3.0 * scale + 0.1) / 4 + std * torch.randn(
        (2, 2), generator=noise, dtype=torch.float64
    )
    want_b = 1 + 4.0 * scale / 4 + std * torch.randn(3, generator=noise, dtype=torch.float64)
    torch.testing.assert_close(got["w"], want_w)
    torch.testing.assert_close(got["b"], want_b)
    # no noise: the mean of the clipped changes, each client's change bounded by clip_norm
    plain = dp_mean([big], ref, gradients=True, generator=torch.Generator(),
                    clip_norm=2.0, noise_multiplier=0.0, sampled=1)  # fmt: skip
    norm = math.sqrt(sum(float((t * t).sum()) for t in plain.values()))
    assert norm == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("z", "q", "rounds", "delta"), [(1.0, 0.1, 50, 1e-5), (0.7, 0.25, 3, 1e-3)]
)
def test_epsilon_is_opacus_own(z: float, q: float, rounds: int, delta: float) -> None:
    cfg = PrivacyConfig(noise_multiplier=z, clip_norm=1.0, delta=delta)
    accountant = RDPAccountant()
    for _ in range(rounds):
        accountant.step(noise_multiplier=z, sample_rate=q)
    assert epsilon_spent(cfg, q, rounds) == pytest.approx(accountant.get_epsilon(delta), rel=1e-12)
    # and the same from opacus's RDP analysis functions directly
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = rdp_analysis.compute_rdp(q=q, noise_multiplier=z, steps=rounds, orders=orders)
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    assert epsilon_spent(cfg, q, rounds) == pytest.approx(float(eps), rel=1e-12)
    assert epsilon_spent(cfg, q, 0) == 0.0


PRIVATE = ["privacy.noise_multiplier=1.1", "privacy.clip_norm=0.5", "privacy.delta=1e-4"]


def test_a_private_run_logs_the_epsilon_of_every_round(tmp_path: Path) -> None:
    config = tiny_run_config(tmp_path, *PRIVATE)
    folder = RunFolder(run(config))
    rows = folder.rounds()
    rate = 3 / 12  # clients_per_round / clients
    cfg = config.privacy
    for r in rows:
        assert r["privacy"]["delta"] == 1e-4
        assert r["privacy"]["epsilon"] == pytest.approx(epsilon_spent(cfg, rate, r["round"]))
    eps = [r["privacy"]["epsilon"] for r in rows]
    assert eps[0] == 0.0 and eps == sorted(eps) and eps[-1] > 0
    assert folder.summary()["privacy"] == rows[-1]["privacy"]
    # the noise is seeded: the same config gives the same rounds
    again = RunFolder(run(tiny_run_config(tmp_path / "b", *PRIVATE)))
    assert [r.get("eval") for r in again.rounds()] == [r.get("eval") for r in rows]
    # and the noise is there: without it the model ends elsewhere
    plain = RunFolder(run(tiny_run_config(tmp_path / "c", "privacy.noise_multiplier=0")))
    assert plain.rounds()[-1]["eval"] != rows[-1]["eval"]


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["method.name=fedkseed"], "seeds and scalars"),
        (["server.aggregation=median"], "server.aggregation"),
        (["model.head_init=ncm", "method.name=fedavg"], "head_init"),
        (["method.name=partial"], "a share of the tensors"),
    ],
)
def test_what_dp_fedavg_cannot_cover_is_refused(
    tmp_path: Path, overrides: list[str], says: str
) -> None:
    with pytest.raises(ConfigError, match=says):
        run(tiny_run_config(tmp_path, "privacy.noise_multiplier=1.0", *overrides))
