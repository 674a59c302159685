"""Forward-mode methods (algorithms/forward/) against autograd, finite differences, Spry's
split rule and the FedYogi formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedfit.algorithms import make_algorithm
from fedfit.algorithms.base import ClientContext
from fedfit.algorithms.forward import (
    assign_groups,
    cosine,
    draw_tangents,
    finite_difference_gradient,
    forward_gradient,
    loss_and_jvp,
    select_tangents,
    tensor_groups,
)
from fedfit.config import load_config
from fedfit.costs import measure_step
from fedfit.engine.meter import CostMeter
from fedfit.models import load_model
from tests.helpers import random_shard


def _prepared(
    method: str, *overrides: str, model_name: str = "tiny-bert", task: str = "classification"
):
    config = load_config(
        None,
        [f"method.name={method}", "train.local_steps=2", "train.batch_size=4", *overrides],
    )
    model, _ = load_model(model_name, task, num_labels=3, seed=0)
    algorithm = make_algorithm(config)
    model = algorithm.prepare(model, task)
    model.eval()
    return config, algorithm, model


def _autograd(model: torch.nn.Module, params: dict, batch: dict) -> dict[str, torch.Tensor]:
    for p in params.values():
        p.grad = None
    model(**batch).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    return grads


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("model_name", "task"), [("tiny-bert", "classification"), ("tiny-llama", "lm")]
)
def test_jvp_equals_autograd_gradient_dot_tangent(model_name: str, task: str) -> None:
    _, _, model = _prepared("fedfgd", model_name=model_name, task=task)
    params = _trainable(model)
    batch = random_shard(0, 4, seed=1, lm=task == "lm").batch([0, 1, 2, 3])
    grads = _autograd(model, params, batch)
    for seed in range(3):
        v = draw_tangents(
            {n: p.shape for n, p in params.items()}, torch.Generator().manual_seed(seed)
        )
        loss, d = loss_and_jvp(model, {n: p.detach() for n, p in params.items()}, v, batch)
        reference = sum(float((grads[n].double() * v[n].double()).sum()) for n in params)
        assert float(d) == pytest.approx(reference, rel=1e-5, abs=1e-6)
        assert loss.grad_fn is None  # no backward graph was built
        with torch.no_grad():
            plain = float(model(**batch).loss)
        assert float(loss) == pytest.approx(plain, rel=1e-6)


def test_averaged_forward_gradient_approaches_autograd() -> None:
    # A small tensor (the head's 3 biases), 2 short examples: the relative error of the mean
    # of K estimates is about sqrt((d + 1) / K) = 0.12 at K = 300, so cosine > 0.98.
    _, _, model = _prepared("fedfgd", "method.peft=head")
    named = dict(model.named_parameters())
    params = {n: named[n] for n in named if n.endswith("classifier.bias")}
    assert sum(p.numel() for p in params.values()) == 3
    batch = random_shard(0, 2, seed=2).batch([0, 1])
    grads = _autograd(model, params, batch)
    gen = torch.Generator().manual_seed(0)
    shapes = {n: p.shape for n, p in params.items()}
    tangents = [draw_tangents(shapes, gen) for _ in range(300)]
    _, estimate, _ = forward_gradient(model, params, batch, tangents)
    _, few, _ = forward_gradient(model, params, batch, tangents[:5])

    def flat(d: dict) -> torch.Tensor:
        return torch.cat([d[n].flatten() for n in params])

    ref = flat(grads)
    assert float(flat(estimate) @ ref / (flat(estimate).norm() * ref.norm())) > 0.98
    # the error shrinks like 1 / sqrt(K): 60x the tangents, far closer
    assert (flat(estimate) - ref).norm() < 0.3 * (flat(few) - ref).norm()


def test_central_differences_match_jvp_and_restore_weights() -> None:
    _, _, model = _prepared("baffle", "method.peft=head")
    params = _trainable(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    batch = random_shard(0, 8, seed=3).batch(list(range(8)))
    shapes = {n: p.shape for n, p in params.items()}
    tangents = [draw_tangents(shapes, torch.Generator().manual_seed(s)) for s in range(3)]
    # sigma 1e-2 on a loss that is nearly quadratic this close: the central difference agrees
    # with the exact directional derivative to O(sigma^2)
    _, fd = finite_difference_gradient(model, params, batch, tangents, sigma=1e-2)
    _, exact, _ = forward_gradient(model, params, batch, tangents)
    for n in params:
        torch.testing.assert_close(fd[n], exact[n], rtol=1e-3, atol=1e-5)
        assert torch.equal(params[n], before[n])  # restored bit for bit


def test_forward_step_stores_no_activations_for_backward() -> None:
    # An 8-layer BERT (hidden 64) with LoRA, batch 16 x 64: backprop keeps every layer's
    # activations for the backward pass, the jvp step only the current layer's primal and
    # tangent values, so its transient memory is a fraction of backprop's.
    from transformers import BertConfig, BertForSequenceClassification

    from fedfit.models.configs import TINY_BERT

    config = BertConfig(
        **{**TINY_BERT, "num_hidden_layers": 8, "hidden_size": 64, "intermediate_size": 256},
        num_labels=3,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    cfg = load_config(None, ["method.name=fedfgd"])
    algorithm = make_algorithm(cfg)
    model = algorithm.prepare(BertForSequenceClassification(config), "classification").eval()
    params = _trainable(model)
    batch = random_shard(0, 16, seed=4, length=64).batch(list(range(16)))
    opt = torch.optim.AdamW(params.values(), lr=1e-3)
    _, backprop, bp_flops = measure_step(model, opt, batch)

    gen = torch.Generator().manual_seed(0)
    shapes = {n: p.shape for n, p in params.items()}

    def jvp_step(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        loss, est, _ = forward_gradient(model, params, batch, [draw_tangents(shapes, gen)])
        for n, p in params.items():
            p.grad = est[n]
        return loss

    _, forward, fwd_flops = measure_step(model, opt, batch, step=jvp_step)
    assert forward.activations_bytes < 0.4 * backprop.activations_bytes
    assert forward.grads_bytes == backprop.grads_bytes  # the estimate has the grads' shapes
    # With frozen weights as constants a jvp is two forwards (primal + tangent), as is
    # LoRA's backprop (forward + input gradients): equal up to the small LoRA products.
    assert fwd_flops == pytest.approx(bp_flops, rel=0.05)


# ---------------------------------------------------------------- Spry's split


def test_assign_groups_covers_each_group_once_when_clients_are_fewer() -> None:
    for groups in range(1, 13):
        for clients in range(1, groups + 1):
            shares = assign_groups(groups, clients)
            flat = sorted(g for share in shares for g in share)
            assert flat == list(range(groups))
            assert all(share for share in shares)  # nobody idle
    # more clients than groups: each group goes to floor or ceil(K / G) clients
    shares = assign_groups(3, 10)
    counts = np.bincount([g for share in shares for g in share])
    assert counts.tolist() == [4, 3, 3]


def test_spry_round_covers_every_trainable_tensor_exactly_once() -> None:
    _, algorithm, model = _prepared("spry", "method.share_head=false")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    state = algorithm.init(model)
    # tiny-bert: 2 layers x (query, value) = 4 LoRA groups + the head as one group
    assert len(algorithm.groups) == 5
    assert all(len(g) == 2 for g in algorithm.groups[:4])
    for clients in ([7], [1, 4], [0, 2, 5, 9, 11]):
        algorithm.start_round(state, clients)
        tasks = [algorithm.configure(state, c, seed=c) for c in clients]
        trained = [n for t in tasks for n in t.config["train"]]
        assert sorted(trained) == sorted(trainable)
    # LoRA A and B of one module always travel together
    for t in tasks:
        for n in t.config["train"]:
            if "lora_A" in n:
                assert n.replace("lora_A", "lora_B") in t.config["train"]


def test_spry_shared_head_goes_to_every_client() -> None:
    _, algorithm, model = _prepared("spry")
    state = algorithm.init(model)
    algorithm.start_round(state, [3, 8])
    for c in (3, 8):
        names = algorithm.configure(state, c, seed=1).config["train"]
        assert sum("classifier" in n for n in names) == 2


def test_spry_uploads_only_its_share_and_fedyogi_matches_formula() -> None:
    config, algorithm, model = _prepared(
        "spry",
        "server.optimizer=fedyogi",
        "server.lr=0.01",
        "server.beta1=0.9",
        "server.beta2=0.99",
        "server.tau=1e-3",
        "method.share_head=false",
    )
    state = algorithm.init(model)
    clients = [0, 1, 2]
    algorithm.start_round(state, clients)
    ctx = ClientContext(config.train, CostMeter())
    updates = []
    for c in clients:
        task = algorithm.configure(state, c, seed=10 + c)
        update = algorithm.client_update(model, task, random_shard(c, 6 + 2 * c, seed=c), ctx)
        assert set(update.payload) == set(task.config["train"])
        updates.append(update)
    new = algorithm.aggregate(state, updates)

    # Reference in numpy: each tensor's mean over the clients that trained it, then FedYogi
    # from zero moments with v0 = tau^2: m = (1 - b1) d, v = v0 - (1 - b2) d^2 sign(v0 - d^2),
    # x += eta m / (sqrt(v) + tau).
    eta, b1, b2, tau = 0.01, 0.9, 0.99, 1e-3
    for name, x in state.params.items():
        holders = [u for u in updates if name in u.payload]
        assert len(holders) == 1  # K <= G: one client per tensor
        w = np.array([u.num_examples for u in holders], dtype=float)
        mean = (
            sum(wi * u.payload[name].double().numpy() for wi, u in zip(w, holders, strict=True))
            / w.sum()
        )
        d = mean - x.double().numpy()
        v0 = tau**2
        m = (1 - b1) * d
        v = v0 - (1 - b2) * d**2 * np.sign(v0 - d**2)
        expected = x.double().numpy() + eta * m / (np.sqrt(v) + tau)
        np.testing.assert_allclose(
            new.params[name].double().numpy(), expected, rtol=1e-5, atol=1e-7
        )


def test_spry_per_iteration_server_rebuilds_the_clients_estimate() -> None:
    config, algorithm, model = _prepared(
        "spry", "method.communication=iteration", "method.tangents=3", "train.lr=0.1"
    )
    state = algorithm.init(model)
    algorithm.start_round(state, [5])
    task = algorithm.configure(state, 5, seed=21)
    shard = random_shard(5, 8, seed=5)
    ctx = ClientContext(config.train, CostMeter())
    update = algorithm.client_update(model, task, shard, ctx)
    assert set(update.payload) == {"jvp"} and update.payload["jvp"].shape == (3,)
    new = algorithm.aggregate(state, [update])

    # the client's own estimate, recomputed here with the same seed, batch and tangents
    from fedfit.algorithms.base import batch_indices, load_tensors_

    load_tensors_(model, state.params)
    names = task.config["train"]
    named = dict(model.named_parameters())
    params = {n: named[n] for n in names}
    gen = torch.Generator().manual_seed(21)
    shapes = {n: p.shape for n, p in params.items()}
    tangents = [draw_tangents(shapes, gen) for _ in range(3)]
    batch = shard.batch(next(batch_indices(shard, config.train, 21)))
    _, estimate, _ = forward_gradient(model, params, batch, tangents)
    for n in names:  # server fedavg with lr 1: x - train.lr * g
        torch.testing.assert_close(
            new.params[n], state.params[n] - 0.1 * estimate[n], rtol=1e-5, atol=1e-6
        )


def test_fwdllm_keeps_the_candidates_best_aligned_with_the_last_update() -> None:
    shapes = {"a": torch.Size([4, 5]), "b": torch.Size([7])}
    direction = draw_tangents(shapes, torch.Generator().manual_seed(99))
    kept = select_tangents(shapes, direction, 50, 5, torch.Generator().manual_seed(1))
    # brute force: score all 50 candidates (same seeds) and sort
    gen = torch.Generator().manual_seed(1)
    seeds = [int(s) for s in torch.randint(2**62, (50,), generator=gen)]
    scores = sorted(
        (
            abs(cosine(draw_tangents(shapes, torch.Generator().manual_seed(s)), direction))
            for s in seeds
        ),
        reverse=True,
    )
    assert [abs(cosine(v, direction)) for v in kept] == pytest.approx(scores[:5])
    assert scores[4] > 2 * float(np.median(scores))


def test_fwdllm_sends_the_last_update_with_the_weights() -> None:
    config, algorithm, model = _prepared("fwdllm", "method.tangents=2", "method.candidates=4")
    state = algorithm.init(model)
    ctx = ClientContext(config.train, CostMeter())
    task = algorithm.configure(state, 0, seed=1)
    assert set(task.download) == set(state.params)  # round 1: no direction yet
    first = algorithm.client_update(model, task, random_shard(0, 8, seed=1), ctx)
    new = algorithm.aggregate(state, [first])
    task = algorithm.configure(new, 0, seed=2)
    extra = {n for n in task.download if n.startswith("last_update/")}
    assert extra == {f"last_update/{n}" for n in state.params}  # sent, hence counted
    for n, t in new.extra["last_update"].items():  # server fedavg, lr 1: the client's step
        torch.testing.assert_close(t, first.payload[n] - state.params[n])
        assert torch.equal(task.download[f"last_update/{n}"], t)


def test_tensor_groups_pairs_lora_and_leaves_out_the_head() -> None:
    names = [
        "l0.query.lora_A.default.weight",
        "l0.query.lora_B.default.weight",
        "l0.value.lora_A.default.weight",
        "l0.value.lora_B.default.weight",
        "classifier.weight",
    ]
    assert tensor_groups(names, ["classifier.weight"]) == [names[:2], names[2:4]]
    assert tensor_groups(["a.bias", "b.bias"], []) == [["a.bias"], ["b.bias"]]
