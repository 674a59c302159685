"""Successive layer training (algorithms/slt.py) and its narrowed blocks (models/narrow.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedfit.algorithms import make_algorithm
from fedfit.algorithms.base import ClientContext, ClientTask
from fedfit.algorithms.slt import slice_mean
from fedfit.config import ConfigError, load_config
from fedfit.costs import TrainSpec, predict
from fedfit.engine.experiment import run
from fedfit.engine.meter import CostMeter
from fedfit.models import load_model
from fedfit.models.narrow import NARROWED, narrowed, narrowed_sizes
from fedfit.models.structure import transformer_layers
from fedfit.payload import payload_bytes
from tests.helpers import random_shard, read_rows, tiny_run_config


def masked_reference(model: torch.nn.Module, block: int, keep: dict[str, int]) -> None:
    """The full model with the dropped heads and units silenced: the input columns of the
    linears that read them (attention output, FFN output) zeroed from ``keep[what]`` on."""
    family = str(model.config.model_type)
    stack = transformer_layers(model)
    with torch.no_grad():
        for path, dim, what in NARROWED[family]:
            if dim == 1:
                linear = stack[block].get_submodule(path)
                linear.weight[:, keep[what] :] = 0


def tiny_gqa_llama() -> torch.nn.Module:
    """A random Llama with grouped-query attention (4 query heads over 2 key/value heads),
    so that narrowing drops whole groups; tiny-llama has one key/value head."""
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("name", ["tiny-bert", "gqa-llama"])
def test_a_narrowed_block_computes_the_full_block_with_the_dropped_heads_silenced(
    name: str,
) -> None:
    if name == "tiny-bert":
        model = load_model("tiny-bert", "classification", num_labels=3, seed=0)[0].eval()
        heads, kv, inter, d = 2, 2, 64, 16
    else:
        model = tiny_gqa_llama()
        heads, kv, inter, d = 4, 2, 48, 8
    q, k, i = narrowed_sizes(heads, kv, inter, 0.5)
    assert (q, k, i) == ((1, 1, 32) if name == "tiny-bert" else (2, 1, 24))
    ids = torch.randint(5, 300, (3, 9), generator=torch.Generator().manual_seed(2))
    with narrowed(model, [1], 0.5), torch.no_grad():
        got = model(input_ids=ids).logits
        shapes = {n: tuple(p.shape) for n, p in transformer_layers(model)[1].named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # restored: the originals, untouched
    full = {n: tuple(p.shape) for n, p in transformer_layers(model)[1].named_parameters()}
    assert shapes != full
    masked_reference(model, 1, {"heads": q * d, "kv_heads": k * d, "inter": i})
    with torch.no_grad():
        want = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if name == "gqa-llama":
        assert shapes["self_attn.q_proj.weight"] == (q * d, 32)
        assert shapes["self_attn.k_proj.weight"] == (k * d, 32)
        assert shapes["mlp.down_proj.weight"] == (32, i)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_narrowed_sizes_keep_at_least_one_head_and_the_group_size() -> None:
    assert narrowed_sizes(12, 12, 1536, 0.125) == (2, 2, 192)
    assert narrowed_sizes(9, 3, 1536, 0.25) == (3, 1, 384)  # 3 query heads per kv head
    assert narrowed_sizes(2, 2, 64, 0.1) == (1, 1, 6)
    with pytest.raises(ValueError, match="outside"):
        narrowed_sizes(2, 2, 64, 0.0)


def test_slice_mean_by_hand() -> None:
    params = {"w": torch.zeros(3, 2), "b": torch.full((3,), 9.0)}
    payloads = [
        {"w": torch.ones(3, 2), "b": torch.ones(3)},  # whole tensors
        {"w": torch.full((1, 2), 4.0), "b": torch.full((2,), 5.0)},  # leading slices
    ]
    out = slice_mean(params, payloads, [1.0, 3.0])
    # rows / entries held by both: (1 * 1 + 3 * 4) / 4 = 3.25 and (1 + 15) / 4 = 4
    torch.testing.assert_close(out["w"], torch.tensor([[3.25, 3.25], [1, 1], [1, 1]]))
    torch.testing.assert_close(out["b"], torch.tensor([4.0, 4.0, 1.0]))
    only = slice_mean(params, [{"w": torch.ones(2, 1)}], [2.0])
    torch.testing.assert_close(only["w"], torch.tensor([[1.0, 0], [1, 0], [0, 0]]))
    assert set(only) == {"w"}
    with pytest.raises(ValueError, match="slt: upload w"):
        slice_mean(params, [{"w": torch.ones(4, 2)}], [1.0])


def client_update(width: float, depth: int = 2):
    config = load_config(None, ["method.name=slt", "train.local_steps=2", "train.batch_size=4"])
    model, _ = load_model("tiny-bert", "classification", num_labels=3, seed=0)
    algorithm = make_algorithm(config)
    model = algorithm.prepare(model, "classification")
    state = algorithm.init(model)
    task = ClientTask(0, 1, 7, download=state.params)
    task.config.update(depth=depth, width=width)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    meter = CostMeter()
    update = algorithm.client_update(
        model, task, random_shard(0, 12, seed=3), ClientContext(config.train, meter)
    )
    return update, meter, model, before


def test_client_trains_block_0_in_full_and_block_1_narrowed() -> None:
    update, meter, model, before = client_update(0.5)
    query = "bert.encoder.layer.{}.attention.self.query.weight"
    assert update.payload[query.format(0)].shape == (32, 32)  # block 0: in full
    assert update.payload[query.format(1)].shape == (16, 32)  # block 1: one head of two
    assert update.payload["bert.encoder.layer.1.output.dense.weight"].shape == (32, 32)
    assert update.payload["bert.encoder.layer.1.output.LayerNorm.weight"].shape == (32,)
    assert "classifier.weight" in update.payload
    assert not any("embeddings" in n for n in update.payload)
    # the model the client left behind: full shapes; block 0 trained in place (as layer
    # fine-tuning's), block 1's narrowed linears at their downloaded values (the narrowed
    # copies were trained, the originals put back)
    for name, p in model.named_parameters():
        assert p.shape == before[name].shape, name
        narrowed_linear = ".layer.1." in name and "LayerNorm" not in name
        if narrowed_linear:
            assert torch.equal(p.detach(), before[name]), name
        elif ".layer.0." in name:
            assert torch.equal(p.detach(), update.payload[name]), name
    # what was sent and what was measured against the cost model: upload exact, FLOPs exact,
    # peak within the cost model's tolerance
    spec = TrainSpec("slt", trained_layers=2, width=0.5)
    predicted = predict(model.config, "classification", 3, spec, 4, 12)
    assert payload_bytes(update.payload) == predicted.upload_bytes
    assert meter.memory is not None
    assert meter.memory.peak_bytes <= predicted.peak_bytes * 1.1


def test_width_1_is_layer_fine_tuning() -> None:
    update, _, _, _ = client_update(1.0)
    config = load_config(None, ["method.name=layers", "train.local_steps=2",
                                "train.batch_size=4", "method.prefix_cache=false"])  # fmt: skip
    model, _ = load_model("tiny-bert", "classification", num_labels=3, seed=0)
    layers = make_algorithm(config)
    model = layers.prepare(model, "classification")
    task = ClientTask(0, 1, 7, download=layers.init(model).params)
    task.config["depth"] = 2
    ref = layers.client_update(
        model, task, random_shard(0, 12, seed=3), ClientContext(config.train, CostMeter())
    )
    assert update.payload.keys() == ref.payload.keys()
    for name, value in update.payload.items():
        torch.testing.assert_close(value, ref.payload[name], rtol=0, atol=0)


def tiered(tmp_path: Path, memory: int) -> list[str]:
    return [
        "method.name=slt",
        "run.rounds=4",
        "devices.population=tiers",
        "devices.margin=0",
        f"devices.tiers=['small share=0.5 memory={memory}B', 'large share=0.5 memory=1x']",
    ]


def test_a_run_moves_up_the_blocks_and_narrows_the_small_tier(tmp_path: Path) -> None:
    """Budget between SLT's width-0.5 and width-1 peaks at stage 1 (rounds 1-2): the small
    tier trains block 1 narrowed to one head, then block 1 alone in full (rounds 3-4)."""
    model, _ = load_model("tiny-bert", "classification", num_labels=3, seed=0)
    peak = {
        w: predict(
            model.config, "classification", 3, TrainSpec("slt", trained_layers=2, width=w), 8, 32
        ).peak_bytes
        for w in (1.0, 0.75, 0.5)
    }
    assert peak[0.5] < peak[0.75] < peak[1.0]
    memory = (peak[0.5] + peak[0.75]) // 2
    config = tiny_run_config(tmp_path, *tiered(tmp_path, memory))
    run_dir = run(config, plots=False)
    rows = read_rows(run_dir / "clients.jsonl")
    small = [r for r in rows if r["tier"] == "small" and r["round"] > 0]
    large = [r for r in rows if r["tier"] == "large" and r["round"] > 0]
    assert small and large
    # every update aggregated: the narrowed ones are slices of the tensors sent
    assert not [r["rejected"] for r in rows if "rejected" in r]
    assert small[0]["trained"] == "2 stages up the blocks, narrowed to widths 0.5, 1 + head"
    assert large[0]["trained"] == "2 stages up the blocks, narrowed to widths 1, 1 + head"
    for r in small + large:
        # measured under the plan's prediction (the most over the stages) and the budget
        assert r["peak_memory_bytes"] <= r["predicted"]["peak_memory_bytes"]
        assert r["flops"] <= r["predicted"]["flops"]
        if r["tier"] == "small":
            assert r["peak_memory_bytes"] <= memory
    # stage 1 (rounds 1-2) uploads blocks 0 and 1, stage 2 (rounds 3-4) block 1 only: less
    for rs in (small, large):
        early = {r["upload_bytes"] for r in rs if r["round"] <= 2}
        late = {r["upload_bytes"] for r in rs if r["round"] > 2}
        assert early and late and max(late) < min(early)
    # the small tier's narrowed block uploads fewer bytes than the large tier at stage 1
    assert max(r["upload_bytes"] for r in small if r["round"] <= 2) < min(
        r["upload_bytes"] for r in large if r["round"] <= 2
    )
    rounds = read_rows(run_dir / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4]


def test_a_budget_below_every_width_excludes_the_tier_naming_the_stage(tmp_path: Path) -> None:
    model, _ = load_model("tiny-bert", "classification", num_labels=3, seed=0)
    spec = TrainSpec("slt", trained_layers=2, width=0.125)
    low = predict(model.config, "classification", 3, spec, 8, 32).peak_bytes - 1
    from fedfit.engine.setup import build

    setup = build(tiny_run_config(tmp_path, *tiered(tmp_path, low)))
    reasons = {p.reason for p in setup.plans if not p.ok}
    assert len(reasons) == 1 and next(iter(reasons)).startswith("slt stage 1 of 2 (block 0")


def test_options_and_what_slt_refuses() -> None:
    with pytest.raises(ConfigError, match="method.widths"):
        load_config(None, ["method.name=slt", "method.widths=[0.5, 1.5]"])
    with pytest.raises(ConfigError, match="method.stages"):
        load_config(None, ["method.name=slt", "method.stages=-1"])
    from fedfit.engine.flower_secagg import check_secure_aggregation

    with pytest.raises(ConfigError, match="slices of different widths"):
        check_secure_aggregation(
            load_config(None, ["method.name=slt", "server.secure_aggregation=secaggplus"])
        )
    for bad, key in (("server.aggregation=median", "server.aggregation"),
                     ("compress.upload_bits=4", "compress.upload_bits")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            make_algorithm(load_config(None, ["method.name=slt", bad]))
    algorithm = make_algorithm(load_config(None, ["method.name=slt", "method.stages=3"]))
    model, _ = load_model("tiny-bert", "classification", num_labels=3, seed=0)
    with pytest.raises(ConfigError, match="method.stages: 3 > the model's 2 blocks"):
        algorithm.prepare(model, "classification")


def test_more_stages_than_rounds_says_which_stages_get_no_round(
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, _ = load_model("tiny-bert", "classification", num_labels=3, seed=0)
    make_algorithm(load_config(None, ["method.name=slt", "run.rounds=2"])).prepare(
        model, "classification"
    )
    assert capsys.readouterr().err == ""  # two blocks, two rounds: a stage each
    algorithm = make_algorithm(load_config(None, ["method.name=slt", "run.rounds=1"]))
    algorithm.prepare(model, "classification")
    assert [algorithm.stage_of(1)] == [0]
    assert capsys.readouterr().err == (
        "slt: 2 stages over run.rounds=1: the stage at block 1 gets no round "
        "(method.stages=1 gives each stage one)\n"
    )


def test_validation_takes_leading_slices_only_for_slices_uploads() -> None:
    from fedfit.engine.validation import tensor_problem

    sent = {"w": torch.zeros(4, 3)}
    assert tensor_problem("w", torch.zeros(2, 3), sent, slices=True) is None
    assert "not a slice" in str(tensor_problem("w", torch.zeros(5, 3), sent, slices=True))
    assert "not a slice" in str(tensor_problem("w", torch.zeros(4), sent, slices=True))
    assert "shape (2, 3)" in str(tensor_problem("w", torch.zeros(2, 3), sent))
