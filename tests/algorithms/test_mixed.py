"""Mixed-method federations (``method.name = "auto"``, algorithms/mixed.py): each device on the
first candidate that fits its budget, every update folded layer-wise into one global model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedfit.algorithms import make_algorithm
from fedfit.algorithms.base import ServerState, Update
from fedfit.config import load_config
from fedfit.engine.experiment import run
from fedfit.engine.runfolder import RunFolder
from fedfit.errors import ConfigError
from tests.helpers import read_rows, tiny_run_config


@pytest.mark.parametrize(
    ("candidates", "match"),
    [
        ('["lora", "layers"]', r"LoRA adapters and layers the model's own weights"),
        ('["lora", "fedkseed"]', r"fedkseed cannot be mixed.*seeds and scalars"),
        ('["lora", "nope"]', r"unknown method 'nope'"),
        ('["lora", "lora"]', r"repeats a method"),
        ('["head", " head "]', r"repeats a method"),
        ("[]", r"at least one"),
        ('["lora", "head frozen_dtype"]', r"'frozen_dtype' is not option=value"),
        ('["lora", "head nope=1"]', r"\['head nope=1'\]\.nope: unknown key"),
        ('["lora", "head frozen_dtype=int8"]', r"frozen_dtype: 'int8' is not one of"),
        ('["lora r=4", "head"]', r"sets r, which every candidate shares: set method\.r"),
        ('["lora lr=-1", "head"]', r"lr must be a number > 0"),
        ('["lora lr=fast", "head"]', r"lr must be a number > 0"),
    ],
)
def test_candidates_that_cannot_share_tensors_are_config_errors(
    candidates: str, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["method.name=auto", f"method.candidates={candidates}"])


def test_weights_one_per_candidate() -> None:
    with pytest.raises(ConfigError, match=r"method\.weights: 1 weights for 2 candidates"):
        load_config(
            None,
            ["method.name=auto", 'method.candidates=["lora", "head"]', "method.weights=[2.0]"],
        )


def test_aggregate_is_the_layer_wise_weighted_mean() -> None:
    """Hand-computed: each tensor's mean over the clients that uploaded it, weighted by
    examples x the method's weight; a tensor nobody uploaded keeps its value."""
    config = load_config(
        None,
        [
            "method.name=auto",
            'method.candidates=["lora", "head"]',
            "method.weights=[1.0, 3.0]",
            "server.optimizer=fedavg",
            "server.lr=1.0",
        ],
    )
    algorithm = make_algorithm(config)
    algorithm.method_of = {0: "lora", 1: "lora", 2: "head"}
    state = ServerState(
        0, {"a": torch.zeros(2), "head": torch.zeros(2), "untouched": torch.full((2,), 7.0)}
    )
    updates = [
        Update(0, {"a": torch.tensor([1.0, 2.0]), "head": torch.tensor([1.0, 1.0])}, 10),
        Update(1, {"a": torch.tensor([3.0, 6.0]), "head": torch.tensor([2.0, 0.0])}, 30),
        Update(2, {"head": torch.tensor([4.0, 8.0])}, 20),  # weight 3 x 20 = 60
    ]
    new = algorithm.aggregate(state, updates).params
    torch.testing.assert_close(new["a"], torch.tensor([(10 + 90) / 40, (20 + 180) / 40]))
    head = (
        10 * torch.tensor([1.0, 1.0])
        + 30 * torch.tensor([2.0, 0.0])
        + 60 * torch.tensor([4.0, 8.0])
    ) / 100
    torch.testing.assert_close(new["head"], head)
    torch.testing.assert_close(new["untouched"], torch.full((2,), 7.0))


def test_every_device_on_one_method_equals_that_methods_run(tmp_path: Path) -> None:
    """auto with the one candidate "lora lr=0.01" is lora's own run at train.lr = 0.01, bit
    for bit (while the auto run's own train.lr stays the default)."""
    one = run(
        tiny_run_config(
            tmp_path,
            "run.rounds=2",
            "run.name=lora",
            "method.name=lora",
            "method.dropout=0.0",
            "train.lr=0.01",
        ),
        plots=False,
    )
    auto = run(
        tiny_run_config(
            tmp_path,
            "run.rounds=2",
            "run.name=auto",
            "method.name=auto",
            'method.candidates=["lora lr=0.01"]',
        ),
        plots=False,
    )
    a, b = read_rows(one / "rounds.jsonl"), read_rows(auto / "rounds.jsonl")
    for x, y in zip(a, b, strict=True):
        for key in ("eval", "train_loss", "upload_bytes", "download_bytes", "client_flops"):
            assert x[key] == y[key], key
    pa = RunFolder(one).load_checkpoint()[0].params
    pb = RunFolder(auto).load_checkpoint()[0].params
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name
    rows = read_rows(auto / "clients.jsonl")
    assert {c["method"] for c in rows if c["round"] > 0} == {"lora lr=0.01"}


TIERS = [
    "devices.population=tiers",
    'devices.tiers=["small share=0.5 memory=1/4x", "large share=0.5 memory=1x"]',
]


def test_every_tier_takes_part_within_its_memory(tmp_path: Path) -> None:
    """Two tiers on tiny-bert: the 1/4x tier cannot hold full fine-tuning (25.0 MB against
    6.25 MB), so it trains the head (4.61 MB predicted); every client trains, each within its
    memory budget as measured in clients.jsonl."""
    config = tiny_run_config(
        tmp_path,
        "run.rounds=3",
        "method.name=auto",
        'method.candidates=["fedavg", "head"]',
        *TIERS,
    )
    out = run(config, plots=False)
    summary = RunFolder(out).summary()
    assert not summary.get("excluded")
    clients = [c for c in read_rows(out / "clients.jsonl") if c["round"] > 0]
    by_tier = {c["tier"]: c["method"] for c in clients}
    assert by_tier == {"large": "fedavg", "small": "head"}
    for c in clients:
        assert c["peak_memory_bytes"] <= c["budget"]["memory_bytes"], c


def test_heterogeneous_example_admits_every_tier() -> None:
    """The acceptance command's planning (`fedfit plan examples/heterogeneous.toml --set
    method.name=auto`): every tier of minilm-l6's four gets a method that fits, the 1/8x tier
    the head over a bfloat16 backbone, each stronger candidate's reason recorded."""
    from fedfit.engine.tier_table import plan_rows

    config = load_config(Path("examples/heterogeneous.toml"), ["method.name=auto"])
    rows = [r for r in plan_rows(config, ("auto",)) if r.method == "auto"]
    chosen = {r.tier: r.plan.method for r in rows if r.plan.ok}
    assert chosen == {
        "eighth": "head frozen_dtype=bfloat16",
        "quarter": "fedmezo",
        "half": "spry",
        "full": "lora",
    }
    eighth = next(r for r in rows if r.tier == "eighth")
    assert [why.split(":")[0] for why in eighth.plan.passed] == ["lora", "spry", "fedmezo", "head"]
    assert eighth.memory <= 66.8e6


def test_smallest_tier_trains_the_head_in_bfloat16_within_its_memory(tmp_path: Path) -> None:
    """The default candidates on tiny-bert with a 1/8x tier: nothing in float32 fits it (the
    float32 head step needs 4.7 MB against 3.1 MB), the bfloat16-backbone head does, and
    every client's measured peak in clients.jsonl is within its budget."""
    config = tiny_run_config(
        tmp_path,
        "run.rounds=2",
        "data.clients_per_round=6",
        "method.name=auto",
        "devices.population=tiers",
        'devices.tiers=["small share=0.5 memory=1/8x", "large share=0.5 memory=1x"]',
    )
    out = run(config, plots=False)
    assert not RunFolder(out).summary().get("excluded")
    clients = [c for c in read_rows(out / "clients.jsonl") if c["round"] > 0]
    assert {(c["tier"], c["method"]) for c in clients} == {
        ("small", "head frozen_dtype=bfloat16"),
        ("large", "lora"),
    }
    for c in clients:
        assert c["peak_memory_bytes"] <= c["budget"]["memory_bytes"], c


def test_adapter_family_mixes_lora_and_spry_within_budgets(tmp_path: Path) -> None:
    """LoRA on the 1x tier, Spry's forward gradients where LoRA's backprop does not fit
    (0.2x of full fine-tuning on tiny-bert): one LoRA-wrapped model, both tiers train, each
    client within its measured memory budget, and the global adapters move."""
    config = tiny_run_config(
        tmp_path,
        "run.rounds=2",
        "data.clients_per_round=6",
        "method.name=auto",
        'method.candidates=["lora", "spry", "fedmezo", "head"]',
        "devices.population=tiers",
        'devices.tiers=["large share=0.5 memory=1x", "small share=0.5 memory=0.2x"]',
    )
    out = run(config, plots=False)
    clients = [c for c in read_rows(out / "clients.jsonl") if c["round"] > 0]
    assert {(c["tier"], c["method"]) for c in clients} == {("large", "lora"), ("small", "spry")}
    for c in clients:
        assert c["peak_memory_bytes"] <= c["budget"]["memory_bytes"], c
    state = RunFolder(out).load_checkpoint()[0].params
    assert any("lora_B" in n and bool(t.abs().sum() > 0) for n, t in state.items())


def test_model_auto_runs_the_planners_choice_and_records_why(tmp_path: Path) -> None:
    """model.name = "auto" runs the zoo model ``fedfit plan`` picks (choose_model, on real
    shipped weights and tweets), and config.toml and summary.json say which and why."""
    from fedfit.engine.tier_table import ZOO_CHOICES, choose_model

    sets = [
        "model.max_length=32",
        "data.num_clients=8",
        "data.clients_per_round=2",
        "data.eval_examples=40",
        "run.rounds=1",
        "train.local_steps=1",
        "train.batch_size=4",
        "devices.population=tiers",
        'devices.tiers=["small share=0.5 memory=1/2x", "large share=0.5 memory=1x"]',
        f"run.output_dir={tmp_path}",
    ]
    config = load_config(None, ["model.name=auto", "method.name=lora", *sets])
    reference = load_config(None, [f"model.name={ZOO_CHOICES[-1]}", "method.name=lora", *sets])
    picked, _, why = choose_model(reference)
    out = run(config, plots=False)
    summary = RunFolder(out).summary()
    assert summary["model"] == picked
    assert summary["model_picked"] == f"auto: {why}"
    assert RunFolder(out).config().model.name == picked
