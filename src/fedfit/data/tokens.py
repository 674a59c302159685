"""Tokenise once, cache on disk, pad per batch.

Tokenising 37k tweets takes seconds; a federated run touches them every round, so the ids
are computed once per (tokenizer, max_length, texts) and kept in
``cache_dir()/tokens/<key>.npz`` as one flat int32 array plus offsets. Sequences are stored
unpadded; :func:`collate` pads each batch only to its own longest sequence, so short
tweets do not pay for ``max_length`` in every forward pass.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedfit.paths import cache_dir

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # what torch's cross-entropy skips: padding in LM labels
_BATCH = 4096  # texts per call of the fast tokenizer: large enough for its Rust threads


def texts_digest(texts: Sequence[str]) -> str:
    """SHA-256 over the texts and their boundaries (``["ab"]`` and ``["a", "b"]`` differ)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def cache_key(texts: Sequence[str], tokenizer: Any, max_length: int) -> str:
    """Hash of what the ids depend on: tokenizer (name or path, vocabulary size, class),
    ``max_length`` and the texts."""
    ident = "\n".join(
        [
            str(getattr(tokenizer, "name_or_path", "")),
            str(len(tokenizer)),
            type(tokenizer).__qualname__,
            str(max_length),
            texts_digest(texts),
        ]
    )
    return hashlib.sha256(ident.encode("utf-8")).hexdigest()[:32]


def cache_path(texts: Sequence[str], tokenizer: Any, max_length: int) -> Path:
    """Where :func:`tokenize` keeps the ids of these texts."""
    return cache_dir() / "tokens" / f"{cache_key(texts, tokenizer, max_length)}.npz"


def _encode(texts: Sequence[str], tokenizer: Any, max_length: int) -> list[list[int]]:
    ids: list[list[int]] = []
    for start in range(0, len(texts), _BATCH):
        batch = list(texts[start : start + _BATCH])
        # Single sequences, special tokens as the tokenizer adds them ([CLS] .. [SEP] for
        # BERT, nothing or BOS for Llama), truncated from the right, no padding.
        enc = tokenizer(batch, truncation=True, max_length=max_length, add_special_tokens=True)
        ids.extend(enc["input_ids"])
    return ids


def _save(path: Path, seqs: list[list[int]]) -> None:
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename: a crash or a concurrent writer never leaves a
    # half-written cache file that a later run would trust.
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, ids=flat, offsets=offsets)
    os.replace(tmp, path)


def _load(path: Path) -> list[np.ndarray]:
    with np.load(path) as data:
        flat, offsets = data["ids"], data["offsets"]
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def tokenize(texts: Sequence[str], tokenizer: Any, max_length: int) -> list[np.ndarray]:
    """Unpadded int32 token ids of each text, truncated to ``max_length``, cached on disk.

    The first call runs the (fast, batched) tokenizer and writes
    ``cache_dir()/tokens/<key>.npz`` (key: :func:`cache_key`); later calls with the same
    tokenizer, ``max_length`` and texts only read that file.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    path = cache_path(texts, tokenizer, max_length)
    if path.exists():
        return _load(path)
    seqs = _encode(texts, tokenizer, max_length)
    _save(path, seqs)
    return [np.asarray(s, dtype=np.int32) for s in seqs]


def collate(
    seqs: Sequence[np.ndarray],
    pad_id: int,
    labels: Sequence[int] | None = None,
    lm: bool = False,
) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest sequence (right padding).

    Returns ``input_ids`` (long, [B, L]), ``attention_mask`` (long, 1 on real tokens) and,
    when asked, ``labels``: the class ids for classification, or for causal LM a copy of
    ``input_ids`` with padding set to -100 (the model shifts labels itself).
    """
    import torch  # here, not at module level: listing or loading data should not pay for it

    if not seqs:
        raise ValueError("collate needs at least one sequence")
    if lm and labels is not None:
        raise ValueError("pass class labels or lm=True, not both")
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, : len(seq)] = torch.as_tensor(np.asarray(seq, dtype=np.int64))
        attention_mask[row, : len(seq)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if lm:
        # Mask by position, not by value: pad_id may be a real token (e.g. EOS reused as pad).
        batch["labels"] = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    elif labels is not None:
        if len(labels) != len(seqs):
            raise ValueError(f"{len(labels)} labels for {len(seqs)} sequences")
        batch["labels"] = torch.as_tensor(list(labels), dtype=torch.long)
    return batch
