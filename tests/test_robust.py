"""Robust aggregation rules against brute-force loops, and one scaled attacker in a run."""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path

import pytest
import torch

from fedfit.engine.experiment import run
from fedfit.engine.runfolder import RunFolder
from fedfit.errors import ConfigError
from fedfit.robust import clip, combine, krum_scores, median, trimmed_mean
from tests.helpers import misbehave, tiny_run_config


def payloads(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(3, 2, generator=g), "b": torch.randn(2, generator=g)}
            for _ in range(n)]  # fmt: skip


@pytest.mark.parametrize("n", [1, 2, 5, 6])
def test_median_is_the_coordinate_wise_median(n: int) -> None:
    ps = payloads(n)
    got = median(ps)
    for name in ("w", "b"):
        for idx in itertools.product(*(range(s) for s in ps[0][name].shape)):
            values = [float(p[name][idx]) for p in ps]
            assert float(got[name][idx]) == pytest.approx(statistics.median(values), abs=1e-12)


@pytest.mark.parametrize(("n", "trim"), [(5, 0.2), (10, 0.1), (10, 0.25), (4, 0.0)])
def test_trimmed_mean_drops_each_end(n: int, trim: float) -> None:
    ps = payloads(n, seed=1)
    got = trimmed_mean(ps, trim)
    k = int(trim * n)
    for idx in itertools.product(range(3), range(2)):
        values = sorted(float(p["w"][idx]) for p in ps)
        kept = values[k : n - k]
        assert float(got["w"][idx]) == pytest.approx(sum(kept) / len(kept), abs=1e-12)


def test_krum_picks_the_update_closest_to_its_neighbours() -> None:
    ps = payloads(6, seed=2)
    ps[4] = {k: v + 100.0 for k, v in ps[4].items()}  # an attacker far from everyone
    f = 1
    scores = krum_scores(ps, f)
    flat = [torch.cat([p["b"], p["w"].reshape(-1)]).double() for p in ps]  # sorted names
    for i, x in enumerate(flat):
        d = sorted(float(((x - y) ** 2).sum()) for j, y in enumerate(flat) if j != i)
        assert scores[i] == pytest.approx(sum(d[: 6 - f - 2]), rel=1e-9)
    best = min(range(6), key=lambda i: scores[i])
    got = combine(ps, [1.0] * 6, rule="krum", krum_f=f)
    torch.testing.assert_close(got["w"], ps[best]["w"].double())
    multi = combine(ps, [1.0] * 6, rule="multi_krum", krum_f=f)
    chosen = sorted(range(6), key=lambda i: scores[i])[:5]
    assert 4 not in chosen
    torch.testing.assert_close(
        multi["w"], torch.stack([ps[i]["w"] for i in chosen]).double().mean(0)
    )


def test_clipping_bounds_each_change() -> None:
    ref = {"w": torch.zeros(3, 2), "b": torch.ones(2)}
    p = {"w": torch.full((3, 2), 3.0), "b": torch.ones(2) + 4.0}
    out = clip(p, ref, 1.0)
    change = torch.cat([(out["w"] - 0).reshape(-1), out["b"] - 1])
    assert float(change.norm()) == pytest.approx(1.0)
    torch.testing.assert_close(out["w"] / out["w"].norm(), p["w"].double() / p["w"].norm())
    small = clip({"w": torch.full((3, 2), 0.1), "b": torch.ones(2)}, ref, 1.0)
    torch.testing.assert_close(small["w"], torch.full((3, 2), 0.1, dtype=torch.float64))


def test_mean_is_the_weighted_mean() -> None:
    ps = payloads(3, seed=3)
    got = combine(ps, [1.0, 2.0, 3.0])
    want = (ps[0]["b"] + 2 * ps[1]["b"] + 3 * ps[2]["b"]).double() / 6
    torch.testing.assert_close(got["b"], want)


def scale_one_client(monkeypatch: pytest.MonkeyPatch, factor: float) -> None:
    """The first client of every round sends its change times ``factor``."""

    def change(update, task):  # type: ignore[no-untyped-def]
        update.payload = {
            n: task.download[n] + factor * (t - task.download[n]) for n, t in update.payload.items()
        }
        return update

    misbehave(monkeypatch, change)


def test_median_resists_a_scaled_attacker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["run.rounds=1", "method.name=bitfit", "data.clients_per_round=5", "train.lr=1e-2"]

    def model(name: str, *extra: str) -> dict[str, torch.Tensor]:
        out = run(tiny_run_config(tmp_path, *base, f"run.name={name}", *extra), plots=False)
        return RunFolder(out).load_checkpoint()[0].params

    median_rule = "server.aggregation=median"
    clean_mean, clean_median = model("clean-mean"), model("clean-median", median_rule)
    scale_one_client(monkeypatch, -1000.0)  # one of five clients: sign-flipped and scaled
    bad_mean, bad_median = model("mean"), model("median", median_rule)

    def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        return float(sum(((a[n] - b[n]).double() ** 2).sum() for n in a)) ** 0.5

    moved_mean, moved_median = distance(bad_mean, clean_mean), distance(bad_median, clean_median)
    # the mean follows the attacker; the median moves within the honest clients' spread
    assert moved_mean > 0 and moved_median < moved_mean / 20, (moved_median, moved_mean)


def test_scalar_uploads_refuse_robust_rules(tmp_path: Path) -> None:
    from fedfit.engine.setup import build

    with pytest.raises(ConfigError, match="fedkseed uploads seeds and scalars"):
        build(tiny_run_config(tmp_path, "method.name=fedkseed", "server.aggregation=median"))


def test_decomfl_combines_each_steps_scalars_by_the_rule(tmp_path: Path) -> None:
    """DeComFL's clients share the round's seeds, so the scalar of each (step, perturbation)
    is combined across clients: the coordinate-wise median of three clients here, against
    the median taken by hand (one client ran one step fewer)."""
    from fedfit.algorithms.base import Update
    from fedfit.engine.setup import build

    config = tiny_run_config(
        tmp_path, "method.name=decomfl", "method.perturbations=2", "server.aggregation=median"
    )
    setup = build(config)
    state = setup.algorithm.init(setup.model)
    g = torch.Generator().manual_seed(5)
    scalars = [torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g),
               torch.randn(2, 2, generator=g)]  # fmt: skip
    updates = [Update(i, {"scalar": s}, 10 + i, {}) for i, s in enumerate(scalars)]
    means = setup.algorithm.aggregate(state, updates).extra["rounds"][-1][1]
    for step in range(3):
        for p in range(2):
            values = [float(s[step, p]) for s in scalars if step < len(s)]
            assert float(means[step, p]) == pytest.approx(statistics.median(values), abs=1e-6)
    # the mean stays the example-weighted mean of the method
    plain = build(tiny_run_config(tmp_path, "method.name=decomfl", "method.perturbations=2"))
    weighted = plain.algorithm.aggregate(plain.algorithm.init(plain.model), updates)
    want = (10 * scalars[0][0] + 11 * scalars[1][0] + 12 * scalars[2][0]) / 33
    torch.testing.assert_close(weighted.extra["rounds"][-1][1][0], want)
