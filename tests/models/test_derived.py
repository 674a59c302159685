"""smollm2-19m (models/derive.py): the truncated BPE tokenizer and the block/row selection.

The tokenizer tests build the 8192-token tokenizer from SmolLM2's (about a second once
transformers is imported) and compare it with a brute-force BPE; the weight-selection tests use
tiny tensors. The ``real`` tests load the cached derived model (first use: ~10 s to build it
from the dequantised SmolLM2 folder) and compare it with SmolLM2 tensor by tensor.
"""

from __future__ import annotations

import json
from itertools import pairwise
from typing import Any

import pytest
import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoTokenizer

from fedfit.models import configs, derive, get_model_info, load_model
from fedfit.models.zoo import _smollm2_19m_dir, _smollm2_dir, _smollm2_tokenizer_dir

V = configs.SMOLLM2_19M["vocab_size"]
TEXTS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "KING HENRY.\nOnce more unto the breach, dear friends, once more;",
    "Café, naïve, Ærøskøbing, 日本語, emoji 🎭 and Ω≈ç√",
    "digits 0123456789 3.14159 1,000,000 and 2024-11-23",
    "runs of   spaces,\t\ttabs,\n\n\nnewlines   \n  and trailing   ",
    "",
]


@pytest.fixture(scope="module")
def source_spec() -> dict[str, Any]:
    return json.loads((_smollm2_tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def original() -> Any:
    return AutoTokenizer.from_pretrained(str(_smollm2_tokenizer_dir()), local_files_only=True)


@pytest.fixture(scope="module")
def truncated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, list[int]]:
    folder = tmp_path_factory.mktemp("smollm2-19m-tokenizer")
    old_ids = derive.build_tokenizer(_smollm2_tokenizer_dir(), folder)
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True), old_ids


def _brute_force_bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """GPT-2's BPE on one pre-token: merge the best-ranked adjacent pair until none is left."""
    parts = list(word)
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(pairwise(parts))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


# --------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_ids_in_range(truncated: tuple[Any, list[int]], text: str) -> None:
    tokenizer, _ = truncated
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    assert all(0 <= i < V for i in ids)
    assert tokenizer.decode(ids) == text


def test_vocabulary_is_a_closed_prefix_of_smollm2s(
    truncated: tuple[Any, list[int]], source_spec: dict[str, Any], original: Any
) -> None:
    tokenizer, old_ids = truncated
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    old_vocab, old_merges = source_spec["model"]["vocab"], source_spec["model"]["merges"]
    assert len(vocab) == len(tokenizer) == V == len(old_ids)
    # Every kept token is a SmolLM2 token, mapped by its string; new ids keep the old order.
    assert all(old_vocab[t] == old_ids[i] for t, i in vocab.items())
    assert old_ids == sorted(old_ids)
    # The kept merges are SmolLM2's first ones, and each joins two kept tokens into a kept one.
    assert merges == [list(m) for m in old_merges[: len(merges)]]
    assert all(a in vocab and b in vocab and a + b in vocab for a, b in merges)
    # 17 specials + 235 byte-alphabet tokens (SmolLM2 lacks 21 of the 256) + the merges.
    assert len(merges) == V - 17 - 235 == 7940
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(tokenizer, f"{name}_token") == getattr(original, f"{name}_token")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)


def test_encoding_equals_brute_force_bpe_with_the_first_merges(
    truncated: tuple[Any, list[int]], original: Any
) -> None:
    tokenizer, _ = truncated
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    ranks = {tuple(m): r for r, m in enumerate(spec["model"]["merges"])}
    pre = ByteLevel(add_prefix_space=False, use_regex=True)
    for text in TEXTS:
        expected = [
            token
            for word, _ in pre.pre_tokenize_str(text)
            for token in _brute_force_bpe(word, ranks)
        ]
        assert tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"]) == expected
    # Truncation costs tokens: more of them than SmolLM2's tokenizer needs for the same text.
    assert len(tokenizer(TEXTS[0])["input_ids"]) > len(original(TEXTS[0])["input_ids"])


def _tiny_spec(merges: list[str]) -> dict[str, Any]:
    vocab = {"<s>": 0, "a": 1, "b": 2, "c": 3, "ab": 4, "abc": 5, "bc": 6}
    return {
        "added_tokens": [{"id": 0, "content": "<s>", "special": True}],
        "model": {"type": "BPE", "vocab": vocab, "merges": merges},
    }


def test_truncate_bpe_on_a_hand_made_vocabulary() -> None:
    spec, old_ids = derive.truncate_bpe(_tiny_spec(["a b", "ab c", "b c"]), 6)
    assert spec["model"]["vocab"] == {"<s>": 0, "a": 1, "b": 2, "c": 3, "ab": 4, "abc": 5}
    assert spec["model"]["merges"] == [["a", "b"], ["ab", "c"]]
    assert old_ids == [0, 1, 2, 3, 4, 5]
    # Without "ab", "abc" cannot be formed: the ids are compacted past the dropped token.
    spec, old_ids = derive.truncate_bpe(_tiny_spec(["b c", "a b", "ab c"]), 5)
    assert spec["model"]["vocab"] == {"<s>": 0, "a": 1, "b": 2, "c": 3, "bc": 4}
    assert old_ids == [0, 1, 2, 3, 6]
    with pytest.raises(ValueError, match="outside"):
        derive.truncate_bpe(_tiny_spec(["a b"]), 3)
    with pytest.raises(ValueError, match="not kept"):  # not closed: "ab" comes later
        derive.truncate_bpe(_tiny_spec(["ab c", "a b"]), 6)


# --------------------------------------------------------------------------- weights


def _fake_state(num_layers: int, vocab: int, hidden: int = 3) -> dict[str, torch.Tensor]:
    state = {
        "model.embed_tokens.weight": torch.randn(vocab, hidden),
        "model.norm.weight": torch.randn(hidden),
    }
    for layer in range(num_layers):
        for name in derive.BLOCK_TENSORS:
            state[f"model.layers.{layer}.{name}"] = torch.full((hidden,), float(layer))
    return state


def test_select_weights_renumbers_blocks_and_picks_rows() -> None:
    state = _fake_state(num_layers=6, vocab=10)
    out = derive.select_weights(state, old_ids=[0, 3, 4], blocks=(1, 5))
    assert torch.equal(
        out["model.embed_tokens.weight"], state["model.embed_tokens.weight"][[0, 3, 4]]
    )
    assert torch.equal(out["model.norm.weight"], state["model.norm.weight"])
    assert {float(out[f"model.layers.0.{n}"][0]) for n in derive.BLOCK_TENSORS} == {1.0}
    assert {float(out[f"model.layers.1.{n}"][0]) for n in derive.BLOCK_TENSORS} == {5.0}
    assert len(out) == 2 + 2 * len(derive.BLOCK_TENSORS)
    with pytest.raises(ValueError, match="distinct"):
        derive.select_weights(state, [0], blocks=(1, 1))
    with pytest.raises(ValueError, match="distinct"):
        derive.select_weights(state, [0], blocks=(1, 9))


# --------------------------------------------------------------------------- real weights


@pytest.mark.real
def test_derived_model_is_smollm2s_rows_and_blocks() -> None:
    from safetensors.torch import load_file

    info = get_model_info("smollm2-19m")
    model, tokenizer = load_model("smollm2-19m", "lm")
    saved = json.loads((_smollm2_19m_dir() / "config.json").read_text())
    assert {k: saved[k] for k in configs.SMOLLM2_19M} == configs.SMOLLM2_19M
    assert sum(p.numel() for p in model.base_model.parameters()) == info.num_params == 18_879_552
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2

    source = load_file(str(_smollm2_dir() / "model.safetensors"))
    original = AutoTokenizer.from_pretrained(str(_smollm2_dir()), local_files_only=True)
    embedding = model.model.embed_tokens.weight
    for token in ["<|im_end|>", "Ġthe", "ĠKing", "!", "Ċ", tokenizer.convert_ids_to_tokens(V - 1)]:
        new_id, old_id = (
            tokenizer.convert_tokens_to_ids(token),
            original.convert_tokens_to_ids(token),
        )
        assert torch.equal(embedding[new_id], source["model.embed_tokens.weight"][old_id])
    for i, block in enumerate(derive.BLOCKS):
        for name in derive.BLOCK_TENSORS:
            mine = model.state_dict()[f"model.layers.{i}.{name}"]
            assert torch.equal(mine, source[f"model.layers.{block}.{name}"])
    assert torch.equal(model.model.norm.weight, source["model.norm.weight"])

    batch = tokenizer(TEXTS[0], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], V)
    assert torch.isfinite(logits).all()


def test_cache_folder_name_carries_the_recipe() -> None:
    assert derive.recipe_tag((0, 5), 64) == "v64-b0-5"
    assert derive.recipe_tag() == f"v{V}-b" + "-".join(map(str, derive.BLOCKS))
