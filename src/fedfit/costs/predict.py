"""Analytic cost model: peak training memory, FLOPs and upload bytes of one client step.

``predict`` reads only the Hugging Face config (no model, no tensors): the planner calls it for
every device x candidate depth / rank, so it must be cheap (tens of microseconds). Its terms
follow what :func:`fedfit.costs.measure_step` measures on the real step (eager attention,
float32, train mode, a fresh optimiser as every client update builds one); the tests hold it
to the measurement (10% on peak memory, 5% on FLOPs).

Notation: B batch, T tokens, N = B*T, h hidden, I intermediate, a heads, d = h/a head size,
L blocks, V vocabulary; 4 bytes per float32. "rg" = requires grad.

Weights. All parameters (tied ones once) + buffers: BERT keeps ``position_ids`` and
``token_type_ids`` (int64, max_positions each), Llama the rotary ``inv_freq`` and its
``original_inv_freq`` copy (d/2 floats each). LoRA adds A (r x in) and B (out x r) per
adapted linear and, for classification, peft's trainable copy of the head.

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
LoRA adds 2 N r (in + out) forward and dA, dB, dB_x, and dA_x when the input is rg.

Upload: the safetensors serialisation of the trainable tensors, header included:
8 + len(JSON header padded with spaces to a multiple of 8) + 4 x trainable params; the header
is built from the tensor names and shapes the model would have, so it is exact.

Scope: BERT (classification) and Llama (classification, causal LM) as transformers 5 builds
them, float32, eager attention, torch's CPU AdamW / SGD (single-tensor path). Measured
agreement (tests/costs/test_predict.py): FLOPs exact; peak within 2.1% on tiny-bert and
MiniLM-L6 and 3.3% on tiny-llama; activations within 1% on BERT, within 13% on tiny-llama
classification with LoRA or head only at small shapes (the peak is weight-dominated there).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from fedfit.costs.spec import TrainSpec

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
    upload_bytes: int  # serialised trainable tensors (safetensors, header included)
    trainable_params: int

    def flops_per_round(self, steps: int) -> int:
        """FLOPs of ``steps`` local steps of this shape."""
        return steps * self.flops_per_step


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
    raise ValueError(f"predict: no cost model for model_type {family!r} (bert, llama)")


def _linears(arch: _Arch) -> list[tuple[str, int, int, bool]]:
    """(path inside a block, in, out, bias) of the block's linear layers, in forward order."""
    h, i, q, kv = arch.hidden, arch.inter, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    if arch.family == "bert":
        return [
            ("attention.self.query", h, h, True),
            ("attention.self.key", h, h, True),
            ("attention.self.value", h, h, True),
            ("attention.output.dense", h, h, True),
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


def _parameters(arch: _Arch, task: str, num_labels: int) -> list[tuple[str, Shape, str]]:
    """(name, shape, group) of every parameter of the task model, as ``named_parameters``.

    group: "embed", "block.<i>", "top" (pooler / final norm) or "head" (classifier / score).
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
        for path, n_in, n_out, bias in _linears(arch):
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

    def save(self, numel: int, when: bool = True) -> None:
        if when:
            self.saved += F32 * numel

    def live(self, numel: int) -> None:
        """Record a moment where ``numel`` floats beyond the saved ones are live."""
        self.transient = max(self.transient, F32 * numel)

    def linear(
        self, m: int, n_in: int, n_out: int, x_rg: bool, w_rg: bool, rank: int
    ) -> tuple[bool, bool]:
        """A linear layer on ``m`` rows (plus a LoRA branch of ``rank``; 0 = none).

        Returns (output rg, input saved): addmm saves its input only for dW; LoRA's A saves it
        for dA and B saves A's output (m x rank) for dB.
        """
        self.forward += 2 * m * n_in * n_out
        self.backward += 2 * m * n_in * n_out * (int(w_rg) + int(x_rg))
        if rank:
            self.forward += 2 * m * rank * (n_in + n_out)
            # dA, dB, and the gradient of A's output (dB_x); dA_x only if the input is rg
            self.backward += 2 * m * rank * (n_in + 2 * n_out + (n_in if x_rg else 0))
            self.save(m * rank)
        return x_rg or w_rg or rank > 0, w_rg or rank > 0


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
    arch: _Arch, b: int, tokens: int, x_rg: bool, w_rg: bool, ranks: dict[str, int]
) -> tuple[_Tally, bool, bool]:
    """One BERT block; returns (tally, output rg, input saved)."""
    t, n, h, i = _Tally(), b * tokens, arch.hidden, arch.inter
    s = b * arch.heads * tokens * tokens
    q_rg, q_in = t.linear(n, h, h, x_rg, w_rg, ranks.get("attention.self.query", 0))
    k_rg, k_in = t.linear(n, h, h, x_rg, w_rg, ranks.get("attention.self.key", 0))
    v_rg, v_in = t.linear(n, h, h, x_rg, w_rg, ranks.get("attention.self.value", 0))
    ctx_rg = _attention(t, arch, n, s, 3 * n * h, q_rg, k_rg, v_rg)
    d_rg, d_in = t.linear(n, h, h, ctx_rg, w_rg, ranks.get("attention.output.dense", 0))
    t.save(n * h, d_in)  # context (heads merged, contiguous)
    t.save(n * h, d_rg and arch.hidden_dropout)
    ln1_rg = d_rg or x_rg
    t.save(n * h + 2 * n, ln1_rg or w_rg)  # LayerNorm input + mean + rstd
    ln1_out_rg = ln1_rg or w_rg
    f1_rg, f1_in = t.linear(n, h, i, ln1_out_rg, w_rg, ranks.get("intermediate.dense", 0))
    t.save(n * h, f1_in)  # LayerNorm output
    t.save(n * i, f1_rg)  # GELU input
    f2_rg, f2_in = t.linear(n, i, h, f1_rg, w_rg, ranks.get("output.dense", 0))
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
    arch: _Arch, b: int, tokens: int, x_rg: bool, w_rg: bool, ranks: dict[str, int]
) -> tuple[_Tally, bool, bool]:
    """One Llama block; returns (tally, output rg, input saved)."""
    t, n, h, i = _Tally(), b * tokens, arch.hidden, arch.inter
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    s = b * arch.heads * tokens * tokens
    y_rg = _rms_norm(t, n, h, x_rg, w_rg)
    q_rg, q_in = t.linear(n, h, q, y_rg, w_rg, ranks.get("self_attn.q_proj", 0))
    k_rg, k_in = t.linear(n, h, kv, y_rg, w_rg, ranks.get("self_attn.k_proj", 0))
    v_rg, v_in = t.linear(n, h, kv, y_rg, w_rg, ranks.get("self_attn.v_proj", 0))
    t.save(n * h, q_in or k_in or v_in)  # normalised input of q, k, v
    ctx_rg = _attention(t, arch, n, s, n * (2 * q + 2 * kv), q_rg, k_rg, v_rg)
    o_rg, o_in = t.linear(n, q, h, ctx_rg, w_rg, ranks.get("self_attn.o_proj", 0))
    t.save(n * q, o_in)
    h1_rg = o_rg or x_rg
    y2_rg = _rms_norm(t, n, h, h1_rg, w_rg)
    g_rg, g_in = t.linear(n, h, i, y2_rg, w_rg, ranks.get("mlp.gate_proj", 0))
    u_rg, u_in = t.linear(n, h, i, y2_rg, w_rg, ranks.get("mlp.up_proj", 0))
    t.save(n * h, g_in or u_in)
    t.save(n * i, g_rg)  # SiLU input
    t.save(n * i, u_rg)  # SiLU output, for d(up)
    t.save(n * i, g_rg)  # up output, for d(silu)
    p_rg = g_rg or u_rg
    d_rg, d_in = t.linear(n, i, h, p_rg, w_rg, ranks.get("mlp.down_proj", 0))
    # the moment of silu(gate) * up: the residual h1, the MLP input, SiLU and up outputs and
    # their product are live whether saved or not; the layer holds the probabilities (``_``)
    probs_saved = v_rg if arch.attn_dropout else ctx_rg
    unsaved = n * h * ((not h1_rg) + (not (g_in or u_in))) + n * i * ((not u_rg) + (not g_rg))
    t.live(t.saved // F32 + unsaved + n * i + s * (not probs_saved))
    t.save(n * i, d_in)
    return t, d_rg or h1_rg, False  # x is counted by the RMSNorm


# --------------------------------------------------------------------------- whole model


def _matches(path: str, targets: tuple[str, ...]) -> bool:
    """peft's rule for a target name: the module's name is it, or ends with "." + it."""
    return any(path == t or path.endswith("." + t) for t in targets)


def _trainable(
    arch: _Arch, spec: TrainSpec, task: str, params: list[tuple[str, Shape, str]]
) -> list[tuple[str, Shape]]:
    """(name, shape) of the trained tensors, named as ``model.named_parameters()`` names them."""
    if spec.kind == "full":
        return [(n, s) for n, s, _ in params]
    if spec.kind == "head":
        return [(n, s) for n, s, g in params if g == "head"]
    if spec.kind == "layers":
        first = arch.layers - spec.trained_layers
        return [
            (n, s)
            for n, s, g in params
            if g in ("top", "head") or (g.startswith("block.") and int(g[6:]) >= first)
        ]
    # LoRA: peft prefixes every name with base_model.model. and trains a copy of the head
    targets, r = spec.targets(arch.family), spec.lora_rank
    out: list[tuple[str, Shape]] = []
    for name, shape, group in params:
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and len(shape) == 2 and group != "head":
            if group != "embed" and _matches(module, targets):
                base = f"base_model.model.{module}"
                out += [(f"{base}.lora_A.default.weight", (r, shape[1]))]
                out += [(f"{base}.lora_B.default.weight", (shape[0], r))]
        if group == "head" and task == "classification":
            head, leaf = name.rsplit(".", 1)
            out.append((f"base_model.model.{head}.modules_to_save.default.{leaf}", shape))
    return out


def _numel(shape: Shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def safetensors_bytes(tensors: list[tuple[str, Shape]]) -> int:
    """Exact size of ``safetensors.torch.save`` of float32 tensors with these names and shapes.

    Layout: an 8-byte little-endian header length, a JSON header (tensors in name order, each
    with dtype, shape and data offsets; no spaces) padded with spaces to a multiple of 8, then
    the raw data.
    """
    header, offset = 1, 0  # "{" (the "}" takes the place of the last entry's comma)
    for name, shape in sorted(tensors):
        end = offset + F32 * _numel(shape)
        dims = ",".join(map(str, shape))
        header += len(
            f'"{name}":{{"dtype":"F32","shape":[{dims}],"data_offsets":[{offset},{end}]}},'
        )
        offset = end
    header = max(header, 2)  # "{}" when there are no tensors
    return 8 + header + (-header) % 8 + offset


def _buffers_bytes(arch: _Arch) -> int:
    if arch.family == "bert":
        return 2 * 8 * arch.max_positions  # position_ids, token_type_ids (int64)
    return 2 * F32 * (arch.head_dim // 2)  # rotary inv_freq and original_inv_freq


def _block_ranks(arch: _Arch, spec: TrainSpec) -> dict[str, int]:
    if spec.kind != "lora":
        return {}
    targets = spec.targets(arch.family)
    return {p: spec.lora_rank for p, *_ in _linears(arch) if _matches(p, targets)}


def _step(
    arch: _Arch, task: str, num_labels: int, spec: TrainSpec, b: int, tokens: int, padded: bool
) -> tuple[int, int]:
    """(activation bytes, FLOPs) of one forward + backward."""
    n, h = b * tokens, arch.hidden
    full = spec.kind == "full"
    first_trained = {"full": 0, "layers": arch.layers - spec.trained_layers}.get(
        spec.kind, arch.layers
    )
    ranks = _block_ranks(arch, spec)
    block = _bert_block if arch.family == "bert" else _llama_block
    # live through the whole forward, freed when it returns: the 4-D float attention mask
    # (BERT builds it only for a padded batch; Llama's causal mask always), Llama's cos / sin
    forward_only = F32 * b * tokens * tokens if (padded or arch.family == "llama") else 0
    saved = forward_peak = flops = 0
    x_rg = full
    if arch.family == "bert" and full:  # embeddings LayerNorm (+ its dropout mask)
        saved += F32 * (n * h * (2 if arch.hidden_dropout else 1) + 2 * n)
    if arch.family == "llama":
        rope = 2 * F32 * n * arch.head_dim
        # q * cos and rotate_half(q) * sin keep cos and sin only when something is trained
        saved += rope if (full or spec.kind in ("lora", "layers")) else 0
    x = F32 * n * h  # the hidden state handed from block to block
    seen: dict[tuple[bool, bool], tuple[_Tally, bool, bool]] = {}  # blocks differ only by these
    for i in range(arch.layers):
        key = (x_rg, i >= first_trained)
        if key not in seen:
            seen[key] = block(arch, b, tokens, *key, ranks)
        t, out_rg, in_saved = seen[key]
        if i == 0 and not (in_saved or (arch.family == "llama" and full)):
            # the embedding output stays referenced by the model's forward until it returns
            forward_only += x
        forward_peak = max(forward_peak, forward_only + saved + x + t.transient)
        saved += t.saved + (x if in_saved else 0)
        flops += t.forward + t.backward
        x_rg = out_rg
    top_rg = spec.kind in ("full", "layers")
    head_rg = spec.kind != "lora" or task == "classification"
    t = _Tally()
    if arch.family == "bert":
        rank = spec.lora_rank if ranks and _matches("pooler.dense", spec.targets("bert")) else 0
        p_rg, p_in = t.linear(b, h, h, x_rg, top_rg, rank)
        t.save(n * h, p_in)  # the pooler reads a view of the whole last hidden state
        t.save(b * h, p_rg)  # tanh output
        t.save(b * h, p_rg and arch.head_dropout)
        c_rg, c_in = t.linear(b, h, num_labels, p_rg, head_rg, 0)
        t.save(b * h, c_in)
        t.save(b * num_labels, c_rg)  # log_softmax output
        # the top block's backward: FC2's input gradient (N I) is allocated while LN2's
        # input and the FFN dropout mask (2 N h) are already freed
        backward_extra = F32 * n * (max(arch.inter - h, h) if x_rg else h)
    else:
        y_rg = _rms_norm(t, n, h, x_rg, top_rg)
        # the final norm's x * rsqrt and its weighted output live with its input at the end
        forward_only += 2 * F32 * n * h
        out = num_labels if task == "classification" else arch.vocab
        out_w_rg = head_rg if task == "classification" else (full and arch.tied) or top_rg
        c_rg, c_in = t.linear(n, h, out, y_rg, out_w_rg and (task == "classification" or full), 0)
        t.save(n * h, c_in)
        if task == "lm":
            t.save(n * out, c_rg)  # log_softmax output over the vocabulary
            forward_only += F32 * n * out  # the logits, until the output object is dropped
        backward_extra = F32 * max(n * h, 2 * n * (out if task == "lm" else 0))
    flops += t.forward + t.backward
    saved += t.saved
    forward_peak = max(forward_peak, forward_only + saved + x)
    return max(forward_peak, saved + backward_extra), flops


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
    """(weights, grads, optimiser state, optimiser temporaries, upload bytes, trainable params):
    everything that does not depend on the batch shape (cached: the planner asks often)."""
    params = _parameters(arch, task, num_labels)
    trained = _trainable(arch, spec, task, params)
    trainable_params = sum(_numel(s) for _, s in trained)
    weights = F32 * sum(_numel(s) for _, s, _ in params) + _buffers_bytes(arch)
    if spec.kind == "lora":  # the adapters and peft's trainable copy of the head
        weights += F32 * trainable_params
    grads = F32 * trainable_params
    largest = max((F32 * _numel(s) for _, s in trained), default=0)
    if spec.optimizer == "adamw":
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


def predict(
    model_config: Any,
    task: str,
    num_labels: int,
    spec: TrainSpec,
    batch_size: int,
    seq_len: int,
    padded: bool = True,
) -> CostEstimate:
    """Predicted cost of one training step of ``spec`` on a (batch_size x seq_len) batch.

    ``model_config``: the model's Hugging Face ``BertConfig`` / ``LlamaConfig``
    (``model.config``). ``padded``: the batch has padding, so BERT builds its 4-D attention
    mask (collated batches nearly always do). Analytic: no model is built.
    """
    arch = _arch(model_config)
    if task not in ("classification", "lm") or (arch.family == "bert" and task == "lm"):
        raise ValueError(f"predict: task {task!r} is not supported for {arch.family}")
    if spec.kind == "head" and task != "classification":
        raise ValueError("predict: TrainSpec(kind='head') needs task='classification'")
    if spec.kind == "layers" and spec.trained_layers > arch.layers:
        raise ValueError(f"trained_layers={spec.trained_layers} > the {arch.layers} blocks")
    weights, grads, optimizer, temporaries, upload, trainable_params = _static_costs(
        arch, task, num_labels, spec
    )
    activations, flops = _step(arch, task, num_labels, spec, batch_size, seq_len, padded)
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
    )
