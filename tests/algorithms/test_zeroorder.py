"""Zero-order methods: replay reproduces clients and the server, bytes, FLOPs, memory."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fedfit.algorithms import make_algorithm
from fedfit.algorithms.backprop import NoStepOptimizer
from fedfit.algorithms.base import ClientContext, ServerState, Update
from fedfit.algorithms.zeroorder.core import derive, replay_
from fedfit.algorithms.zeroorder.decomfl import replay_history
from fedfit.algorithms.zeroorder.kseed import seed_probabilities
from fedfit.algorithms.zeroorder.mezo import loss_of, mezo_step, step_coeff, trained
from fedfit.algorithms.zeroorder.spzo import SplitModel, replay_client, spzo_step
from fedfit.config import load_config
from fedfit.costs import MemoryTracker, count_flops, measure_step, storage_bytes
from fedfit.data import collate
from fedfit.engine.meter import CostMeter
from fedfit.errors import ConfigError
from fedfit.models import load_model
from fedfit.payload import payload_bytes
from tests.helpers import random_shard


def zo_setup(
    name: str, *overrides: str, model_name: str = "tiny-bert", task: str = "classification"
):
    config = load_config(
        None,
        [
            f"method.name={name}",
            "train.local_steps=3",
            "train.batch_size=4",
            "train.lr=1e-2",
            *overrides,
        ],
    )
    model, _ = load_model(model_name, task, num_labels=3, seed=0)
    algorithm = make_algorithm(config)
    model = algorithm.prepare(model, task)
    ctx = ClientContext(train=config.train, meter=CostMeter())
    return config, algorithm, model, ctx


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trained(model).items()}


def assert_params_close(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float
) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=atol, msg=n)


# ---------------------------------------------------------------- replaying a client


def test_fedkseed_replay_of_the_upload_gives_the_client_model() -> None:
    config, algorithm, model, ctx = zo_setup("fedkseed")
    state = algorithm.init(model)
    update = algorithm.client_update(
        model, algorithm.configure(state, 0, 4), random_shard(0, 9, 1), ctx
    )
    final = snapshot(model)
    seeds = [algorithm.pool[int(k)] for k in update.payload["seed_index"]]
    coeffs = [step_coeff(config.train.lr, float(g), 1) for g in update.payload["scalar"]]
    replayed = {n: t.clone() for n, t in state.params.items()}
    replay_(replayed, seeds, coeffs)
    assert_params_close(replayed, final, atol=1e-6)
    assert any(not torch.equal(final[n], state.params[n]) for n in final)  # it did train


def test_decomfl_replay_of_the_upload_gives_the_client_model() -> None:
    config, algorithm, model, ctx = zo_setup("decomfl", "method.perturbations=2")
    state = algorithm.init(model)
    task = algorithm.configure(state, 0, 4)
    update = algorithm.client_update(model, task, random_shard(0, 9, 1), ctx)
    base = int(task.download["base_seed"][0])
    scalars = update.payload["scalar"]
    assert scalars.shape == (3, 2)
    replayed = {n: t.clone() for n, t in state.params.items()}
    for t, row in enumerate(scalars.tolist()):
        replay_(
            replayed,
            [derive(base, t, p) for p in range(2)],
            [step_coeff(config.train.lr, g, 2) for g in row],
        )
    assert_params_close(replayed, snapshot(model), atol=1e-6)


def test_fedspzo_replay_of_the_upload_gives_the_client_model() -> None:
    config, algorithm, model, ctx = zo_setup("fedspzo", "method.p1=2", "method.p2=3")
    state = algorithm.init(model)
    update = algorithm.client_update(
        model, algorithm.configure(state, 0, 4), random_shard(0, 9, 1), ctx
    )
    assert update.payload["block1_scalar"].shape == (3, 2)
    assert update.payload["block2_scalar"].shape == (3, 2, 3)
    replayed = {n: t.clone() for n, t in state.params.items()}
    names1, names2 = algorithm.block_names
    replay_client(
        {n: replayed[n] for n in names1},
        {n: replayed[n] for n in names2},
        update.payload,
        config.train.lr,
    )
    assert_params_close(replayed, snapshot(model), atol=1e-6)


def test_mezo_step_is_theta_minus_lr_mean_g_z() -> None:
    """Reference: theta - lr/P sum_p g_p z_p with z_p regenerated independently."""
    # float64, so that the loss difference is not drowned by float32 rounding of the loss
    w = torch.nn.Parameter(torch.randn(50, dtype=torch.float64) * 0.1)
    target = torch.randn(50, dtype=torch.float64)
    params = {"w": w}
    start = w.detach().clone()

    def loss() -> float:
        return float(((w.detach() - target) ** 2).sum())

    seeds = [3, 4, 5]
    scalars, _ = mezo_step(params, loss, seeds, 1e-3, 0.05)
    expected = start.clone()
    for s, g in zip(seeds, scalars, strict=True):
        z = {"w": torch.zeros(50, dtype=torch.float64)}
        replay_(z, [s], [1.0])
        expected -= 0.05 / 3 * g * z["w"]
        # each g is the directional derivative 2 (w - target) . z (exact for a quadratic)
        assert g == pytest.approx(float(2 * (start - target) @ z["w"]), rel=1e-6)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- the servers


def _round(algorithm, state, model, ctx, clients, sizes):
    """One round by hand: configure, train, aggregate; returns (new state, client models)."""
    updates, finals = [], []
    for cid, n in zip(clients, sizes, strict=True):
        task = algorithm.configure(state, cid, 100 + cid + 10 * state.round)
        updates.append(algorithm.client_update(model, task, random_shard(cid, n, cid), ctx))
        finals.append(snapshot(model))
    return algorithm.aggregate(state, updates), finals, updates


@pytest.mark.parametrize("name", ["fedkseed", "decomfl", "fedspzo"])
def test_global_model_is_the_weighted_mean_of_the_client_models(name: str) -> None:
    _, algorithm, model, ctx = zo_setup(name, "method.peft=bitfit")
    state = algorithm.init(model)
    new, finals, _ = _round(algorithm, state, model, ctx, [0, 1], [3, 9])
    expected = {n: 0.25 * finals[0][n] + 0.75 * finals[1][n] for n in state.params}
    assert_params_close(new.params, expected, atol=1e-6)


@pytest.mark.parametrize("name", ["fedkseed", "fedkseed-pro", "decomfl"])
def test_devices_catch_up_by_replaying_the_download(name: str) -> None:
    _, algorithm, model, ctx = zo_setup(name, "method.peft=bitfit")
    theta0 = algorithm.init(model)
    theta1, _, _ = _round(algorithm, theta0, model, ctx, [0, 1], [4, 6])
    theta2, _, _ = _round(algorithm, theta1, model, ctx, [1, 2], [5, 5])
    lr = algorithm.config.train.lr
    for cid, held in ((0, theta0), (1, theta1), (7, theta0)):  # 7: a new device
        download = algorithm.configure(theta2, cid, 1).download
        rebuilt = {n: t.clone() for n, t in held.params.items()}
        if name == "decomfl":
            pairs = replay_history(rebuilt, download, lr, algorithm.opts.perturbations)
            assert pairs == (3 * 5 if held is theta1 else 2 * 3 * 5)
            for n in rebuilt:  # the same pairs in the same order: bit for bit
                assert torch.equal(rebuilt[n], theta2.params[n])
        else:
            seeds = [algorithm.pool[int(k)] for k in download["catch_up_index"]]
            replay_(rebuilt, seeds, download["catch_up_coeff"].tolist())
            assert_params_close(rebuilt, theta2.params, atol=1e-6)
        assert "bert.embeddings.word_embeddings.weight" not in download  # scalars only
        # far below the whole model (what a weights download of full fine-tuning would be)
        assert payload_bytes(download) < 0.01 * 4 * sum(p.numel() for p in model.parameters())


def test_decomfl_bounded_catch_up_sends_the_weights() -> None:
    _, algorithm, model, ctx = zo_setup("decomfl", "method.peft=bitfit", "method.max_catch_up=10")
    theta0 = algorithm.init(model)
    theta1, _, _ = _round(algorithm, theta0, model, ctx, [0], [4])
    download = algorithm.configure(theta1, 5, 1).download  # 15 pairs missed > 10
    assert set(theta1.params) <= set(download) and "history_scalar" not in download


def test_fedkseed_pro_probabilities_by_hand() -> None:
    # mean |g| per seed: [0/1, 2/2, 4/2] = [0, 1, 2] -> min-max [0, .5, 1] -> softmax
    probs = seed_probabilities(
        torch.tensor([0.0, 2.0, 4.0], dtype=torch.float64),
        torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64),
    )
    e = np.exp([0.0, 0.5, 1.0])
    np.testing.assert_allclose(probs.numpy(), e / e.sum(), rtol=1e-12)
    uniform = seed_probabilities(
        torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    )
    np.testing.assert_allclose(uniform.numpy(), 0.25)


def test_fedkseed_upload_is_kilobytes() -> None:
    _, algorithm, model, ctx = zo_setup(
        "fedkseed", "method.peft=head", "train.local_steps=200", "train.batch_size=1"
    )
    state = algorithm.init(model)
    update = algorithm.client_update(
        model, algorithm.configure(state, 0, 4), random_shard(0, 20, 1), ctx
    )
    sent = payload_bytes(update.payload)
    # 200 x (int32 index + float32 scalar) plus the safetensors header
    assert 200 * 8 < sent < 200 * 8 + 200
    full_model = 4 * sum(p.numel() for p in model.parameters())
    assert sent < 1e-3 * full_model


def test_scalar_methods_need_a_replayable_server() -> None:
    config = load_config(None, ["method.name=fedkseed", "server.optimizer=fedadam"])
    with pytest.raises(ConfigError, match="server.optimizer"):
        make_algorithm(config)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["method.name=fedmezo", "method.peft=prefix"], "method.peft"),
        (["method.name=fedmezo", "method.eps=0"], "method.eps"),
        (["method.name=fedspzo", "method.p1=3", "method.p2=3"], "method.p2"),
        (["method.name=decomfl", "method.perturbations=0"], "method.perturbations"),
        (["method.name=fedkseed", "method.num_seeds=0"], "method.num_seeds"),
    ],
)
def test_bad_options_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(None, overrides)


# ---------------------------------------------------------------- FedSPZO's split and FLOPs


def _batch(rows: int, tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(1000, 1200, size=tokens).astype(np.int32) for _ in range(rows)]
    return collate(seqs, 0, labels=[int(x) for x in rng.integers(0, 3, rows)], lm=False)


def test_fedspzo_blocks() -> None:
    _, algorithm, model, _ = zo_setup("fedspzo")  # split -1: the top block + head above
    names1, names2 = algorithm.block_names
    assert all("embeddings" in n or ".layer.0." in n for n in names1)
    assert all(".layer.1." in n or "pooler" in n or "classifier" in n for n in names2)
    assert len(names1) + len(names2) == len(trained(model))


def test_fedspzo_refuses_tied_weights_across_the_split() -> None:
    with pytest.raises(ValueError, match="tied"):
        zo_setup("fedspzo", model_name="tiny-llama", task="lm")


@pytest.mark.parametrize(("split", "p1", "p2"), [(1, 1, 4), (0, 2, 3), (2, 1, 2)])
def test_fedspzo_flops_match_the_formula(split: int, p1: int, p2: int) -> None:
    _, _, model, _ = zo_setup("fedspzo")
    model.eval()
    parts = SplitModel(model, split)
    batch = _batch(4, 32)
    hidden, c1 = count_flops(parts.lower, batch)
    _, c2 = count_flops(parts.upper, batch, hidden)
    _, full = count_flops(lambda: model(**batch))
    assert c1 + c2 == pytest.approx(full, rel=0.05)  # the two blocks are the whole forward
    _, step = count_flops(spzo_step, parts, batch, 7, 0, p1, p2, 1e-3, 1e-2)
    expected = 2 * p1 * c1 + 2 * p1 * p2 * c2
    assert step == pytest.approx(expected, rel=0.05)


def test_fedspzo_split_forward_equals_the_model() -> None:
    _, _, model, _ = zo_setup("fedspzo")
    model.eval()
    batch = _batch(3, 10)
    parts = SplitModel(model, 1)
    with torch.no_grad():
        whole = float(model(**batch).loss)
    assert parts.upper(batch, parts.lower(batch)) == pytest.approx(whole, rel=1e-5)


# ---------------------------------------------------------------- memory


def _inference_peak(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    weights = storage_bytes(itertools.chain(model.parameters(), model.buffers()))
    with MemoryTracker() as tracker, torch.no_grad():
        model(**batch).loss  # noqa: B018
    return weights + tracker.peak_bytes


@pytest.mark.parametrize("method", ["mezo", "spzo"])
@pytest.mark.parametrize("peft", ["full", "lora"])
def test_zo_step_peak_memory_is_inference_level(method: str, peft: str) -> None:
    _, algorithm, model, _ = zo_setup(
        "fedspzo" if method == "spzo" else "fedmezo", f"method.peft={peft}"
    )
    model.eval()
    batch = _batch(16, 64)
    params = trained(model)
    if method == "mezo":

        def step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            _, loss = mezo_step(params, loss_of(model, batch), [1, 2], 1e-3, 1e-2)
            return torch.tensor(loss)
    else:
        parts = SplitModel(model, -1)

        def step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            _, loss = spzo_step(parts, batch, 3, 0, 1, 4, 1e-3, 1e-2)
            return torch.tensor(loss)

    inference = _inference_peak(model, batch)
    _, memory, _ = measure_step(model, NoStepOptimizer(list(params.values())), batch, step)
    assert memory.grads_bytes == 0 and memory.optimizer_bytes == 0
    assert memory.peak_bytes <= 1.1 * inference, (memory.peak_bytes, inference)


def test_engine_meter_sees_the_zo_step() -> None:
    """Through client_update: FLOPs are two forward passes per step and perturbation."""
    config, algorithm, model, ctx = zo_setup(
        "fedmezo", "method.perturbations=2", "train.local_steps=1"
    )
    state = algorithm.init(model)
    shard = random_shard(0, 4, 1)
    algorithm.client_update(model, algorithm.configure(state, 0, 4), shard, ctx)
    model.eval()
    _, forward = count_flops(lambda: model(**shard.batch(list(range(4)))))
    assert ctx.meter.flops == 2 * 2 * forward


def test_server_state_holds_the_global_tensors() -> None:
    _, algorithm, model, ctx = zo_setup("fedkseed", "method.peft=bitfit")
    state = algorithm.init(model)
    assert isinstance(state, ServerState)
    assert set(state.params) == set(trained(model))
    update = Update(
        0, {"seed_index": torch.tensor([3], dtype=torch.int32), "scalar": torch.tensor([2.0])}, 5
    )
    new = algorithm.aggregate(state, [update])
    # one pair: theta - lr * 2 * z(pool[3])
    expected = {n: t.clone() for n, t in state.params.items()}
    replay_(expected, [algorithm.pool[3]], [-algorithm.config.train.lr * 2.0])
    assert_params_close(new.params, expected, atol=0)


# ---------------------------------------------------------------- through the engine


def test_engine_run_resumes_and_reports_scalar_bytes(tmp_path) -> None:
    import json

    from fedfit.engine.experiment import resume_run, run
    from tests.engine.test_local import tiny

    extra = ("method.name=fedkseed-pro", "method.peft=bitfit", "train.lr=1e-3")
    full = run(tiny(tmp_path, "run.name=full", *extra), plots=False)
    part = run(tiny(tmp_path, "run.name=part", *extra), stop_after=1, plots=False)
    resume_run(part, plots=False)
    assert (full / "rounds.jsonl").read_bytes() == (part / "rounds.jsonl").read_bytes()
    clients = [json.loads(line) for line in (full / "clients.jsonl").read_text().splitlines()]
    # 2 steps: two (int32, float32) pairs plus the header; download: <= K pairs + K probs
    assert all(c["upload_bytes"] < 300 for c in clients)
    assert all(c["download_bytes"] < 4096 * 12 + 500 for c in clients)
    assert all(c["flops"] > 0 for c in clients)


@pytest.mark.parametrize("name", ["fedkseed", "decomfl"])
def test_catch_up_replay_is_charged_in_flops(name: str) -> None:
    _, algorithm, model, ctx = zo_setup(name, "method.peft=bitfit")
    theta0 = algorithm.init(model)
    theta1, _, _ = _round(algorithm, theta0, model, ctx, [0, 1], [4, 6])
    shard = random_shard(9, 8, 3)
    flops = []
    for state in (theta0, theta1):  # same shard and seed: the same steps, and a replay
        ctx.meter.start_client()
        task = algorithm.configure(state, 9, 5)
        algorithm.client_update(model, task, shard, ctx)
        flops.append(ctx.meter.flops)
    pairs = len(task.download.get("catch_up_index", task.download.get("history_scalar", [])))
    assert pairs > 0
    d = sum(t.numel() for t in theta0.params.values())
    assert flops[1] - flops[0] == 2 * d * pairs
