"""Analytic cost model: peak training memory, FLOPs and upload bytes of one client step.

``predict`` reads only the Hugging Face config (no model, no tensors): the planner calls it for
every device x candidate depth / rank / share, so it must be cheap (well under a millisecond,
and cached by shape). Its terms
follow what :func:`fedfit.costs.measure_step` measures on the real step (eager attention,
float32, train mode, a fresh optimiser as every client update builds one); the tests hold it
to the measurement (10% on peak memory, 5% on FLOPs).

Notation: B batch, T tokens, N = B*T, h hidden, I intermediate, a heads, d = h/a head size,
L blocks, V vocabulary; 4 bytes per float32. "rg" = requires grad.

Weights. All parameters (tied ones once) + buffers: BERT keeps ``position_ids`` and
``token_type_ids`` (int64, max_positions each), Llama the rotary ``inv_freq`` and its
``original_inv_freq`` copy (d/2 floats each). LoRA adds A (r x in) and B (out x r) per
adapted linear and, for classification, peft's trainable copy of the head; IA3 a vector per
adapted linear (out x 1, or 1 x in for a feed-forward one) and the same head copy. BitFit
trains every bias and the head, in place.

Grads = trainable bytes. Optimiser state (AdamW): exp_avg + exp_avg_sq (2 x trainable bytes)
and a float32 step counter per trainable tensor; SGD without momentum keeps nothing.

Activations: what autograd saves for backward, found by propagating "rg" through one block
(a tensor is saved only if the op that consumes it needs it for a gradient that will be
computed: ``addmm`` saves its input only for dW, ``bmm`` saves each operand only for the
other's gradient, LayerNorm saves input + mean + rstd, GELU/SiLU their input, softmax its
output, dropout its float mask (CPU dropout is ``input * bernoulli / (1 - p)``, 4 bytes per
element, not a bool). Per BERT block with everything rg and dropout on this is
4 * [N (10h + 2I) + 4N + 3 B a T^2]: q and k copies (matmul folds the transposed heads into a
contiguous copy), v copy, context, attention-output mask, LN1 input and output, FC1 output,
GELU output, FFN mask, LN2 input, plus the softmax output, its dropout mask and the dropped
probabilities. A frozen prefix (nothing below requires grad) saves nothing; the lowest
trained block saves its input for dW. Llama: RMSNorm saves x, rsqrt and x_hat (for dw);
q and k after RoPE (and k, v after GQA repetition) for the attention matmuls; SiLU its input;
the gate * up product both factors; cos and sin once per forward.

Forward peak = saved so far + what the forward holds beyond the saved tensors: the 4-D float
attention mask (B T^2; BERT builds it only for a padded batch, Llama always), the embedding
output (the model's forward keeps a reference until it returns) and, inside the block being
computed, whichever moment is largest: the attention dropout (q, k, v projections, softmax
output, mask, dropped probabilities), the GELU / SiLU output (the block also holds the
attention probabilities in its ``_`` until it returns) or LayerNorm-2 (its input and output,
the FFN output). Frozen blocks save nothing, so their cost is this transient alone.
Backward peak = all saved + the first activation gradients of the top block (BERT: FC2's input
gradient N (I - h) beyond what it frees; causal LM: the log-softmax gradient and its output,
2 N V). Activations = max(forward peak, backward peak). Parameter gradients that exist at the
backward peak (the top block's) are left out: at most 2% of the peak on MiniLM.

Peak. The step has two phases (see ``StepMemory``): forward + backward holds weights +
activations (the optimiser state does not exist yet on a fresh optimiser); ``optimizer.step``
holds weights + grads + state + the single-tensor AdamW temporaries (``sqrt(v)`` and its
division by the bias correction: 2 x the largest trainable tensor). Peak = the larger.

FLOPs (what ``FlopCounterMode`` counts: matmuls, 2 per multiply-add). Forward: every linear
2 N in out, attention 2 x 2 B a T^2 d. Backward per linear: dW if the weight is trained,
dX if its input is rg (so the lowest trained block skips dX of q, k, v, and a frozen prefix
costs forward only); per attention matmul each operand's gradient only if that operand is rg.
LoRA adds 2 N r (in + out) forward and dA, dB, dB_x, and dA_x when the input is rg. IA3
saves what its vector multiplies (the linear's output, or its input for a feed-forward one,
whose dX through the frozen weight is then always computed); BitFit makes everything from the
embeddings' LayerNorm bias on rg while no weight is, so no linear saves its input.

Forward mode (``step="jvp"``, forward/core.py; eval mode, no dropout). One jvp per tangent, on
dual numbers, saves nothing for a backward pass: the peak is the moment of the block being
computed, as for inference (below), with every tensor from the first tangent-carrying one on
doubled (primal + tangent), plus the product rule's second term of the attention scores (one
more B a T^2 tensor), and for a causal LM the exp(output) that log_softmax's tangent needs
(N V). Beside it live the K tangents and the estimate (K + 1 x trained bytes); the optimiser
step is the backprop one. Tangent FLOPs are what torch dispatches: once any operand of a
matmul carries a tangent, one product per operand, zero tangents included (a tangent-less
input of a trained linear, a frozen key under a LoRA query), except frozen weights, which
forward/core._FrozenLinear treats as constants (one product, x_t W); a linear or matmul with
no tangent on any operand costs only its primal. FwdLLM scores its candidates one at a time
(element-wise work: no FLOPs counted) and keeps K, so it is costed as K tangents. Spry
(``share = (position, clients)``) trains the groups ``assign_groups`` gives that position;
another client's LoRA modules run as untrained adapters (their products only where the
input carries a tangent). A device is planned for the worst share: the most of each cost over
the round's positions.

Inference (finite differences, zero order). A no-grad forward saves nothing: its peak is the
4-D mask + the embedding output (held by the model's forward) + the current hidden state + the
largest moment of a block (attention: q, k, v and the scores with their softmax; the FFN: its
input, the GELU / SiLU outputs, and the probabilities the layer still holds) or of the top
(Llama: the final norm's temporaries, and for a causal LM the logits and their log_softmax).
Baffle (``"fd"``) keeps K tangents, the saved trained tensors and the estimate (K + 2 x
trained bytes) and runs 2K + 1 forwards. ZO (``"zo"``: FedMeZO, FedKSeed, DeComFL) perturbs
in place from a seed (no copy of the weights, no gradients, no optimiser state) and keeps
only the restore corrections, 3 bytes per element that ``(p + d) - d`` does not bring back
(``ZO_FIXED_FRACTION``): 2P forwards per step. FedSPZO (``"spzo"``) keeps block 1's two
outputs while block 2 runs on them (one stands where the embedding output stood: N h extra)
and costs 2 P1 C1 + 2 P1 P2 C2, with C1 the forward FLOPs of blocks [0, split) and C2 those of
the rest and the head.

Replay (FedKSeed, DeComFL): a device that missed rounds replays (seed, scalar) pairs on its
trained tensors, 2 FLOPs per element per pair (zeroorder/core.replay_flops), counted in its
round (``replay_flops``, added by ``flops_per_round``). The methods' specs take the worst
catch-up of a run: FedKSeed one pair per pool index used by every earlier round's steps, at
most the pool; DeComFL every earlier round's steps x P pairs, at most ``max_catch_up``.

Lower-precision frozen weights (``frozen_dtype``, a head-only step on a BERT-family model;
models/precision.py): the frozen parameters take that dtype's bytes, and so does every
activation, since each is a frozen layer's output (the head's b x h input is cast back to
float32: a few kB left out). Llama is not modelled: its eager attention computes the softmax
in float32 whatever the weights' dtype (measured on tiny-llama at 16 x 64: activations 0.78x
of float32's, not 0.5x).

Successive layer training (``kind="slt"``, models/narrow.py): the blocks above the lowest
trained one have fewer heads and feed-forward units; every term of such a block is computed
with its own head count, key/value head count and intermediate size (weights, trained
tensors, saved activations, scores, FLOPs), the residual stream keeps its width.

Upload: the safetensors serialisation of what is sent, header included:
8 + len(JSON header padded with spaces to a multiple of 8) + the data; the header is built
from the tensor names, shapes and dtypes the payload would have (data ordered by dtype, larger
first, then by name, which sets the offsets), so it is exact. Weights: the trained tensors
(Spry: the client's share); scalars (:func:`scalar_payload`): Spry per iteration K jvp values,
FedKSeed an int32 pool index and a float32 scalar per step, DeComFL float32 [steps, P],
FedSPZO an int64 base seed and float32 [steps, P1] and [steps, P1, P2].

Scope: BERT (classification) and Llama (classification, causal LM) as transformers 5 builds
them, float32, eager attention, torch's CPU AdamW / SGD (single-tensor path). Measured
agreement (tests/costs/test_predict.py): FLOPs exact; peak within 2.1% on tiny-bert and
MiniLM-L6 and 3.3% on tiny-llama; activations within 1% on BERT, within 13% on tiny-llama
classification with LoRA or head only at small shapes (the peak is weight-dominated there).
Gradient-free steps, measured through each method's own client update and the engine's meter:
FLOPs exact (replay included); peak within 2.2% (activations within 12%, lowest on Llama
classification, where the inference moment is modelled coarsely; ZO's corrections are an
upper figure for eps <= 1e-3), uploads exact.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedfit.costs.share import assign_groups, tensor_groups
from fedfit.costs.spec import TrainSpec
from fedfit.models.narrow import narrowed_sizes
from fedfit.models.precision import FROZEN_DTYPES

F32 = 4


@dataclass(frozen=True)
class CostEstimate:
    """Predicted cost of one training step (memory, FLOPs) and of one upload, in bytes/FLOPs."""

    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    peak_bytes: int
    flops_per_step: int  # forward + backward of one step
    upload_bytes: int  # the serialised upload (safetensors, header included)
    trainable_params: int
    replay_flops: int = 0  # per round, outside the steps: replaying (seed, scalar) pairs

    def flops_per_round(self, steps: int) -> int:
        """FLOPs of ``steps`` local steps of this shape, plus the round's replay."""
        return steps * self.flops_per_step + self.replay_flops


# --------------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class _Arch:
    """The few numbers of a Hugging Face config that costs depend on."""

    family: str  # "bert" | "llama"
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    type_vocab: int
    hidden_dropout: bool  # dropout layers on the residual branches (train mode, p > 0)
    attn_dropout: bool  # dropout on the attention probabilities
    head_dropout: bool  # dropout before the classifier
    attn_bias: bool
    mlp_bias: bool
    tied: bool  # output projection tied to the input embedding (causal LM)


COST_MODELS = ("bert", "llama")


def has_cost_model(config: Any) -> bool:
    """Whether :func:`predict` models this architecture (``model.config.model_type``)."""
    return str(getattr(config, "model_type", "")) in COST_MODELS


def _arch(config: Any) -> _Arch:
    family = str(config.model_type)
    h, heads = int(config.hidden_size), int(config.num_attention_heads)
    if family == "bert":
        hidden_p = float(config.hidden_dropout_prob)
        head_p = config.classifier_dropout
        return _Arch(
            family,
            h,
            int(config.intermediate_size),
            int(config.num_hidden_layers),
            heads,
            heads,
            h // heads,
            int(config.vocab_size),
            int(config.max_position_embeddings),
            int(config.type_vocab_size),
            hidden_p > 0,
            float(config.attention_probs_dropout_prob) > 0,
            float(hidden_p if head_p is None else head_p) > 0,
            True,
            True,
            False,
        )
    if family == "llama":
        return _Arch(
            family,
            h,
            int(config.intermediate_size),
            int(config.num_hidden_layers),
            heads,
            int(getattr(config, "num_key_value_heads", None) or heads),
            int(getattr(config, "head_dim", None) or h // heads),
            int(config.vocab_size),
            int(config.max_position_embeddings),
            0,
            False,
            float(config.attention_dropout) > 0,
            False,
            bool(config.attention_bias),
            bool(config.mlp_bias),
            bool(config.tie_word_embeddings),
        )
    raise ValueError(f"predict: no cost model for model_type {family!r} ({', '.join(COST_MODELS)})")


def _linears(arch: _Arch) -> list[tuple[str, int, int, bool]]:
    """(path inside a block, in, out, bias) of the block's linear layers, in forward order."""
    h, i, q, kv = arch.hidden, arch.inter, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    if arch.family == "bert":  # q = h, unless the block is narrowed (SLT)
        return [
            ("attention.self.query", h, q, True),
            ("attention.self.key", h, q, True),
            ("attention.self.value", h, q, True),
            ("attention.output.dense", q, h, True),
            ("intermediate.dense", h, i, True),
            ("output.dense", i, h, True),
        ]
    ab, mb = arch.attn_bias, arch.mlp_bias
    return [
        ("self_attn.q_proj", h, q, ab),
        ("self_attn.k_proj", h, kv, ab),
        ("self_attn.v_proj", h, kv, ab),
        ("self_attn.o_proj", q, h, ab),
        ("mlp.gate_proj", h, i, mb),
        ("mlp.up_proj", h, i, mb),
        ("mlp.down_proj", i, h, mb),
    ]


Shape = tuple[int, ...]
Adapter = tuple[str, int]
"""What sits on one linear: ("lora", rank), ("lora-frozen", rank) (LoRA present but not
trained: another Spry client's share), ("ia3-out", 0) (IA3 rescales the output) or ("ia3-in",
0) (IA3 rescales the input: feed-forward modules)."""
Adapters = dict[str, Adapter]


def _linear_params(prefix: str, n_in: int, n_out: int, bias: bool) -> list[tuple[str, Shape]]:
    out: list[tuple[str, Shape]] = [(f"{prefix}.weight", (n_out, n_in))]
    if bias:
        out.append((f"{prefix}.bias", (n_out,)))
    return out


def _norm_params(prefix: str, h: int, bias: bool) -> list[tuple[str, Shape]]:
    out: list[tuple[str, Shape]] = [(f"{prefix}.weight", (h,))]
    if bias:
        out.append((f"{prefix}.bias", (h,)))
    return out


Narrowing = tuple[int, _Arch] | None
"""SLT's narrowed blocks: (the first narrowed block, the architecture of those blocks)."""


def _narrowing(arch: _Arch, spec: TrainSpec) -> Narrowing:
    """The blocks ``spec`` narrows (kind "slt", width < 1: every trained block above the
    lowest), with their head and unit counts from models/narrow.py's rule."""
    if spec.kind != "slt" or spec.width >= 1:
        return None
    heads, kv_heads, inter = narrowed_sizes(arch.heads, arch.kv_heads, arch.inter, spec.width)
    narrow = dataclasses.replace(arch, heads=heads, kv_heads=kv_heads, inter=inter)
    return arch.layers - spec.trained_layers + 1, narrow


def _block_arch(arch: _Arch, narrowing: Narrowing, i: int) -> _Arch:
    return narrowing[1] if narrowing is not None and i >= narrowing[0] else arch


def _spec_parameters(
    arch: _Arch, task: str, num_labels: int, spec: TrainSpec
) -> list[tuple[str, Shape, str]]:
    """:func:`_parameters` of the model a device holds for ``spec`` (SLT: narrowed blocks)."""
    return _parameters(arch, task, num_labels, _narrowing(arch, spec))


def _parameters(
    arch: _Arch, task: str, num_labels: int, narrowing: Narrowing = None
) -> list[tuple[str, Shape, str]]:
    """(name, shape, group) of every parameter of the task model, as ``named_parameters``.

    group: "embed", "block.<i>", "top" (pooler / final norm) or "head" (classifier / score).
    ``narrowing``: blocks with fewer heads and units (SLT), see :func:`_narrowing`.
    """
    h = arch.hidden
    params: list[tuple[str, Shape, str]] = []
    if arch.family == "bert":
        base = "bert."
        emb = [
            (f"{base}embeddings.word_embeddings.weight", (arch.vocab, h)),
            (f"{base}embeddings.position_embeddings.weight", (arch.max_positions, h)),
            (f"{base}embeddings.token_type_embeddings.weight", (arch.type_vocab, h)),
            *_norm_params(f"{base}embeddings.LayerNorm", h, True),
        ]
        norms = {
            "attention.output.dense": "attention.output.LayerNorm",
            "output.dense": "output.LayerNorm",
        }
        block_prefix = f"{base}encoder.layer"
        top = _linear_params(f"{base}pooler.dense", h, h, True)
        head = _linear_params("classifier", h, num_labels, True)
    else:
        base = "model."
        emb = [(f"{base}embed_tokens.weight", (arch.vocab, h))]
        norms = {}
        block_prefix = f"{base}layers"
        top = _norm_params(f"{base}norm", h, False)
        if task == "classification":
            head = _linear_params("score", h, num_labels, False)
        else:
            head = [] if arch.tied else _linear_params("lm_head", h, arch.vocab, False)
    params += [(n, s, "embed") for n, s in emb]
    for i in range(arch.layers):
        block: list[tuple[str, Shape]] = []
        if arch.family == "llama":
            block += _norm_params("input_layernorm", h, False)
        for path, n_in, n_out, bias in _linears(_block_arch(arch, narrowing, i)):
            block += _linear_params(path, n_in, n_out, bias)
            if path in norms:
                block += _norm_params(norms[path], h, True)
        if arch.family == "llama":
            block += _norm_params("post_attention_layernorm", h, False)
        params += [(f"{block_prefix}.{i}.{n}", s, f"block.{i}") for n, s in block]
    params += [(n, s, "top") for n, s in top]
    params += [(n, s, "head") for n, s in head]
    return params


# --------------------------------------------------------------------------- one block


class _Tally:
    """Bytes saved for backward, forward transient peak and FLOPs, accumulated op by op."""

    def __init__(self) -> None:
        self.saved = 0  # bytes autograd keeps until backward
        self.transient = 0  # most bytes live at once above ``saved`` (relative, this block)
        self.forward = 0
        self.backward = 0
        self.tangent = 0  # a jvp's tangent FLOPs (forward mode, section Forward mode)

    def save(self, numel: int, when: bool = True) -> None:
        if when:
            self.saved += F32 * numel

    def live(self, numel: int) -> None:
        """Record a moment where ``numel`` floats beyond the saved ones are live."""
        self.transient = max(self.transient, F32 * numel)

    def linear(
        self, m: int, n_in: int, n_out: int, x_rg: bool, w_rg: bool, adapter: Adapter | None
    ) -> tuple[bool, bool]:
        """A linear layer on ``m`` rows, with its adapter if any (see :data:`Adapter`).

        Returns (output rg, input saved): addmm saves its input only for dW; LoRA's A saves it
        for dA and B saves A's output (m x rank) for dB; IA3 saves what its vector multiplies
        (the linear's output, or its input for a feed-forward one).
        """
        kind, rank = adapter or ("", 0)
        dx = x_rg or kind == "ia3-in"  # an input rescaled by a trained vector needs dX too
        self.forward += 2 * m * n_in * n_out
        self.backward += 2 * m * n_in * n_out * (int(w_rg) + int(dx))
        if kind == "lora":
            self.forward += 2 * m * rank * (n_in + n_out)
            # dA, dB, and the gradient of A's output (dB_x); dA_x only if the input is rg
            self.backward += 2 * m * rank * (n_in + 2 * n_out + (n_in if x_rg else 0))
            self.save(m * rank)
        elif kind == "lora-frozen":  # present, not trained (another Spry client's share)
            self.forward += 2 * m * rank * (n_in + n_out)
            self.backward += 2 * m * rank * (n_in + n_out) * int(x_rg)
        elif kind == "ia3-out":
            self.save(m * n_out)
        elif kind == "ia3-in":
            self.save(m * n_in)
        trained = kind in ("lora", "ia3-out", "ia3-in")
        out_rg = x_rg or w_rg or trained
        # Forward mode: the product rule dispatches a term per operand once any operand has
        # a tangent, zero tangents included; a frozen weight (forward/core._FrozenLinear)
        # contributes none, and a linear without any tangent runs as a plain one.
        if kind == "lora" or (kind == "lora-frozen" and x_rg):
            self.tangent += 2 * 2 * m * rank * (n_in + n_out)
        if w_rg:
            self.tangent += 2 * 2 * m * n_in * n_out
        elif dx:
            self.tangent += 2 * m * n_in * n_out
        return out_rg, w_rg or kind == "lora"


def _attention(
    t: _Tally,
    arch: _Arch,
    n: int,
    s: int,
    projections: int,
    q_rg: bool,
    k_rg: bool,
    v_rg: bool,
) -> bool:
    """softmax(q k^T / sqrt(d) + mask) v over ``s`` score entries (B a T^2); returns ctx rg.

    ``bmm`` saves each operand only for the other's gradient; softmax saves its output; the
    probabilities' dropout saves its float mask and the dropped probabilities feed p v.
    """
    qd = n * arch.heads * arch.head_dim  # q, and k / v after GQA repetition
    d = arch.head_dim
    scores_rg = q_rg or k_rg
    t.forward += 2 * 2 * s * d
    t.backward += 2 * s * d * (int(q_rg) + int(k_rg) + int(scores_rg) + int(v_rg))
    t.tangent += 2 * 2 * s * d * (int(scores_rg) + int(scores_rg or v_rg))
    t.save(qd, k_rg)  # q (contiguous copy) for dk
    t.save(qd, q_rg)  # k for dq
    # the moment of the probabilities' dropout: the q, k, v projections (held by the caller),
    # the softmax output, the mask and the dropped probabilities (or scores and softmax)
    t.live(t.saved // F32 + projections + (3 if arch.attn_dropout else 2) * s)
    t.save(qd, scores_rg)  # v for d(probs)
    if arch.attn_dropout:
        t.save(s, scores_rg)  # softmax output
        t.save(s, scores_rg)  # dropout mask
        t.save(s, v_rg)  # dropped probabilities, for dv
    else:
        t.save(s, scores_rg or v_rg)  # softmax output = probabilities
    return scores_rg or v_rg


def _bert_block(
    arch: _Arch, b: int, tokens: int, x_rg: bool, w_rg: bool, adapters: Adapters
) -> tuple[_Tally, bool, bool]:
    """One BERT block; returns (tally, output rg, input saved)."""
    t, n, h, i = _Tally(), b * tokens, arch.hidden, arch.inter
    q = arch.heads * arch.head_dim  # h, unless the block is narrowed (SLT)
    s = b * arch.heads * tokens * tokens
    q_rg, q_in = t.linear(n, h, q, x_rg, w_rg, adapters.get("attention.self.query"))
    k_rg, k_in = t.linear(n, h, q, x_rg, w_rg, adapters.get("attention.self.key"))
    v_rg, v_in = t.linear(n, h, q, x_rg, w_rg, adapters.get("attention.self.value"))
    ctx_rg = _attention(t, arch, n, s, 3 * n * q, q_rg, k_rg, v_rg)
    d_rg, d_in = t.linear(n, q, h, ctx_rg, w_rg, adapters.get("attention.output.dense"))
    t.save(n * q, d_in)  # context (heads merged, contiguous)
    t.save(n * h, d_rg and arch.hidden_dropout)
    ln1_rg = d_rg or x_rg
    t.save(n * h + 2 * n, ln1_rg or w_rg)  # LayerNorm input + mean + rstd
    ln1_out_rg = ln1_rg or w_rg
    f1_rg, f1_in = t.linear(n, h, i, ln1_out_rg, w_rg, adapters.get("intermediate.dense"))
    t.save(n * h, f1_in)  # LayerNorm output
    t.save(n * i, f1_rg)  # GELU input
    f2_rg, f2_in = t.linear(n, i, h, f1_rg, w_rg, adapters.get("output.dense"))
    t.save(n * i, f2_in)  # GELU output
    # the moment GELU returns: LayerNorm output, FC1 and GELU outputs are live whether saved
    # or not, and BertLayer holds the attention probabilities (its ``_``) until it returns
    probs_saved = v_rg if arch.attn_dropout else ctx_rg
    unsaved = n * h * (not f1_in) + n * i * ((not f1_rg) + (not f2_in)) + s * (not probs_saved)
    t.live(t.saved // F32 + unsaved)
    t.save(n * h, f2_rg and arch.hidden_dropout)
    ln2_rg = f2_rg or ln1_out_rg
    ln2_saved = ln2_rg or w_rg
    t.save(n * h + 2 * n, ln2_saved)
    # the moment LN2 returns: the block's locals still hold the LayerNorm-1 output, the GELU
    # output, the FFN (dropout) output and the probabilities; LN2's input and output
    unsaved = n * h * ((not f1_in) + 1 + (not ln2_saved) + 1) + n * i * (not f2_in)
    t.live(t.saved // F32 + unsaved + s * (not probs_saved))
    return t, ln2_rg or w_rg, q_in or k_in or v_in


def _rms_norm(t: _Tally, n: int, h: int, x_rg: bool, w_rg: bool) -> bool:
    """Llama RMSNorm: x * rsqrt(mean(x^2) + eps) * w; saves x, rsqrt and x_hat (for dw)."""
    t.save(n * h, x_rg)  # pow and mul save x
    t.save(n, x_rg)  # rsqrt output
    t.save(n * h, w_rg)  # normalised x, for dw
    return x_rg or w_rg


def _llama_block(
    arch: _Arch, b: int, tokens: int, x_rg: bool, w_rg: bool, adapters: Adapters
) -> tuple[_Tally, bool, bool]:
    """One Llama block; returns (tally, output rg, input saved)."""
    t, n, h, i = _Tally(), b * tokens, arch.hidden, arch.inter
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    s = b * arch.heads * tokens * tokens
    y_rg = _rms_norm(t, n, h, x_rg, w_rg)
    q_rg, q_in = t.linear(n, h, q, y_rg, w_rg, adapters.get("self_attn.q_proj"))
    k_rg, k_in = t.linear(n, h, kv, y_rg, w_rg, adapters.get("self_attn.k_proj"))
    v_rg, v_in = t.linear(n, h, kv, y_rg, w_rg, adapters.get("self_attn.v_proj"))
    t.save(n * h, q_in or k_in or v_in)  # normalised input of q, k, v
    ctx_rg = _attention(t, arch, n, s, n * (2 * q + 2 * kv), q_rg, k_rg, v_rg)
    o_rg, o_in = t.linear(n, q, h, ctx_rg, w_rg, adapters.get("self_attn.o_proj"))
    t.save(n * q, o_in)
    h1_rg = o_rg or x_rg
    y2_rg = _rms_norm(t, n, h, h1_rg, w_rg)
    g_rg, g_in = t.linear(n, h, i, y2_rg, w_rg, adapters.get("mlp.gate_proj"))
    u_rg, u_in = t.linear(n, h, i, y2_rg, w_rg, adapters.get("mlp.up_proj"))
    t.save(n * h, g_in or u_in)
    t.save(n * i, g_rg)  # SiLU input
    t.save(n * i, u_rg)  # SiLU output, for d(up)
    t.save(n * i, g_rg)  # up output, for d(silu)
    p_rg = g_rg or u_rg
    d_rg, d_in = t.linear(n, i, h, p_rg, w_rg, adapters.get("mlp.down_proj"))
    # the moment of silu(gate) * up: the residual h1, the MLP input, SiLU and up outputs and
    # their product are live whether saved or not; the layer holds the probabilities (``_``)
    probs_saved = v_rg if arch.attn_dropout else ctx_rg
    unsaved = n * h * ((not h1_rg) + (not (g_in or u_in)))
    unsaved += n * i * ((not u_rg) + 2 * (not g_rg))  # SiLU output; gate and up outputs
    t.live(t.saved // F32 + unsaved + n * i + s * (not probs_saved))
    t.save(n * i, d_in)
    return t, d_rg or h1_rg, False  # x is counted by the RMSNorm


# --------------------------------------------------------------------------- whole model


def _matches(path: str, targets: tuple[str, ...]) -> bool:
    """peft's rule for a target name: the module's name is it, or ends with "." + it."""
    return any(path == t or path.endswith("." + t) for t in targets)


# IA3's default targets per family (peft's), and which of them rescale their input
IA3_TARGETS = {
    "bert": ("key", "value", "output.dense"),
    "llama": ("k_proj", "v_proj", "down_proj"),
}
IA3_FEEDFORWARD = {"bert": ("output.dense",), "llama": ("down_proj",)}


@dataclass(frozen=True)
class _Tensor:
    """A trained tensor: its name as ``named_parameters`` gives it, shape, group ("embed",
    "block.<i>", "top", "head") and, inside a block, the path of the linear it adapts."""

    name: str
    shape: Shape
    group: str
    path: str = ""


BLOCK_PREFIX = {"bert": "bert.encoder.layer", "llama": "model.layers"}


def _block_path(arch: _Arch, name: str, group: str) -> str:
    """The path of a parameter's module inside its block ("attention.self.query"); above the
    blocks, inside the backbone ("pooler.dense")."""
    module = name.rsplit(".", 1)[0]
    if group == "top":
        return module.split(".", 1)[1]
    return module[len(f"{BLOCK_PREFIX[arch.family]}.{group[6:]}.") :]


def _all_trained(
    arch: _Arch, spec: TrainSpec, task: str, params: list[tuple[str, Shape, str]]
) -> list[_Tensor]:
    """Every tensor ``spec.kind`` makes trainable, in model order (before any Spry share)."""
    if spec.kind == "full":
        return [_Tensor(n, s, g) for n, s, g in params]
    if spec.kind == "head":
        return [_Tensor(n, s, g) for n, s, g in params if g == "head"]
    if spec.kind in ("layers", "slt"):
        first = arch.layers - spec.trained_layers
        return [
            _Tensor(n, s, g)
            for n, s, g in params
            if g in ("top", "head") or (g.startswith("block.") and int(g[6:]) >= first)
        ]
    if spec.kind == "bitfit":  # every bias, and the classification head
        if arch.family != "bert" or task != "classification":
            raise ValueError("predict: bitfit needs biases (BERT) and a classification head")
        return [_Tensor(n, s, g) for n, s, g in params if g == "head" or n.endswith(".bias")]
    # LoRA and IA3: peft prefixes every name with base_model.model. and trains a copy of the
    # classification head (modules_to_save)
    out: list[_Tensor] = []
    if spec.kind == "lora":
        targets, r = spec.targets(arch.family), spec.lora_rank
    else:
        targets, r = spec.lora_targets or IA3_TARGETS[arch.family], 0
    for name, shape, group in params:
        module = name.rsplit(".", 1)[0]
        base = f"base_model.model.{module}"
        matrix = name.endswith(".weight") and len(shape) == 2
        if group not in ("embed", "head") and matrix and _matches(module, targets):
            path = _block_path(arch, name, group)
            if spec.kind == "lora":
                out.append(_Tensor(f"{base}.lora_A.default.weight", (r, shape[1]), group, path))
                out.append(_Tensor(f"{base}.lora_B.default.weight", (shape[0], r), group, path))
            elif _matches(module, IA3_FEEDFORWARD[arch.family]):
                out.append(_Tensor(f"{base}.ia3_l.default", (1, shape[1]), group, path))
            else:
                out.append(_Tensor(f"{base}.ia3_l.default", (shape[0], 1), group, path))
        if group == "head" and task == "classification":
            head, leaf = name.rsplit(".", 1)
            out.append(
                _Tensor(f"base_model.model.{head}.modules_to_save.default.{leaf}", shape, group)
            )
    return out


def _share(tensors: list[_Tensor], spec: TrainSpec) -> list[_Tensor]:
    """Spry: the tensors of the client at ``spec.share = (position, clients)``, split as
    Spry splits them (costs/share.py: ``tensor_groups`` then ``assign_groups``)."""
    if spec.share == (0, 1):
        return tensors
    position, clients = spec.share
    head = [t.name for t in tensors if "classifier" in t.name or "score" in t.name]
    groups = tensor_groups([t.name for t in tensors], head)
    if not spec.share_head and head:
        groups.append(head)
    names = {n for g in assign_groups(len(groups), clients)[position] for n in groups[g]}
    if spec.share_head:
        names |= set(head)
    return [t for t in tensors if t.name in names]


def _trainable(
    arch: _Arch, spec: TrainSpec, task: str, params: list[tuple[str, Shape, str]]
) -> list[tuple[str, Shape]]:
    """(name, shape) of the trained tensors, named as ``model.named_parameters()`` names them."""
    return [(t.name, t.shape) for t in _share(_all_trained(arch, spec, task, params), spec)]


def _numel(shape: Shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


# bytes per element, and the rank by which safetensors orders the data (larger dtypes first)
DTYPES = {"I64": (8, 2), "F32": (4, 1), "I32": (4, 0)}
Named = tuple[str, Shape] | tuple[str, Shape, str]


def safetensors_bytes(tensors: Sequence[Named]) -> int:
    """Exact size of ``safetensors.torch.save`` of tensors with these names and shapes (and
    dtypes: "F32" unless a third item says "I32" or "I64").

    Layout: an 8-byte little-endian header length, a JSON header (each tensor with dtype,
    shape and data offsets; no spaces) padded with spaces to a multiple of 8, then the raw
    data, ordered by dtype (larger first) then name: that order sets the offsets' digits.
    """
    typed = [(t[0], t[1], t[2] if len(t) == 3 else "F32") for t in tensors]
    header, offset = 1, 0  # "{" (the "}" takes the place of the last entry's comma)
    for name, shape, dtype in sorted(typed, key=lambda t: (-DTYPES[t[2]][1], t[0])):
        end = offset + DTYPES[dtype][0] * _numel(shape)
        dims = ",".join(map(str, shape))
        header += len(
            f'"{name}":{{"dtype":"{dtype}","shape":[{dims}],"data_offsets":[{offset},{end}]}},'
        )
        offset = end
    header = max(header, 2)  # "{}" when there are no tensors
    return 8 + header + (-header) % 8 + offset


def _buffers_bytes(arch: _Arch) -> int:
    if arch.family == "bert":
        return 2 * 8 * arch.max_positions  # position_ids, token_type_ids (int64)
    return 2 * F32 * (arch.head_dim // 2)  # rotary inv_freq and original_inv_freq


@dataclass(frozen=True)
class _Layout:
    """What the step trains, block by block, as the activation model needs it."""

    rg_from: int  # the hidden state requires grad (carries a tangent) from before this block
    blocks: tuple[tuple[bool, tuple[tuple[str, Adapter], ...]], ...]  # (weights rg, adapters)
    top_rg: bool  # pooler / final norm trained
    head_rg: bool  # classifier / score / lm_head trained


def _layout(arch: _Arch, spec: TrainSpec, task: str, trained: list[_Tensor]) -> _Layout:
    """Where the gradient (or tangent) starts, and each block's trained weights / adapters."""
    top = arch.layers - spec.trained_layers
    first = {"full": 0, "layers": top, "slt": top}.get(spec.kind, arch.layers)
    names = {t.name for t in trained}
    rg_from = 0 if spec.kind == "full" else arch.layers
    if spec.kind == "bitfit":  # biases: the gradient flows from the lowest trained one (a
        # share without the embeddings' bias is taken to start at its lowest block's input)
        below = [
            0 if t.group == "embed" else int(t.group[6:])
            for t in trained
            if t.group != "top" and t.group != "head"
        ]
        rg_from = min(below, default=arch.layers)
    blocks = []
    for i in range(arch.layers):
        adapters: dict[str, Adapter] = {}
        if spec.kind == "lora":
            for path, *_ in _linears(arch):
                if _matches(path, spec.targets(arch.family)):
                    prefix = BLOCK_PREFIX[arch.family]
                    a = f"base_model.model.{prefix}.{i}.{path}.lora_A.default.weight"
                    adapters[path] = ("lora" if a in names else "lora-frozen", spec.lora_rank)
        elif spec.kind == "ia3":
            for t in trained:
                if t.group == f"block.{i}":
                    adapters[t.path] = ("ia3-in" if t.shape[0] == 1 else "ia3-out", 0)
        blocks.append((i >= first, tuple(sorted(adapters.items()))))
    head_rg = any(t.group == "head" for t in trained)
    return _Layout(rg_from, tuple(blocks), spec.kind in ("full", "layers", "slt"), head_rg)


@dataclass(frozen=True)
class _Passes:
    """One forward pass of the step's shape, seen by each kind of step."""

    activations: int  # backprop: max(forward peak, backward peak) (section Activations)
    forward_flops: tuple[int, ...]  # per block, then the top (pooler / norm + head)
    backward_flops: int  # backprop's backward
    tangent_flops: int  # a jvp's tangent FLOPs (beyond its primal forward)
    inference_peak: int  # a forward without graph (no_grad), above the weights
    jvp_peak: int  # a forward on dual numbers (primal + tangent), above the weights


@functools.lru_cache(maxsize=4096)
def _passes(
    arch: _Arch, task: str, num_labels: int, spec: TrainSpec, b: int, tokens: int, padded: bool
) -> _Passes:
    """One forward pass of the step's shape, block by block: backprop's saved tensors and
    peaks, the inference and jvp moments, and the matmul FLOPs of each (module docstring)."""
    n, h = b * tokens, arch.hidden
    full = spec.kind == "full"
    trained = _share(
        _all_trained(arch, spec, task, _spec_parameters(arch, task, num_labels, spec)), spec
    )
    layout = _layout(arch, spec, task, trained)
    narrowing = _narrowing(arch, spec)
    block = _bert_block if arch.family == "bert" else _llama_block
    # live through the whole forward, freed when it returns: the 4-D float attention mask
    # (BERT builds it only for a padded batch; Llama's causal mask always), Llama's cos / sin
    forward_only = F32 * b * tokens * tokens if (padded or arch.family == "llama") else 0
    x = F32 * n * h  # the hidden state handed from block to block
    # Forward-only passes (inference, jvp) save nothing: the mask and the embedding output
    # (held by the model's forward) sit below the moment of the block being computed.
    base = forward_only + x
    tangent = 2 if layout.rg_from == 0 else 1  # a jvp doubles every tensor from its tangent on
    inference = jvp = 0
    saved = forward_peak = backward = tangent_flops = 0
    forward: list[int] = []
    x_rg = layout.rg_from == 0
    if arch.family == "bert" and x_rg:  # embeddings LayerNorm (+ its dropout mask)
        saved += F32 * (n * h * (2 if arch.hidden_dropout else 1) + 2 * n)
    if arch.family == "llama":
        rope = 2 * F32 * n * arch.head_dim
        # q * cos and rotate_half(q) * sin keep cos and sin only when something is trained
        saved += rope if (full or spec.kind in ("lora", "layers", "slt", "ia3")) else 0
    seen: dict[Any, tuple[_Tally, bool, bool]] = {}  # blocks differ only by these
    for i, (w_rg, adapters) in enumerate(layout.blocks):
        x_rg = x_rg or layout.rg_from == i
        here = _block_arch(arch, narrowing, i)
        key = (here, x_rg, w_rg, adapters)
        if key not in seen:
            seen[key] = block(here, b, tokens, x_rg, w_rg, dict(adapters))
        # the same block with nothing trained: the moments of a pass that saves nothing
        untrained = tuple((p, ("lora-frozen", r)) for p, (k, r) in adapters if k.startswith("lora"))
        frozen_key = (here, False, False, untrained)
        if frozen_key not in seen:
            seen[frozen_key] = block(here, b, tokens, False, False, dict(untrained))
        t, out_rg, in_saved = seen[key]
        plain = seen[frozen_key][0]
        if i == 0 and not (in_saved or (arch.family == "llama" and x_rg)):
            # the embedding output stays referenced by the model's forward until it returns
            forward_only += x
        forward_peak = max(forward_peak, forward_only + saved + x + t.transient)
        inference = max(inference, base + x + plain.transient)
        tangent = 2 if (x_rg or out_rg) else 1
        # the scores' product rule holds its two terms and the primal at once: one more
        # score-sized tensor than twice the inference moment
        scores = F32 * b * arch.heads * tokens * tokens if tangent == 2 else 0
        jvp = max(jvp, base + tangent * (x + plain.transient) + scores)
        saved += t.saved + (x if in_saved else 0)
        forward.append(t.forward)
        backward += t.backward
        tangent_flops += t.tangent
        x_rg = out_rg
    head_rg, top_rg = layout.head_rg, layout.top_rg
    t = _Tally()
    if arch.family == "bert":
        pooler = None
        if spec.kind == "lora" and _matches("pooler.dense", spec.targets("bert")):
            a = "base_model.model.bert.pooler.dense.lora_A.default.weight"
            pooler = ("lora" if a in {t.name for t in trained} else "lora-frozen", spec.lora_rank)
        p_rg, p_in = t.linear(b, h, h, x_rg, top_rg, pooler)
        t.save(n * h, p_in)  # the pooler reads a view of the whole last hidden state
        t.save(b * h, p_rg)  # tanh output
        t.save(b * h, p_rg and arch.head_dropout)
        c_rg, c_in = t.linear(b, h, num_labels, p_rg, head_rg, None)
        t.save(b * h, c_in)
        t.save(b * num_labels, c_rg)  # log_softmax output
        # the top block's backward: FC2's input gradient (N I) is allocated while LN2's
        # input and the FFN dropout mask (2 N h) are already freed
        inter = _block_arch(arch, narrowing, arch.layers - 1).inter
        backward_extra = F32 * n * (max(inter - h, h) if x_rg else h)
        top_live = 0
    else:
        y_rg = _rms_norm(t, n, h, x_rg, top_rg)
        # the final norm's x * rsqrt and its weighted output live with its input at the end
        forward_only += 2 * F32 * n * h
        out = num_labels if task == "classification" else arch.vocab
        out_w_rg = head_rg if task == "classification" else (full and arch.tied) or top_rg
        c_rg, c_in = t.linear(
            n, h, out, y_rg, out_w_rg and (task == "classification" or full), None
        )
        t.save(n * h, c_in)
        top_live = 2 * F32 * n * h
        if task == "lm":
            t.save(n * out, c_rg)  # log_softmax output over the vocabulary
            forward_only += F32 * n * out  # the logits, until the output object is dropped
            top_live += 2 * F32 * n * out  # the logits and their log_softmax
        backward_extra = F32 * max(n * h, 2 * n * (out if task == "lm" else 0))
    forward.append(t.forward)
    backward += t.backward
    tangent_flops += t.tangent
    saved += t.saved
    forward_peak = max(forward_peak, forward_only + saved + x)
    inference = max(inference, base + x + top_live)
    # log_softmax's tangent needs exp(output) beside both logits and both outputs
    jvp = max(jvp, base + tangent * (x + top_live) + F32 * n * arch.vocab * (task == "lm"))
    return _Passes(
        activations=max(forward_peak, saved + backward_extra),
        forward_flops=tuple(forward),
        backward_flops=backward,
        tangent_flops=tangent_flops,
        inference_peak=inference,
        jvp_peak=jvp,
    )


def _adafactor_numel(shape: Shape) -> int:
    """Numbers in Adafactor's second-moment state of a tensor: factored over its last two
    dimensions when it has at least two (rows + columns), else full."""
    if len(shape) < 2:
        return _numel(shape)
    lead = _numel(shape[:-2])
    return lead * (shape[-2] + shape[-1])


@functools.lru_cache(maxsize=4096)
def _static_costs(
    arch: _Arch, task: str, num_labels: int, spec: TrainSpec
) -> tuple[int, int, int, int, int, int]:
    """(weights, grads, optimiser state, optimiser temporaries, weights upload bytes,
    trainable params): everything that does not depend on the batch shape (cached: the
    planner asks often)."""
    params = _spec_parameters(arch, task, num_labels, spec)
    every = _all_trained(arch, spec, task, params)
    trained = [(t.name, t.shape) for t in _share(every, spec)]
    trainable_params = sum(_numel(s) for _, s in trained)
    weights = F32 * sum(_numel(s) for _, s, _ in params) + _buffers_bytes(arch)
    if spec.frozen_dtype != "float32":  # every tensor but the trained ones
        frozen_numel = sum(_numel(s) for _, s, _ in params) - trainable_params
        weights += (FROZEN_DTYPES[spec.frozen_dtype] - F32) * frozen_numel
    if spec.kind in ("lora", "ia3"):  # the adapters and peft's trainable copy of the head
        weights += F32 * sum(_numel(t.shape) for t in every)
    # zero-order steps and Spry's per-iteration mode leave no gradient for an optimiser
    stepped = spec.step in ("backprop", "jvp", "fd") and spec.upload != "jvp"
    grads = F32 * trainable_params if stepped else 0
    largest = max((F32 * _numel(s) for _, s in trained), default=0)
    if not stepped:
        optimizer = temporaries = 0
    elif spec.optimizer == "adamw":
        optimizer = 2 * grads + F32 * len(trained)
        temporaries = 2 * largest  # sqrt(v) and its division by the bias correction
    elif spec.optimizer == "sgd-momentum":
        optimizer, temporaries = grads, 0  # one momentum buffer, updated in place
    elif spec.optimizer == "adafactor":
        # transformers' Adafactor, no first moment: a matrix keeps the row and column means of
        # its squared gradient, a vector its full second moment; each tensor one RMS scalar.
        optimizer = F32 * sum(_adafactor_numel(s) + 1 for _, s in trained)
        temporaries = 2 * largest  # grad^2 + eps, then the rebuilt second moment
    else:
        optimizer = temporaries = 0
    upload = safetensors_bytes(trained)
    return weights, grads, optimizer, temporaries, upload, trainable_params


# Zero-order perturbation (zeroorder/core.py) keeps 3 bytes (int16 offset + int8 bit
# difference) per element that ``(p + d) - d`` does not bring back; the fraction of such
# elements depends on the weights and eps (4% of MiniLM's at eps 1e-3, 7.5% of random
# tiny-bert's and tiny-llama's, 1-2% of LoRA's, whose B starts at 0): the model takes 7.5%.
ZO_FIXED_FRACTION = 0.075
ZO_FIX_BYTES = 3


def scalar_payload(spec: TrainSpec, steps: int) -> list[tuple[str, Shape, str]]:
    """(name, shape, dtype) of the tensors of a seeds-and-scalars upload after ``steps``
    local steps, as each method builds its payload."""
    p = spec.probes
    if spec.upload == "jvp":  # Spry per iteration: the K jvp values of its one minibatch
        return [("jvp", (p * steps,), "F32")]
    if spec.upload == "kseed":  # FedKSeed: a pool index and a scalar per step
        return [("seed_index", (steps,), "I32"), ("scalar", (steps,), "F32")]
    if spec.upload == "decomfl":  # DeComFL: the scalars, [steps, P]
        return [("scalar", (steps, p), "F32")]
    if spec.upload == "spzo":  # FedSPZO: the base seed, block-1 and block-2 scalars
        return [
            ("base_seed", (1,), "I64"),
            ("block1_scalar", (steps, p), "F32"),
            ("block2_scalar", (steps, p, spec.probes2), "F32"),
        ]
    raise ValueError(f"scalar_payload: upload {spec.upload!r} holds weights")


def _step_costs(
    arch: _Arch, spec: TrainSpec, passes: _Passes, trained_bytes: int, n: int
) -> tuple[int, int]:
    """(activation bytes, FLOPs) of one step of ``spec.step`` (module docstring)."""
    forward = sum(passes.forward_flops)
    k = spec.probes
    if spec.step == "backprop":
        return passes.activations, forward + passes.backward_flops
    if spec.step == "jvp":  # K tangents and the estimate live through the K dual passes
        return passes.jvp_peak + (k + 1) * trained_bytes, k * (forward + passes.tangent_flops)
    if spec.step == "fd":  # K tangents, the saved tensors and the estimate; 2K + 1 passes
        return passes.inference_peak + (k + 2) * trained_bytes, (2 * k + 1) * forward
    fixes = math.ceil(ZO_FIXED_FRACTION * trained_bytes / F32) * ZO_FIX_BYTES
    if spec.step == "zo":
        return passes.inference_peak + fixes, 2 * k * forward
    # spzo: block 1's two outputs are kept while block 2 runs its 2 P2 passes on them; the
    # one block 2 reads stands where the embedding output stood, the other is extra
    lower = sum(passes.forward_flops[: spec.split])
    upper = forward - lower
    flops = 2 * k * lower + 2 * k * spec.probes2 * upper
    return passes.inference_peak + F32 * n * arch.hidden + fixes, flops


def predict(
    model_config: Any,
    task: str,
    num_labels: int,
    spec: TrainSpec,
    batch_size: int,
    seq_len: int,
    padded: bool = True,
    steps: int = 1,
) -> CostEstimate:
    """Predicted cost of one training step of ``spec`` on a (batch_size x seq_len) batch.

    ``model_config``: the model's Hugging Face ``BertConfig`` / ``LlamaConfig``
    (``model.config``). ``padded``: the batch has padding, so BERT builds its 4-D attention
    mask (collated batches nearly always do). ``steps``: local steps of a round, which sizes
    a seeds-and-scalars upload (``spec.upload``). Analytic: no model is built.
    """
    arch = _arch(model_config)
    if task not in ("classification", "lm") or (arch.family == "bert" and task == "lm"):
        raise ValueError(f"predict: task {task!r} is not supported for {arch.family}")
    if spec.kind == "head" and task != "classification":
        raise ValueError("predict: TrainSpec(kind='head') needs task='classification'")
    if spec.kind in ("layers", "slt") and spec.trained_layers > arch.layers:
        raise ValueError(f"trained_layers={spec.trained_layers} > the {arch.layers} blocks")
    if spec.step == "spzo" and not 0 <= spec.split <= arch.layers:
        raise ValueError(f"split={spec.split} outside the {arch.layers} blocks")
    if spec.frozen_dtype != "float32" and arch.family != "bert":
        raise ValueError(
            f"predict: frozen_dtype={spec.frozen_dtype!r} is modelled for BERT-family models "
            "only (Llama's attention upcasts its softmax to float32, so its activations do "
            "not shrink with the weights)"
        )
    if spec.step != "backprop":  # these steps run the model in eval mode: no dropout
        arch = dataclasses.replace(
            arch, hidden_dropout=False, attn_dropout=False, head_dropout=False
        )
    weights, grads, optimizer, temporaries, upload, trainable_params = _static_costs(
        arch, task, num_labels, spec
    )
    passes = _passes(arch, task, num_labels, spec, batch_size, seq_len, padded)
    activations, flops = _step_costs(
        arch, spec, passes, F32 * trainable_params, batch_size * seq_len
    )
    if spec.frozen_dtype != "float32" and spec.kind == "head":
        # a head-only step's activations are the frozen layers' outputs, in their dtype (the
        # head's own b x h input and b x labels output in float32 are a few kB)
        activations = activations * FROZEN_DTYPES[spec.frozen_dtype] // F32
    if spec.upload != "weights":
        upload = safetensors_bytes(scalar_payload(spec, steps))
    # Steady state: from a round's second step on, the optimiser state is resident while
    # the forward and backward passes run (the first step's peak is never higher).
    peak = weights + optimizer + max(activations, grads + temporaries)
    return CostEstimate(
        weights_bytes=weights,
        grads_bytes=grads,
        optimizer_bytes=optimizer,
        activations_bytes=activations,
        peak_bytes=peak,
        flops_per_step=flops,
        upload_bytes=upload,
        trainable_params=trainable_params,
        replay_flops=2 * spec.replay_pairs * _replayed_params(arch, task, num_labels, spec),
    )


def _replayed_params(arch: _Arch, task: str, num_labels: int, spec: TrainSpec) -> int:
    """Elements a replay of (seed, scalar) pairs updates: every trained tensor."""
    if not spec.replay_pairs:
        return 0
    return sum(
        _numel(t.shape)
        for t in _all_trained(arch, spec, task, _spec_parameters(arch, task, num_labels, spec))
    )
