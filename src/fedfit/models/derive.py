"""A ~19M-parameter causal LM cut out of SmolLM2-135M: fewer blocks and a smaller tokenizer.

Cross-device FL papers train LMs of about 20M parameters (Ro et al. 2022, "Scaling Language
Model Size in Cross-Device Federated Learning": a 21M transformer with a ~10k vocabulary).
``smollm2-19m`` is such a model initialised from SmolLM2-135M by selection and copying only,
with no further training ("healing"):

- **Tokenizer.** SmolLM2's tokenizer is byte-level BPE (GPT-2 style). The truncated one keeps
  the special tokens, the byte-alphabet tokens and only the first ``M`` merges in priority
  order, with ``M`` chosen so that the vocabulary has :data:`VOCAB_SIZE` tokens. A merge only
  joins the byte alphabet or results of earlier merges, so this BPE is closed: every token it
  can produce is kept, and decoding stays lossless. Pre-tokenizer, normaliser, decoder and
  special tokens (bos/eos/pad/unk) are SmolLM2's. SmolLM2 orders its vocabulary as specials,
  alphabet, then merge results in merge order, so the kept tokens are exactly its ids
  ``0 .. V-1``; the code still maps ids by token string and does not rely on that.
- **Weights.** Hidden size and every block as in SmolLM2. The tied embedding is SmolLM2's
  rows of the kept tokens; the blocks are SmolLM2's blocks :data:`BLOCKS` (chosen by measured
  perplexity, see there), renumbered 0..k-1; the final norm is SmolLM2's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedfit.models import configs

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM

VOCAB_SIZE: int = configs.SMOLLM2_19M["vocab_size"]  # 8192, a multiple of 64

# Which 4 of SmolLM2's 30 blocks to keep, measured once (never at load time): perplexity before
# any training, with the 8192-token tokenizer, on 400 random speeches of shakespeare's TRAIN
# split (numpy seed 0, max_length 128, 14,507 predicted tokens; fedfit's engine evaluate()):
#   0,1,2,3: 4.98e7   0,1,2,29: 5.69e10   0,1,28,29: 7.51e6   0,10,20,29: 3.01e6
#   0,27,28,29: 7.37e5   26,27,28,29: 2.94e6   0,1,2,28: 1.58e7   1,2,3,29: 2.10e7
#   0,2,4,29: 8.73e7   0,1,15,29: 5.23e6
#   greedy forward selection (add the block that lowers it most): 23 (1.66e6), +27 (5.74e5),
#   +29 (5.57e5), +18 -> 18,23,27,29: 1.18e5, the lowest; chosen.
# All are far above uniform (8192): a 4-block cut of SmolLM2 is overconfident (the same models
# with logits divided by 4 reach 1.8e3-6.8e3). For comparison, all 30 blocks with this
# tokenizer: 186. A fine-tuning probe (full, AdamW 1e-4, batch 16, 40 steps) does not rank
# them quite the same: 18,23,27,29 reached 844, 0,27,28,29 648, 0,1,2,3 14,967.
BLOCKS: tuple[int, ...] = (18, 23, 27, 29)

# The tensors of one Llama block (no biases in SmolLM2), relative to ``model.layers.<i>.``.
BLOCK_TENSORS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EMBEDDING_KEY = "model.embed_tokens.weight"


def recipe_tag(blocks: Sequence[int] = BLOCKS, vocab_size: int = VOCAB_SIZE) -> str:
    """A short name of the derivation (``v8192-b18-23-27-29``): part of the cache folder's name,
    so that changing the recipe builds a new folder instead of reusing an outdated one."""
    return f"v{vocab_size}-b" + "-".join(str(b) for b in blocks)


# --------------------------------------------------------------------------- tokenizer


def truncate_bpe(spec: Mapping[str, Any], vocab_size: int) -> tuple[dict[str, Any], list[int]]:
    """Truncate a byte-level BPE ``tokenizer.json`` (as a dict) to ``vocab_size`` tokens.

    Kept: the added (special) tokens, the base vocabulary (every token that is no merge result:
    the byte alphabet) and the results of the first ``M`` merges, ``M`` the largest count that
    fits. New ids follow the old ids' order, compacted to ``0 .. vocab_size-1``.

    Returns the new spec and ``old_ids`` with ``old_ids[new_id]`` = the token's SmolLM2 id.
    Raises ``ValueError`` if ``vocab_size`` is below the base vocabulary, above the original one,
    or not reachable exactly, or if a kept merge used a dropped token (the BPE would not be
    closed).
    """
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"expected a BPE tokenizer, got {model.get('type')!r}")
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    results = [a + b for a, b in merges]
    merged = set(results)
    added = {t["content"] for t in spec.get("added_tokens", [])}
    # Base tokens: in the vocabulary but no merge makes them (specials and the byte alphabet).
    kept = {t for t in vocab if t not in merged} | (added & vocab.keys())
    if not len(kept) <= vocab_size <= len(vocab):
        raise ValueError(f"vocab_size {vocab_size} outside [{len(kept)}, {len(vocab)}]")
    num_merges = 0
    while len(kept) < vocab_size:
        a, b = merges[num_merges]
        if a not in kept or b not in kept:
            raise ValueError(f"merge {num_merges} ({a!r} {b!r}) uses a token not kept")
        kept.add(results[num_merges])
        num_merges += 1
    old_ids = sorted(vocab[t] for t in kept)
    old_to_new = {old: new for new, old in enumerate(old_ids)}
    new_spec = json.loads(json.dumps(spec))  # deep copy; the spec is plain JSON
    new_spec["model"]["vocab"] = {t: old_to_new[vocab[t]] for t in kept}
    new_spec["model"]["merges"] = [list(m) for m in merges[:num_merges]]
    for token in new_spec.get("added_tokens", []):
        token["id"] = old_to_new[vocab[token["content"]]]
    return new_spec, old_ids


def build_tokenizer(source: Path, folder: Path, vocab_size: int = VOCAB_SIZE) -> list[int]:
    """Write the truncated tokenizer of the transformers tokenizer folder ``source`` to
    ``folder`` (loadable with ``AutoTokenizer``); returns ``old_ids`` (see :func:`truncate_bpe`).
    Special tokens and the chat template are copied from ``source``."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    spec = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    new_spec, old_ids = truncate_bpe(spec, vocab_size)
    original = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(new_spec)),
        **{k: v for k, v in original.special_tokens_map.items() if isinstance(v, str)},
    )
    tokenizer.chat_template = original.chat_template
    tokenizer.save_pretrained(str(folder))
    return old_ids


# --------------------------------------------------------------------------- weights


def select_weights(
    state: Mapping[str, torch.Tensor], old_ids: Sequence[int], blocks: Sequence[int]
) -> dict[str, torch.Tensor]:
    """The derived model's state from SmolLM2's ``LlamaForCausalLM`` state (tied: no lm_head).

    Embedding rows ``old_ids`` (in new-id order), block ``blocks[i]`` as block ``i``, every
    other non-block tensor (the final norm) as is. Copies, so the result owns its memory.
    """
    import torch

    new_index = {old: new for new, old in enumerate(blocks)}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            out[key] = tensor.clone()
        elif int(match[1]) in new_index:
            out[f"model.layers.{new_index[int(match[1])]}.{match[2]}"] = tensor.clone()
    out[_EMBEDDING_KEY] = state[_EMBEDDING_KEY][torch.as_tensor(list(old_ids))].clone()
    out.pop("lm_head.weight", None)  # tied to the embedding
    if len(new_index) != len(blocks) or len(out) != len(blocks) * len(BLOCK_TENSORS) + 2:
        raise ValueError(f"blocks {list(blocks)} are not distinct blocks of the source")
    return out


def derived_config(source: Path, vocab_size: int, num_layers: int) -> Any:
    """SmolLM2's ``LlamaConfig`` (from ``source``) with the smaller vocabulary and depth."""
    from transformers import LlamaConfig

    settings = LlamaConfig.from_pretrained(str(source), local_files_only=True).to_dict()
    settings.update(vocab_size=vocab_size, num_hidden_layers=num_layers)
    settings.pop("_model_name_or_path", None)  # SmolLM2's checkpoint name: not this model
    return LlamaConfig.from_dict(settings)


def derived_model(
    source: Path, old_ids: Sequence[int], blocks: Sequence[int] = BLOCKS
) -> LlamaForCausalLM:
    """The derived ``LlamaForCausalLM`` (float32, eager attention) from the SmolLM2 folder
    ``source`` (config.json + model.safetensors), in memory."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    config = derived_config(source, len(old_ids), len(blocks))
    config._attn_implementation = "eager"
    weights = select_weights(load_file(str(source / "model.safetensors")), old_ids, blocks)
    with torch.random.fork_rng(devices=[]):  # the throw-away random init must not touch RNG
        model = LlamaForCausalLM(config)
    # Every parameter must come from SmolLM2; only lm_head is absent (tied to the embedding).
    result = model.load_state_dict(weights, strict=False)
    if set(result.missing_keys) - {"lm_head.weight"} or result.unexpected_keys:
        raise RuntimeError(
            f"derived state does not fit: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("expected lm_head tied to the embedding, as in SmolLM2")
    return model.eval()


def build_derived(source: Path, folder: Path, blocks: Sequence[int] = BLOCKS) -> None:
    """Write the derived model and its truncated tokenizer to ``folder`` from the dequantised
    SmolLM2 folder ``source`` (weights, config and tokenizer); takes a few seconds."""
    old_ids = build_tokenizer(source, folder, VOCAB_SIZE)
    derived_model(source, old_ids, blocks).save_pretrained(str(folder))
