"""Prompt-based classification (models/verbalizer.py, data/tokens.py with a prompt): the class
logits are the causal LM's own next-token logits, truncation keeps the template's end, bad
prompts and label words are named errors, and fedfit's methods train the prompt model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model

from fedfit.algorithms.forward.core import loss_and_jvp
from fedfit.data.tokens import cache_key, collate, tokenize
from fedfit.engine.experiment import run
from fedfit.models import load_model
from fedfit.models.verbalizer import PromptClassifier
from tests.helpers import read_rows, tiny_run_config

PROMPT = "Tweet: {text}\nSentiment:"
WORDS = (" negative", " neutral", " positive")
TEXTS = ["I love this airline", "worst delay ever, never again", "ok", "the flight left"]


def _lm_class_logits(name: str, words: tuple[str, ...], batch: dict[str, torch.Tensor]):
    """Reference: a plain LlamaForCausalLM forward, full B x T x V logits, read at each row's
    last real position and the label words' token ids."""
    lm, tokenizer = load_model(name, "lm", seed=3)
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words]
    with torch.no_grad():
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    last = batch["attention_mask"].sum(1) - 1  # right padding
    return logits[torch.arange(len(last)), last][:, ids]


def _prompt_batch(tokenizer, max_length: int = 64, texts: list[str] = TEXTS):
    seqs = tokenize(texts, tokenizer, max_length, prompt=PROMPT)
    return collate(seqs, int(tokenizer.pad_token_id), labels=[0, 1, 2, 0][: len(seqs)])


def test_class_logits_are_the_lm_next_token_logits() -> None:
    model, tokenizer = load_model("tiny-llama", "classification", 3, seed=3, label_words=WORDS)
    assert isinstance(model, PromptClassifier) and model.score.weight.shape == (3, 32)
    batch = _prompt_batch(tokenizer)
    assert batch["attention_mask"].sum(1).unique().numel() > 1  # padded rows are exercised
    with torch.no_grad():
        out = model(**batch)
    expected = _lm_class_logits("tiny-llama", WORDS, batch)
    assert out.logits.shape == (4, 3)
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-6)
    loss = torch.nn.functional.cross_entropy(expected, batch["labels"])
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    # The head is the LM head's (tied: input embedding's) rows, copied, not shared.
    emb = model.get_input_embeddings().weight
    assert torch.equal(model.score.weight, emb[model.config.label_token_ids])
    assert model.score.weight.data_ptr() != emb.data_ptr()
    assert not any(p.is_meta for p in model.parameters())


def test_peft_wrap_starts_at_the_zero_shot_logits_and_trains() -> None:
    """LoRA (B = 0) leaves the class logits as they were; gradients reach the adapters and
    the label-word head (peft's modules_to_save copy of ``score``)."""
    model, tokenizer = load_model("tiny-llama", "classification", 3, seed=3, label_words=WORDS)
    batch = _prompt_batch(tokenizer)
    with torch.no_grad():
        before = model(**batch).logits
    peft_model = get_peft_model(
        model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["q_proj", "v_proj"])
    )
    out = peft_model(**batch)
    torch.testing.assert_close(out.logits, before)
    out.loss.backward()
    trained = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert any("lora_B" in n for n in trained)
    assert any("score.modules_to_save" in n for n in trained)


def test_jvp_equals_autograd_directional_derivative() -> None:
    """The forward-gradient methods' torch.func.jvp works through the prompt model."""
    model, tokenizer = load_model("tiny-llama", "classification", 3, seed=3, label_words=WORDS)
    batch = _prompt_batch(tokenizer)
    params = {n: p.detach() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    tangents = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
    loss, directional = loss_and_jvp(model, params, tangents, batch)
    model.zero_grad()
    model(**batch).loss.backward()
    reference = sum((p.grad * tangents[n]).sum() for n, p in model.named_parameters())
    torch.testing.assert_close(directional, reference, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, model(**batch).loss.detach())


def test_truncation_cuts_the_text_and_keeps_the_template_end() -> None:
    _, tokenizer = load_model("tiny-llama", "lm")
    long = " ".join(["delayed"] * 200)
    fits, cut = tokenize(["short one", long], tokenizer, 16, prompt=PROMPT)
    tail = tokenizer("\nSentiment:", add_special_tokens=False)["input_ids"]
    # A text that fits is the filled template tokenised as one string.
    full = tokenizer(PROMPT.replace("{text}", "short one"), add_special_tokens=False)
    assert fits.tolist() == full["input_ids"]
    # A long one keeps the template's head, loses the end of its text, ends with the tail.
    head = tokenizer("Tweet: delayed", add_special_tokens=False)["input_ids"]
    assert len(cut) == 16
    assert cut[: len(head)].tolist() == head and cut[-len(tail) :].tolist() == tail
    # Unprompted ids of the same texts differ, and so do their cache keys.
    plain = tokenize(["short one", long], tokenizer, 16)
    assert plain[0].tolist() != fits.tolist()
    assert cache_key(["a"], tokenizer, 16) != cache_key(["a"], tokenizer, 16, prompt=PROMPT)
    assert cache_key(["a"], tokenizer, 16, "x {text}") != cache_key(["a"], tokenizer, 16, PROMPT)


def test_prompt_template_errors() -> None:
    _, tokenizer = load_model("tiny-llama", "lm")
    with pytest.raises(ValueError, match="exactly once"):
        tokenize(["a"], tokenizer, 32, prompt="{text} and {text}")
    with pytest.raises(ValueError, match="model.max_length = 6 leaves no room"):
        tokenize(["a"], tokenizer, 6, prompt=PROMPT)


def test_label_word_of_several_tokens_is_named() -> None:
    with pytest.raises(ValueError, match=r"' unremarkably' is 4 tokens.*'Ġun'"):
        load_model("tiny-llama", "classification", 2, label_words=(" good", " unremarkably"))


def test_wrong_number_of_words_names_the_classes() -> None:
    with pytest.raises(ValueError, match=r"2 words.*3 classes \(negative, neutral, positive\)"):
        load_model(
            "tiny-llama",
            "classification",
            3,
            label_words=(" bad", " good"),
            class_names=("negative", "neutral", "positive"),
        )


def test_prompt_on_bert_and_on_lm_data_are_errors() -> None:
    with pytest.raises(ValueError, match="tiny-bert.*bert encoder.*llama-family"):
        load_model("tiny-bert", "classification", 3, label_words=WORDS)
    with pytest.raises(ValueError, match="classification dataset"):
        load_model("tiny-llama", "lm", 3, label_words=WORDS)


PROMPT_RUN = [
    "model.name=tiny-llama",
    f"data.prompt={json.dumps(PROMPT)}",
    'data.label_words=[" negative", " neutral", " positive"]',
    "run.rounds=1",
]


@pytest.mark.parametrize("method", ["lora", "fedmezo"])
def test_engine_runs_a_prompt_model(tmp_path: Path, method: str) -> None:
    out = run(tiny_run_config(tmp_path, *PROMPT_RUN, f"method.name={method}"), plots=False)
    rounds = [r for r in read_rows(out / "rounds.jsonl") if r["round"] >= 1]
    assert [r["round"] for r in rounds] == [1]
    for row in rounds:
        assert np.isfinite(row["train_loss"]) and 0 <= row["eval"]["accuracy"] <= 1
        assert row["upload_bytes"] > 0


@pytest.mark.real
def test_smollm2_19m_prompt_logits_and_its_tokenizer() -> None:
    """Real weights: the class logits are the LM's, and smollm2-19m's 8192-token vocabulary
    splits ' neutral' (so its 3-class prompts need another word)."""
    words = (" negative", " positive")
    model, tokenizer = load_model("smollm2-19m", "classification", 2, label_words=words)
    batch = _prompt_batch(tokenizer, texts=TEXTS[:2])
    with torch.no_grad():
        got = model(**batch).logits
    torch.testing.assert_close(
        got, _lm_class_logits("smollm2-19m", words, batch), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match=r"' neutral' is 2 tokens.*'Ġneut', 'ral'"):
        load_model("smollm2-19m", "classification", 3, label_words=WORDS)
