"""Tokenise once, cache on disk, pad per batch.

Tokenising 37k tweets takes seconds; a federated run touches them every round, so the ids
are computed once per (tokenizer, max_length, texts) and kept in
``cache_dir()/tokens/<key>.npz`` as one flat int32 array plus offsets. Sequences are stored
unpadded; :func:`collate` pads each batch only to its own longest sequence, so short
tweets do not pay for ``max_length`` in every forward pass.

With a prompt (``data.prompt``, e.g. ``"Tweet: {text}\nSentiment:"``) each text is put into the
template and the whole string is tokenised at once (the text's first word keeps its natural
token, e.g. " great" after "Tweet:"). Only the tokenizer's LEADING special tokens are kept
(a BOS): the label word is predicted after the template's last token, so nothing may follow
it. A filled template longer than ``max_length`` loses the end of its TEXT: it becomes
``specials + tokens(head + text)[:room] + tokens(tail)``, the template's tail tokenised alone,
so the last position is always the template's end.

Before the tokenizer sees it, each text is cut to its first ``CHARS_PER_TOKEN * max_length``
characters (:func:`cut_texts`; 32 x 64 = 2,048 for the default length): truncation keeps only
the first ``max_length`` tokens anyway, and a 10 MB row must not be tokenised whole to find
them. A token spans at least one character (WordPiece and byte-level BPE alike), so the cut
changes a text's ids only when its first ``max_length`` tokens take more than 32 characters
each on average (runs of whitespace or characters the tokenizer drops). The cache key is
taken over the cut texts: a text within the bound has the key it always had.
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
CHARS_PER_TOKEN = 32  # a text is cut to this many characters per token of max_length


def cut_texts(texts: Sequence[str], max_length: int) -> list[str]:
    """Each text cut to its first ``CHARS_PER_TOKEN * max_length`` characters (module
    docstring): what truncation to ``max_length`` tokens can reach, without tokenising all
    of a long text."""
    limit = CHARS_PER_TOKEN * max_length
    return [text if len(text) <= limit else text[:limit] for text in texts]


def texts_digest(texts: Sequence[str]) -> str:
    """SHA-256 over the texts and their boundaries (``["ab"]`` and ``["a", "b"]`` differ)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def cache_key(texts: Sequence[str], tokenizer: Any, max_length: int, prompt: str = "") -> str:
    """Hash of what the ids depend on: tokenizer (name or path, vocabulary size, class),
    ``max_length``, the prompt template (if any) and the texts as cut by :func:`cut_texts`."""
    parts = [
        str(getattr(tokenizer, "name_or_path", "")),
        str(len(tokenizer)),
        type(tokenizer).__qualname__,
        str(max_length),
        texts_digest(cut_texts(texts, max_length)),
    ]
    if prompt:  # appended only when set: unprompted keys stay those of earlier caches
        parts.append("prompt:" + texts_digest([prompt]))
    ident = "\n".join(parts)
    return hashlib.sha256(ident.encode("utf-8")).hexdigest()[:32]


def cache_path(texts: Sequence[str], tokenizer: Any, max_length: int, prompt: str = "") -> Path:
    """Where :func:`tokenize` keeps the ids of these texts."""
    return cache_dir() / "tokens" / f"{cache_key(texts, tokenizer, max_length, prompt)}.npz"


def _encode(texts: Sequence[str], tokenizer: Any, max_length: int) -> list[list[int]]:
    ids: list[list[int]] = []
    for start in range(0, len(texts), _BATCH):
        batch = list(texts[start : start + _BATCH])
        # Single sequences, special tokens as the tokenizer adds them ([CLS] .. [SEP] for
        # BERT, nothing or BOS for Llama), truncated from the right, no padding.
        enc = tokenizer(batch, truncation=True, max_length=max_length, add_special_tokens=True)
        ids.extend(enc["input_ids"])
    return ids


def split_prompt(prompt: str) -> tuple[str, str]:
    """The template's text before and after its one ``{text}`` placeholder."""
    if prompt.count("{text}") != 1:
        raise ValueError(
            f"data.prompt: {prompt!r} must hold {{text}} exactly once "
            f"(it holds it {prompt.count('{text}')} times)"
        )
    head, tail = prompt.split("{text}")
    return head, tail


def leading_special_ids(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts BEFORE a text (BOS, [CLS]; often none)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


def _encode_prompted(
    texts: Sequence[str], tokenizer: Any, max_length: int, prompt: str
) -> list[list[int]]:
    head, tail = split_prompt(prompt)
    lead = leading_special_ids(tokenizer)
    tail_ids = list(tokenizer(tail, add_special_tokens=False)["input_ids"]) if tail else []
    room = max_length - len(lead) - len(tail_ids)  # tokens left for head + text
    head_len = len(tokenizer(head, add_special_tokens=False)["input_ids"]) if head else 0
    if room <= head_len:
        raise ValueError(
            f"model.max_length = {max_length} leaves no room for the text: the prompt "
            f"{prompt!r} alone takes {len(lead) + head_len + len(tail_ids)} tokens"
        )
    ids: list[list[int]] = []
    for start in range(0, len(texts), _BATCH):
        batch = list(texts[start : start + _BATCH])
        # One token past the limit tells a filled template that fits from one that does not,
        # without tokenising all of a long text.
        filled = tokenizer(
            [head + text + tail for text in batch],
            add_special_tokens=False,
            truncation=True,
            max_length=max_length - len(lead) + 1,
        )["input_ids"]
        long = [i for i, seq in enumerate(filled) if len(lead) + len(seq) > max_length]
        cut = (
            tokenizer(
                [head + batch[i] for i in long],
                add_special_tokens=False,
                truncation=True,
                max_length=room,
            )["input_ids"]
            if long
            else []
        )
        for i, seq in zip(long, cut, strict=True):
            filled[i] = list(seq) + tail_ids
        ids.extend(lead + list(seq) for seq in filled)
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


def tokenize(
    texts: Sequence[str], tokenizer: Any, max_length: int, prompt: str = ""
) -> list[np.ndarray]:
    """Unpadded int32 token ids of each text, truncated to ``max_length``, cached on disk.

    Each text is first cut to ``CHARS_PER_TOKEN * max_length`` characters (:func:`cut_texts`),
    so a huge row costs no more than a short one. With ``prompt`` (a template holding
    ``{text}`` once) each (cut) text is then put into the template, and truncation cuts the
    text, never the template's end (module docstring). The first call runs the (fast,
    batched) tokenizer and writes ``cache_dir()/tokens/<key>.npz`` (key: :func:`cache_key`);
    later calls with the same tokenizer, ``max_length``, prompt and texts only read that file.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if prompt:
        split_prompt(prompt)  # a bad template fails even when a cache exists
    texts = cut_texts(texts, max_length)
    path = cache_path(texts, tokenizer, max_length, prompt)
    if path.exists():
        return _load(path)
    if prompt:
        seqs = _encode_prompted(texts, tokenizer, max_length, prompt)
    else:
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
