"""Server optimisers against their update formulas (Reddi et al. 2021, Algorithm 2).

The reference below is a direct numpy transcription of the paper's per-coordinate rules,
written independently of fedfit.server_opt:

    m = b1*m + (1-b1)*d
    adagrad: v = v + d^2 ; adam: v = b2*v + (1-b2)*d^2 ; yogi: v = v - (1-b2)*d^2*sign(v-d^2)
    x = x + eta*m/(sqrt(v)+tau),  v0 = tau^2, m0 = 0;  fedavg: x = x + eta*d
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfit.server_opt import SERVER_OPTIMIZERS, ServerConfig, server_step


def reference(
    name: str, x: np.ndarray, deltas: list[np.ndarray], eta: float, b1: float, b2: float, tau: float
) -> np.ndarray:
    m, v = np.zeros_like(x), np.full_like(x, tau**2)
    for d in deltas:
        if name == "fedavg":
            x = x + eta * d
            continue
        m = b1 * m + (1 - b1) * d
        if name == "fedadagrad":
            v = v + d**2
        elif name == "fedadam":
            v = b2 * v + (1 - b2) * d**2
        else:
            v = v - (1 - b2) * d**2 * np.sign(v - d**2)
        x = x + eta * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_server_step_matches_formula(name: str) -> None:
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(3, 4))
    deltas = [rng.normal(scale=0.1, size=(3, 4)) for _ in range(4)]
    cfg = ServerConfig(optimizer=name, lr=0.05, beta1=0.9, beta2=0.99, tau=1e-3)
    params = {"w": torch.tensor(x0)}
    state: dict = {}
    for d in deltas:
        params, state = server_step(params, {"w": torch.tensor(d)}, state, cfg)
    expected = reference(name, x0, deltas, 0.05, 0.9, 0.99, 1e-3)
    np.testing.assert_allclose(params["w"].numpy(), expected, rtol=1e-10, atol=1e-12)


def test_fedyogi_first_step_by_hand() -> None:
    # d = 0.5, tau = 0.1: m = 0.1*0.5 = 0.05; v0 = 0.01, d^2 = 0.25, sign(0.01-0.25) = -1
    # v = 0.01 + 0.01*0.25 = 0.0125; x = 1 + 1.0*0.05/(sqrt(0.0125)+0.1)
    cfg = ServerConfig(optimizer="fedyogi", lr=1.0, beta1=0.9, beta2=0.99, tau=0.1)
    params, state = server_step(
        {"w": torch.tensor([1.0], dtype=torch.float64)},
        {"w": torch.tensor([0.5], dtype=torch.float64)},
        {},
        cfg,
    )
    assert params["w"].item() == pytest.approx(1 + 0.05 / (0.0125**0.5 + 0.1), rel=1e-12)
    assert state["v"]["w"].item() == pytest.approx(0.0125, rel=1e-12)


def test_untouched_tensors_keep_value_and_state() -> None:
    cfg = ServerConfig(optimizer="fedadam")
    params = {"a": torch.ones(2), "b": torch.zeros(2)}
    new, state = server_step(params, {"a": torch.ones(2)}, {}, cfg)
    assert torch.equal(new["b"], params["b"]) and "b" not in state["m"]
    assert not torch.equal(new["a"], params["a"])
