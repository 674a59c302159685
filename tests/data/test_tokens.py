"""Token cache (hit, key, truncation) and collate (padding to the batch max, LM masking)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedfit.data import collate, tokenize
from fedfit.data.tokens import cache_path

TEXTS = ["Hello world", "Self-driving cars just seem lazy _\ufffd_", "a " * 100]


def test_tokenize_matches_tokenizer_and_truncates(minilm_tokenizer: Any, token_cache: Path) -> None:
    ids = tokenize(TEXTS, minilm_tokenizer, max_length=16)
    assert all(x.dtype == np.int32 for x in ids)
    assert ids[0].tolist() == [101, 7592, 2088, 102]  # [CLS] hello world [SEP]
    expected = minilm_tokenizer(TEXTS[1])["input_ids"]
    assert ids[1].tolist() == expected
    # 100 tokens of "a" truncated to 16 with [SEP] kept last
    assert len(ids[2]) == 16 and ids[2][0] == 101 and ids[2][-1] == 102


def test_second_call_reads_cache_not_tokenizer(
    minilm_tokenizer: Any, token_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = tokenize(TEXTS, minilm_tokenizer, max_length=32)
    path = cache_path(TEXTS, minilm_tokenizer, 32)
    assert path.parent == token_cache / "tokens" and path.exists()

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("tokenizer called despite the cache")

    monkeypatch.setattr(type(minilm_tokenizer), "__call__", boom)
    second = tokenize(TEXTS, minilm_tokenizer, max_length=32)
    assert [x.tolist() for x in second] == [x.tolist() for x in first]
    # another max_length or other texts are other keys, so they do reach the tokenizer
    with pytest.raises(AssertionError, match="despite the cache"):
        tokenize(TEXTS, minilm_tokenizer, max_length=8)
    with pytest.raises(AssertionError, match="despite the cache"):
        tokenize([*TEXTS[:2], TEXTS[2] + "!"], minilm_tokenizer, max_length=32)


def test_cache_key_separates_text_boundaries(minilm_tokenizer: Any, token_cache: Path) -> None:
    assert cache_path(["ab"], minilm_tokenizer, 8) != cache_path(["a", "b"], minilm_tokenizer, 8)


SEQS = [np.array([101, 5, 6, 102], dtype=np.int32), np.array([101, 102], dtype=np.int32)]


def test_collate_classification_pads_to_batch_max() -> None:
    batch = collate(SEQS, pad_id=0, labels=[2, 0])
    assert torch.equal(batch["input_ids"], torch.tensor([[101, 5, 6, 102], [101, 102, 0, 0]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([2, 0]))
    assert batch["input_ids"].dtype == torch.long


def test_collate_lm_masks_padding_by_position() -> None:
    # pad_id equal to a real token (EOS reused as pad): only the padded positions are masked
    batch = collate(SEQS, pad_id=102, lm=True)
    assert torch.equal(batch["input_ids"], torch.tensor([[101, 5, 6, 102], [101, 102, 102, 102]]))
    assert torch.equal(batch["labels"], torch.tensor([[101, 5, 6, 102], [101, 102, -100, -100]]))


def test_collate_without_labels_and_errors() -> None:
    assert set(collate(SEQS, pad_id=0)) == {"input_ids", "attention_mask"}
    with pytest.raises(ValueError, match="2 labels for 1 sequences"):
        collate(SEQS[:1], pad_id=0, labels=[1, 2])
    with pytest.raises(ValueError, match="not both"):
        collate(SEQS, pad_id=0, labels=[1, 2], lm=True)
