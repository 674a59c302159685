"""The LSTM language model of the zoo (models/lstm.py): shapes, parameter count, loss, training."""

from __future__ import annotations

import math

import torch

from fedfit.models import get_model_info
from fedfit.models.configs import LSTM_19M, lstm_num_params
from fedfit.models.lstm import LstmConfig, LstmForCausalLM
from fedfit.models.structure import embeddings, transformer_layers

TINY = {**LSTM_19M, "vocab_size": 64, "hidden_size": 16, "lstm_units": 24}


def tiny(seed: int = 0) -> LstmForCausalLM:
    torch.manual_seed(seed)
    return LstmForCausalLM(LstmConfig(**TINY))


def test_parameter_count_matches_the_closed_form_and_the_zoo() -> None:
    model = LstmForCausalLM(LstmConfig(**LSTM_19M))
    counted = sum(p.numel() for p in model.parameters())
    assert counted == lstm_num_params(LSTM_19M) == get_model_info("lstm-19m").num_params
    assert 18_000_000 < counted < 19_500_000  # the size of smollm2-19m (18.9M)
    # by hand: 8192 x 576 embedding; per layer W_ih, W_hh (4 x 1344 rows of 576), biases, proj
    layer = 2 * 4 * 1344 * 576 + 2 * 4 * 1344 + 576 * 1344
    assert counted == 8192 * 576 + 2 * layer


def test_shapes_tied_output_and_structure() -> None:
    model = tiny()
    ids = torch.randint(0, 64, (3, 7))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert out.logits.shape == (3, 7, 64) and out.loss is None
    hidden = model.model(ids)
    torch.testing.assert_close(out.logits, hidden @ model.model.embed_tokens.weight.T)
    assert len(transformer_layers(model)) == 2 and embeddings(model) is model.model.embed_tokens


def test_loss_is_the_mean_next_token_cross_entropy_ignoring_padding() -> None:
    model = tiny()
    ids = torch.randint(0, 64, (2, 6))
    labels = ids.clone()
    labels[1, 4:] = -100  # right padding
    out = model(input_ids=ids, labels=labels)
    logp = torch.log_softmax(out.logits, -1)
    terms = [
        -float(logp[b, t, labels[b, t + 1]])
        for b in range(2)
        for t in range(5)
        if labels[b, t + 1] != -100
    ]
    assert math.isclose(float(out.loss), sum(terms) / len(terms), rel_tol=1e-5)
    # a fresh model predicts about uniformly: ln(vocab)
    assert abs(float(out.loss) - math.log(64)) < 0.1


def test_one_training_step_lowers_the_loss_on_a_fixed_batch() -> None:
    model = tiny()
    ids = torch.arange(40).reshape(4, 10) % 7  # a repeating pattern: learnable
    before = float(model(input_ids=ids, labels=ids).loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # fedfit's client default
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    optimizer.step()
    after = float(model(input_ids=ids, labels=ids).loss)
    assert after < before - 0.01


def test_same_seed_same_weights() -> None:
    a, b, c = tiny(0), tiny(0), tiny(1)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert not all(torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters(), strict=True))
