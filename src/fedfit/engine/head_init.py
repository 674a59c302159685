"""Round 0: the start of a run, evaluated, and optionally a federated class-mean head.

Every run evaluates the model it starts from and logs it as round 0, so that "did it learn"
is the final metric minus round 0's. With ``model.head_init = "ncm"`` round 0 is also a real
federated round (FedNCM, Legate et al., "Guiding the last layer in federated learning with
pre-trained models", NeurIPS 2023): each participating client runs its shard once through the
model (inference only, no training) and uploads, per class c, the sum of the features that
enter the classifier head and the count of examples, plus the sum of the feature norms; the
server sets the head from the class means:

    mu_c = S_c / n_c,  r = (sum_i |x_i|) / n,  W_c = s * mu_c / (|mu_c| * r),  b_c = 0

so a feature of typical norm r gets logits ``s * cos(x, mu_c)``: the nearest class mean by
cosine (FedNCM's normalised class means), with the logit scale s = ``model.head_init_scale``
(default 10: a temperature as in cosine classifiers, so the start's cross-entropy is not
stuck near log C). A class no participating client holds keeps a zero row (logit 0).

"Features" are what the head's forward receives, read by a pre-hook on the head: BERT's
pooler output, Llama's last hidden state at the last non-pad token (the position
``LlamaForSequenceClassification`` scores). Round 0's clients are every eligible client or a
seeded sample (``model.head_init_clients``); their upload is the sums, serialised for real and
never quantised (the server needs exact sums); FLOPs and peak memory are measured like a
training step's (the storage-counting tracker and FlopCounterMode), rows go to
clients.jsonl and rounds.jsonl as round 0.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from fedfit.algorithms.base import ClientData, ServerState, load_tensors_
from fedfit.costs.measure import MemoryTracker, storage_bytes
from fedfit.log import log
from fedfit.models.zoo import task_model
from fedfit.payload import deserialize, serialize

if TYPE_CHECKING:
    from fedfit.engine.setup import RunSetup

HEAD_ATTRS = ("classifier", "score")  # BERT / Llama sequence-classification heads


def head_module(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """(the module the forward calls, the Linear whose weights it uses) of the task head;
    under peft the first is its ModulesToSaveWrapper and the second the trained copy."""
    inner = task_model(model)
    for attr in HEAD_ATTRS:
        called = getattr(inner, attr, None)
        if called is None:
            continue
        if isinstance(called, torch.nn.Linear):
            return called, called
        copies = getattr(called, "modules_to_save", None)  # peft's ModulesToSaveWrapper
        if copies is not None:
            active = getattr(called, "active_adapter", "default")
            active = active[0] if isinstance(active, list | tuple) else active
            linear = copies[active]
            if isinstance(linear, torch.nn.Linear):
                return called, linear
    raise ValueError(
        f"model.head_init = 'ncm': {type(inner).__name__} has no classifier head to set "
        "(a causal LM classifying with data.label_words has none)"
    )


def _head_names(model: torch.nn.Module, linear: torch.nn.Linear) -> dict[str, str]:
    """Parameter name in the model -> 'weight' | 'bias' for the head Linear's tensors."""
    ids = {id(linear.weight): "weight"}
    if linear.bias is not None:
        ids[id(linear.bias)] = "bias"
    return {n: ids[id(p)] for n, p in model.named_parameters() if id(p) in ids}


@contextmanager
def _features(model: torch.nn.Module, called: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the head's input of every forward while inside."""
    seen: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(args[0].detach())

    handle = called.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _pooled(features: torch.Tensor, input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, h) features: BERT's head sees (B, h) already; Llama's sees (B, T, h) and scores the
    rightmost non-pad token, as transformers does."""
    if features.dim() == 2:
        return features
    positions = torch.arange(input_ids.shape[1])
    last = (positions * (input_ids != pad_id).to(torch.int64)).argmax(-1)
    return features[torch.arange(features.shape[0]), last]


# Measured (FLOPs, peak bytes beyond the weights) of one inference pass per batch shape:
# both depend on the shape only, so each shape is measured once per process (as the
# engine's step meter does) and the other batches run uninstrumented.
PassCosts = dict[tuple[int, ...], tuple[int, int]]


def _measured_forward(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], costs: PassCosts
) -> tuple[int, int]:
    key = tuple(batch["input_ids"].shape)
    if key in costs:
        model(**batch)
    else:
        tracker = MemoryTracker()
        with tracker, FlopCounterMode(display=False) as flops:
            model(**batch)
        costs[key] = (flops.get_total_flops(), tracker.peak_bytes)
    return costs[key]


def client_class_sums(
    model: torch.nn.Module,
    shard: ClientData,
    num_classes: int,
    batch_size: int,
    costs: PassCosts | None = None,
) -> tuple[dict[str, torch.Tensor], int, int]:
    """One client's round-0 work: its upload (per-class feature sums, counts, norm sum), and
    the measured FLOPs and peak memory (weights + the most one batch's pass held at once)."""
    if shard.labels is None:
        raise ValueError("model.head_init = 'ncm' needs class labels (a classification task)")
    costs = {} if costs is None else costs
    called, linear = head_module(model)
    h = linear.in_features
    sums = torch.zeros(num_classes, h, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    norm_sum = torch.zeros(1, dtype=torch.float64)
    model.eval()
    order = np.argsort([len(s) for s in shard.seqs], kind="stable")
    weights = storage_bytes(itertools.chain(model.parameters(), model.buffers()))
    flops = peak = 0
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = shard.batch(order[start : start + batch_size])
            labels = batch.pop("labels")
            with _features(model, called) as seen:
                batch_flops, batch_peak = _measured_forward(model, batch, costs)
            flops, peak = flops + batch_flops, max(peak, batch_peak)
            x = _pooled(seen[-1], batch["input_ids"], shard.pad_id).to(torch.float64)
            sums.index_add_(0, labels, x)
            counts += torch.bincount(labels, minlength=num_classes).to(torch.float64)
            norm_sum += x.norm(dim=1).sum()
    payload = {
        "class_sums": sums.to(torch.float32),
        "class_counts": counts.to(torch.float32),
        "norm_sum": norm_sum.to(torch.float32),
    }
    return payload, flops, weights + peak


def ncm_head(
    uploads: list[dict[str, torch.Tensor]], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The server's half: (weight C x h, bias C) from the clients' sums (module docstring)."""
    sums = sum(u["class_sums"].to(torch.float64) for u in uploads)
    counts = sum(u["class_counts"].to(torch.float64) for u in uploads)
    norm_sum = sum(u["norm_sum"].to(torch.float64) for u in uploads)
    assert isinstance(sums, torch.Tensor) and isinstance(counts, torch.Tensor)
    total = float(counts.sum())
    if total == 0:
        raise ValueError("model.head_init = 'ncm': round 0's clients hold no examples")
    mean_norm = float(norm_sum) / total
    means = sums / counts.clamp(min=1).unsqueeze(1)
    lengths = means.norm(dim=1, keepdim=True)
    weight = torch.where(lengths > 0, scale * means / (lengths.clamp(min=1e-12) * mean_norm), 0.0)
    return weight.to(torch.float32), torch.zeros(len(counts), dtype=torch.float32)


def ncm_round(
    setup: RunSetup, state: ServerState, clients: list[int]
) -> tuple[ServerState, list[dict[str, Any]], dict[str, Any]]:
    """Round 0 with a class-mean head: the clients' passes, the server's head, the rows
    (the caller adds each client's plan fields, as for any round)."""
    called, linear = head_module(setup.model)
    names = _head_names(setup.model, linear)
    load_tensors_(setup.model, state.params)
    # Round 0's clients compute features with the starting model, which every device holds
    # (the pretrained backbone, and trainable tensors drawn from the run seed: LoRA's B is 0),
    # as the seed-replay methods assume too: nothing is downloaded.
    download_bytes = 0
    num_classes = linear.out_features
    uploads: list[dict[str, torch.Tensor]] = []
    rows: list[dict[str, Any]] = []
    costs: PassCosts = {}
    for cid in clients:
        t0 = time.perf_counter()
        shard = setup.shards[cid]
        payload, flops, peak = client_class_sums(
            setup.model, shard, num_classes, setup.config.train.eval_batch_size, costs
        )
        wire = serialize(payload)
        uploads.append(deserialize(wire))  # the server sees only what crossed the wire
        rows.append(
            {
                "round": 0,
                "client_id": cid,
                "num_examples": len(shard),
                "steps": 0,
                "train_loss": None,
                "upload_bytes": len(wire),
                "flops": flops,
                "peak_memory_bytes": peak,
                "memory": {"peak_bytes": peak},
                "wall_s": round(time.perf_counter() - t0, 4),
                "download_bytes": download_bytes,
            }
        )
    weight, bias = ncm_head(uploads, setup.config.model.head_init_scale)
    head = {"weight": weight, "bias": bias}
    with torch.no_grad():
        linear.weight.copy_(weight)
        if linear.bias is not None:
            linear.bias.copy_(bias)
    params = dict(state.params)
    for name, which in names.items():
        if name in params:
            params[name] = head[which].to(params[name].dtype).clone()
    held = int(sum(float(u["class_counts"].sum()) for u in uploads))
    log(f"round 0: class-mean head from {len(clients)} clients ({held} examples)")
    row = {
        "round": 0,
        "clients": clients,
        "num_clients": len(clients),
        "train_loss": None,
        "upload_bytes": sum(r["upload_bytes"] for r in rows),
        "download_bytes": sum(r["download_bytes"] for r in rows),
        "client_flops": sum(r["flops"] for r in rows),
        "head_init": "ncm",
    }
    return replace(state, params=params), rows, row


def start_row() -> dict[str, Any]:
    """Round 0 of a run that starts from its loaded model: no clients, nothing moved."""
    return {
        "round": 0,
        "clients": [],
        "num_clients": 0,
        "train_loss": None,
        "upload_bytes": 0,
        "download_bytes": 0,
        "client_flops": 0,
        "head_init": "random",
    }


def prior_loss(train_labels: np.ndarray, test_labels: np.ndarray, num_classes: int) -> float:
    """Cross-entropy on the held-out labels of always predicting the training class
    frequencies: the loss a model reaches by learning the prior alone, so a run whose eval
    loss never goes below it has learned nothing about the text."""
    train = np.bincount(train_labels, minlength=num_classes).astype(float)
    test = np.bincount(test_labels, minlength=num_classes).astype(float)
    p = (train + 1e-12) / (train.sum() + num_classes * 1e-12)
    q = test / max(test.sum(), 1.0)
    return float(-(q * np.log(p)).sum())
