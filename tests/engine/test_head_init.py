"""Round 0: the starting model evaluated, and the federated class-mean (FedNCM) head."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedfit.algorithms.base import ClientData
from fedfit.engine.experiment import resume_run, run
from fedfit.engine.head_init import client_class_sums, head_module, ncm_head, prior_loss
from fedfit.engine.runfolder import RunFolder
from fedfit.engine.setup import build, evaluate
from fedfit.errors import ConfigError
from fedfit.models import load_model
from fedfit.payload import serialize
from tests.helpers import read_rows, tiny_run_config


def test_ncm_head_hand_computed() -> None:
    # Two clients; class 0 features (3, 4) and (3, 4); class 1 feature (0, 2); class 2 none.
    a = {
        "class_sums": torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0]]),
        "class_counts": torch.tensor([1.0, 0.0, 0.0]),
        "norm_sum": torch.tensor([5.0]),
    }
    b = {
        "class_sums": torch.tensor([[3.0, 4.0], [0.0, 2.0], [0.0, 0.0]]),
        "class_counts": torch.tensor([1.0, 1.0, 0.0]),
        "norm_sum": torch.tensor([7.0]),
    }
    weight, bias = ncm_head([a, b], scale=10.0)
    # means (3, 4) and (0, 2); unit directions (0.6, 0.8) and (0, 1); mean norm 12 / 3 = 4
    expected = torch.tensor([[0.6, 0.8], [0.0, 1.0], [0.0, 0.0]]) * 10.0 / 4.0
    torch.testing.assert_close(weight, expected)
    assert torch.equal(bias, torch.zeros(3))


def test_prior_loss_closed_form() -> None:
    # train frequencies (0.75, 0.25); held-out (0.5, 0.5): -(0.5 ln 0.75 + 0.5 ln 0.25)
    got = prior_loss(np.array([0, 0, 0, 1]), np.array([0, 1]), 2)
    assert got == pytest.approx(-(0.5 * math.log(0.75) + 0.5 * math.log(0.25)), rel=1e-9)


def _shard(seqs: list[list[int]], labels: list[int], pad: int) -> ClientData:
    return ClientData(0, [np.array(s) for s in seqs], np.array(labels), pad, False)


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-llama"])
def test_class_sums_equal_a_brute_force_loop(name: str) -> None:
    """Per-class sums of the head's inputs, batched and padded, against one example at a time
    through the backbone (BERT: pooler output; Llama: the last token's final hidden state)."""
    model, tok = load_model(name, "classification", num_labels=3, seed=0)
    pad = int(tok.pad_token_id)
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(5, 200, size=int(rng.integers(3, 12)))) for _ in range(9)]
    labels = [0, 1, 2, 0, 1, 0, 0, 1, 1]
    payload, flops, peak = client_class_sums(model, _shard(seqs, labels, pad), 3, batch_size=4)
    sums = torch.zeros(3, model.config.hidden_size, dtype=torch.float64)
    norms = 0.0
    with torch.no_grad():
        for s, y in zip(seqs, labels, strict=True):
            ids = torch.tensor([s])
            if name == "tiny-bert":
                x = model.bert(input_ids=ids).pooler_output[0]
            else:
                x = model.model(input_ids=ids).last_hidden_state[0, -1]
            sums[y] += x.double()
            norms += float(x.double().norm())
    torch.testing.assert_close(payload["class_sums"], sums.float(), rtol=1e-4, atol=1e-5)
    assert payload["class_counts"].tolist() == [4.0, 4.0, 1.0]
    assert float(payload["norm_sum"]) == pytest.approx(norms, rel=1e-5)
    assert flops > 0 and peak > sum(p.numel() * 4 for p in model.parameters())


def test_ncm_run_round_zero(tmp_path: Path) -> None:
    # 100 examples per client: round 0 passes every client's shard through the model, three
    # times in this test (the run, the reference sums, the stopped run)
    small = "data.max_examples=100"
    config = tiny_run_config(
        tmp_path, "model.head_init=ncm", "run.rounds=2", "method.name=lora", small
    )
    out = run(config, plots=False)
    rounds, clients = read_rows(out / "rounds.jsonl"), read_rows(out / "clients.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    zero = rounds[0]
    assert zero["head_init"] == "ncm" and zero["num_clients"] == 12  # every client by default
    assert "accuracy" in zero["eval"] and zero["eval"]["prior_loss"] > 0
    zero_clients = [c for c in clients if c["round"] == 0]
    assert len(zero_clients) == 12
    # each upload is the serialised sums of C x h + C + 1 float32 numbers
    setup = build(config)
    h = setup.model.config.hidden_size
    expected_upload = len(
        serialize(
            {
                "class_sums": torch.zeros(3, h),
                "class_counts": torch.zeros(3),
                "norm_sum": torch.zeros(1),
            }
        )
    )
    assert all(c["upload_bytes"] == expected_upload for c in zero_clients)
    assert zero["upload_bytes"] == 12 * expected_upload and zero["client_flops"] > 0
    # the starting model is on every device: round 0 downloads nothing
    assert all(c["peak_memory_bytes"] > 0 and c["download_bytes"] == 0 for c in zero_clients)
    # the head round 1 starts from is the class-mean head of every client's sums
    uploads = [client_class_sums(setup.model, s, 3, 64)[0] for s in setup.shards]
    weight, _ = ncm_head(uploads, 10.0)
    part = run(tiny_run_config(tmp_path, "model.head_init=ncm", "run.name=p", small), stop_after=0)
    state, _ = RunFolder(part).load_checkpoint()
    heads = [t for n, t in state.params.items() if "classifier" in n and n.endswith("weight")]
    assert len(heads) == 1
    torch.testing.assert_close(heads[0], weight, rtol=1e-5, atol=1e-6)
    summary = RunFolder(out).summary()
    assert summary["start"] == zero["eval"] and summary["head_init"] == "ncm"
    # per-client figures are the training rounds'; round 0's pass is reported apart
    trained = [c for c in clients if c["round"] > 0]
    assert summary["per_client"]["flops_mean"] == pytest.approx(
        np.mean([c["flops"] for c in trained])
    )
    assert summary["round0_per_client"]["upload_bytes_mean"] == expected_upload
    assert summary["gain_over_start"]["accuracy"] == pytest.approx(
        summary["final"]["accuracy"] - zero["eval"]["accuracy"]
    )
    # resuming from the round-0 checkpoint gives the uninterrupted run
    resumed = resume_run(part, plots=False)
    assert len(read_rows(resumed / "rounds.jsonl")) == 4  # rounds 0..3 of the default 3


def test_ncm_sample_of_clients(tmp_path: Path) -> None:
    config = tiny_run_config(tmp_path, "model.head_init=ncm", "model.head_init_clients=4")
    out = run(config, stop_after=0, plots=False)
    zero = read_rows(out / "rounds.jsonl")[0]
    assert zero["num_clients"] == 4 and len(set(zero["clients"])) == 4


def test_round_zero_is_the_untrained_model(tmp_path: Path) -> None:
    config = tiny_run_config(tmp_path, "run.rounds=1")
    out = run(config, plots=False)
    zero = read_rows(out / "rounds.jsonl")[0]
    assert zero["round"] == 0 and zero["client_flops"] == 0 and zero["upload_bytes"] == 0
    setup = build(config)
    fresh = evaluate(setup.model, setup.test, config.train.eval_batch_size)
    assert zero["eval"]["accuracy"] == fresh["accuracy"]
    assert zero["eval"]["loss"] == pytest.approx(fresh["loss"], rel=1e-6)


def test_ncm_needs_a_head(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Flower"):
        build(tiny_run_config(tmp_path, "model.head_init=ncm", "run.executor=flower"))


def test_head_module_finds_peft_copy() -> None:
    from fedfit.algorithms.peft import prepare_peft

    model, _ = load_model("tiny-bert", "classification", num_labels=3)
    from fedfit.config import load_config

    model = prepare_peft("lora", model, "classification", load_config(None), 4, 8.0, ())
    called, linear = head_module(model)
    assert linear.weight.requires_grad and called is not linear
