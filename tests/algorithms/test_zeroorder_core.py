"""Zero-order core: bit-identical perturb/restore, z's definition, the two-point estimate."""

from __future__ import annotations

import pytest
import torch

from fedfit.algorithms.zeroorder.core import (
    CHUNK,
    add_noise_,
    perturb_,
    projected_gradient,
    replay_,
    restore_,
)
from fedfit.models import load_model


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view({4: torch.int32, 8: torch.int64}[t.element_size()])


def _z(name: str, like: torch.Tensor, seed: int) -> torch.Tensor:
    """z(seed) for one tensor: add it once to zeros (exact: 0 + 1.0 * z = z)."""
    zero = {name: torch.zeros_like(like)}
    add_noise_(zero, seed, 1.0)
    return zero[name]


def tiny_params() -> dict[str, torch.nn.Parameter]:
    model, _ = load_model("tiny-bert", "classification", num_labels=3, seed=0)
    return dict(model.named_parameters())


@pytest.mark.parametrize("eps", [1e-3, 1e-2])
def test_perturb_and_restore_are_bit_identical(eps: float) -> None:
    params = tiny_params()
    # Awkward values: signed zeros, subnormals, huge, NaN, values much smaller than eps.
    special = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 3e38, float("nan"), 1e-9, -7e-6])
    params["special"] = torch.nn.Parameter(torch.cat([special, torch.randn(CHUNK + 5) * 1e-4]))
    before = {n: p.detach().clone() for n, p in params.items()}
    for seed in (1, 2):
        record = perturb_(params, seed, eps)
        assert record.nbytes > 0  # some low bits were lost and had to be kept
        # the perturbation really is eps * z, up to float32 rounding
        name = "bert.embeddings.word_embeddings.weight"
        moved = (params[name].detach() - before[name]) / eps
        torch.testing.assert_close(moved, _z(name, before[name], seed), rtol=0, atol=2e-3)
        record = restore_(params, record, then_scale=-eps)
        assert record is not None
        torch.testing.assert_close(
            (before[name] - params[name].detach()) / eps,
            _z(name, before[name], seed),
            rtol=0,
            atol=2e-3,
        )
        restore_(params, record)
        for n, p in params.items():
            assert torch.equal(_bits(p), _bits(before[n])), n


def test_corrections_are_a_few_percent_of_the_weights() -> None:
    params = tiny_params()
    weights = sum(p.numel() * p.element_size() for p in params.values())
    record = perturb_(params, 3, 1e-3)
    # measured 5.6% on this random BERT (3 bytes per element whose low bits are lost)
    assert 0.02 < record.nbytes / weights < 0.07
    restore_(params, record)


def test_restored_even_if_the_loss_raises() -> None:
    params = {"w": torch.nn.Parameter(torch.randn(100) * 1e-3)}
    before = params["w"].detach().clone()

    def boom() -> float:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        projected_gradient(params, 5, 1e-2, boom)
    assert torch.equal(_bits(params["w"]), _bits(before))


def test_z_depends_on_seed_and_name_only() -> None:
    a, b = torch.zeros(3 * CHUNK + 7), torch.zeros(10)
    both = {"a": a.clone(), "b": b.clone()}
    add_noise_(both, 9, 1.0)
    alone = {"b": b.clone()}
    add_noise_(alone, 9, 1.0)
    assert torch.equal(both["b"], alone["b"])
    assert not torch.equal(both["b"], _z("c", b, 9))  # another name, another z
    assert not torch.equal(both["b"], _z("b", b, 10))  # another seed, another z
    z = both["a"]
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02


def test_replay_is_bit_identical_to_the_steps() -> None:
    start = {"w": torch.randn(40, 30), "v": torch.randn(7)}
    steps = [(11, -0.3), (12, 0.25), (11, 1e-4)]
    stepped = {n: t.clone() for n, t in start.items()}
    for seed, coeff in steps:
        add_noise_(stepped, seed, coeff)
    replayed = {n: t.clone() for n, t in start.items()}
    replay_(replayed, [s for s, _ in steps], [c for _, c in steps])
    for n in start:
        assert torch.equal(stepped[n], replayed[n])


def _quadratic():
    """L(w) = 1/2 w^T A w + b^T w on a float64 vector of 4, gradient A w + b."""
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    a = m @ m.T + torch.eye(4, dtype=torch.float64)
    b = torch.randn(4, generator=gen, dtype=torch.float64)
    w = torch.nn.Parameter(torch.randn(4, generator=gen, dtype=torch.float64))

    def loss() -> float:
        x = w.detach()
        return float(0.5 * x @ a @ x + b @ x)

    return {"w": w}, loss, (a @ w.detach() + b)


def test_two_point_estimate_is_the_directional_derivative_on_a_quadratic() -> None:
    params, loss, grad = _quadratic()
    for seed in range(5):
        g, plus, minus = projected_gradient(params, seed, 1e-3, loss)
        # central differences are exact on a quadratic; g is rounded to float32 (the wire)
        exact = float(_z("w", params["w"], seed) @ grad)
        assert g == pytest.approx(exact, rel=1e-6, abs=1e-6)


def test_expected_estimate_is_the_gradient_on_a_quadratic() -> None:
    params, loss, grad = _quadratic()
    n = 3000
    total = torch.zeros(4, dtype=torch.float64)
    for seed in range(n):
        g, _, _ = projected_gradient(params, seed, 1e-3, loss)
        total += g * _z("w", params["w"], seed)
    mean = total / n
    # each component of g z has std about sqrt(|grad|^2 + 2 grad_i^2) <= sqrt(3) |grad|;
    # 4 standard errors of the mean over n draws
    bound = 4 * 3**0.5 * float(grad.norm()) / n**0.5
    assert float((mean - grad).abs().max()) < bound
    assert bound < 0.15 * float(grad.norm())  # the bound itself is meaningful
