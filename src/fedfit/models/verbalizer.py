"""Prompt-based classification on a causal LM: the label words' next-token logits are the
class logits (the "verbalizer" of LM-BFF, Gao et al. 2021, used by MeZO, Malladi et al. 2023,
and DeComFL, Li et al. 2024, to give zeroth-order fine-tuning a task-aligned start).

With ``data.prompt = "Tweet: {text}\\nSentiment:"`` and ``data.label_words = [" negative",
" neutral", " positive"]`` an example is tokenised as the filled-in template
(data/tokens.py keeps the template's end when it truncates) and, with ``h`` the final-norm
hidden state of the last real token and ``E`` the LM's output embedding (V x H),

    logits_c = h . E[w_c]        (w_c: the single token of label word c)

which is exactly the LM's next-token logit of ``w_c`` at that position (its softmax over the
K words is the LM's distribution renormalised to them). Only the K x H rows are applied, to
the one position: B x H x K multiply-adds instead of the LM head's B x T x H x V.

The K rows are held as the classifier head ``score`` (K x H, no bias) of a
``LlamaForSequenceClassification``: a COPY of ``E[w_c]``, untied from the input embeddings.
That is the one choice the papers leave open here (MeZO trains the full tied matrix), made
so that every fedfit method sees a classification model with a small head:

- ``head`` trains the K label-word rows only (a linear probe started at the zero-shot
  classifier, not the 49152 x 576 tied embedding);
- ``lora``, ``ia3``, ``bitfit`` and the forward / zero-order methods' peft options train
  their adapters plus that K x H head, as peft's sequence-classification task does for any
  head (``modules_to_save``); ``full`` trains everything, the head copy included;
- the cost model, planner, layer and partial training see a Llama classifier's ``score``.

Once trained, the head no longer equals the input embedding's rows; at the start (round 0)
it does, bit for bit. A label word must be ONE token of the model's tokenizer (a word of
several tokens would need a product of conditionals over positions); it is an error naming
the word and its pieces, as is the wrong number of words or a model that is not a causal LM.

Measured zero-shot held-out accuracy on tweets (CPU, float32; the engine's seed-0 subset of
held-out examples: ``data.eval_examples = 1000`` for smollm2-135m, all 3720 / 2277 for
smollm2-19m; binary is ``data.labels = ["negative", "positive"]`` with the first and last
word; the share each class is predicted in brackets):

    prompt "Tweet: {text}\\nSentiment:"        3-class (maj. 0.41-0.43)   binary (maj. 0.70-0.71)
    smollm2-135m " negative/ neutral/ positive"  0.339 (pos 72%, neu 0%)   0.560 (pos 63%)
    smollm2-135m " bad/ normal/ good"            0.291 (good 81%)          0.462
    smollm2-19m  " negative/ mixed/ positive"    0.397 (mixed 59%)         0.624
    smollm2-19m  " bad/ normal/ good"            0.291                     0.418
    SmolLM2's chat template, "<|im_start|>user\\nIs this tweet negative, neutral or
    positive?\\n{text}<|im_end|>\\n<|im_start|>assistant\\n", 500 held-out examples:
    smollm2-135m "negative/neutral/positive"     0.350 (neg 61%, neu 0%)   0.642 (maj. 0.668)
    prompt "Tweet: {text} Sentiment:" (one line), 300 held-out examples:
    smollm2-135m " negative/ neutral/ positive"  0.433 (maj. 0.407)        0.737 (maj. 0.667)
Only the one-line prompt beats the majority class (by 3 and 7 points, on 300 examples: +-3);
with the others the next-token prior favours one word (" positive" for smollm2-135m) whatever
the tweet, and no model ever predicts the middle class. The start is task-aligned (the right
output space, a loss near the LM's own) more than accurate; calibrating the words' prior
(Zhao et al. 2021) is not implemented. smollm2-19m splits " neutral" into two tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import LlamaForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutputWithPast


class PromptClassifier(LlamaForSequenceClassification):
    """A Llama whose class logits are its next-token logits for the label words at the
    prompt's last real token (module docstring). ``score`` holds the K label-word rows of the
    LM head; ``config.label_words`` / ``config.label_token_ids`` record which."""

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutputWithPast:
        """``input_ids`` / ``attention_mask`` [B, T] (either padding side), ``labels`` [B]:
        ``.logits`` [B, K], ``.loss`` the mean cross-entropy over the K classes."""
        # peft passes output_attentions / return_dict etc. as None; anything set is an error
        # of the caller that must not pass silently.
        extra = {k: v for k, v in kwargs.items() if v is not None}
        extra.pop("return_dict", None)
        if extra:
            raise TypeError(f"PromptClassifier.forward got unsupported {sorted(extra)}")
        hidden = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
        ).last_hidden_state  # [B, T, H], after the final norm
        batch, width = hidden.shape[:2]
        if attention_mask is None:
            last = torch.full((batch,), width - 1, dtype=torch.long, device=hidden.device)
        else:
            # The rightmost real position (by the mask, not by pad id: Llama's pad is eos, a
            # token a text may hold).
            positions = torch.arange(width, device=hidden.device)
            last = (positions * attention_mask.to(positions.dtype)).argmax(-1)
        logits = self.score(hidden[torch.arange(batch, device=hidden.device), last])  # [B, K]
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits, labels.to(logits.device))
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits)


def label_token_ids(tokenizer: Any, label_words: Sequence[str], model_name: str) -> list[int]:
    """The single token id of each label word (as it follows the prompt: no special tokens).

    ``ValueError`` naming the word and its pieces if one is several tokens (or none), or if
    two words share a token.
    """
    ids: list[int] = []
    for word in label_words:
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            shown = tokenizer.convert_ids_to_tokens(pieces)
            raise ValueError(
                f"data.label_words: {word!r} is {len(pieces)} tokens for {model_name}'s "
                f"tokenizer ({shown}, ids {pieces}); each label word must be one token "
                "(mind the leading space: ' positive' and 'positive' differ)"
            )
        ids.append(int(pieces[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"data.label_words: {list(label_words)} share a token: ids {ids}")
    return ids


def check_prompt_task(
    model_name: str,
    family: str,
    task: str,
    label_words: Sequence[str],
    num_labels: int,
    class_names: Sequence[str] = (),
) -> None:
    """Errors, before any weights load, for a prompt run that cannot work."""
    if family != "llama":
        raise ValueError(
            f"data.prompt classifies with a causal LM's next-token logits; {model_name!r} is "
            f"a {family} encoder: choose a llama-family model (smollm2-135m, smollm2-19m, "
            "tiny-llama, a local Llama folder) or unset data.prompt and data.label_words "
            "to train a classification head"
        )
    if task != "classification":
        raise ValueError(f"data.prompt needs a classification dataset, not the {task!r} task")
    count = len(class_names) if class_names else num_labels
    if len(label_words) != count:
        classes = f" ({', '.join(class_names)})" if class_names else ""
        raise ValueError(
            f"data.label_words has {len(label_words)} words {list(label_words)} for the "
            f"{count} classes{classes} of the dataset; give one word per class, in that order"
        )


def from_causal_lm(
    lm: Any, tokenizer: Any, label_words: Sequence[str], model_name: str
) -> PromptClassifier:
    """A :class:`PromptClassifier` sharing ``lm``'s backbone (no copy) with ``score`` set to
    the LM head's rows of the label words' tokens. ``lm`` must not be used afterwards."""
    ids = label_token_ids(tokenizer, label_words, model_name)
    rows = lm.get_output_embeddings()
    if getattr(rows, "bias", None) is not None:
        raise ValueError(f"{model_name}: an LM head with a bias is not supported")
    config = lm.config
    config.num_labels = len(ids)
    config.label_words = list(label_words)
    config.label_token_ids = ids
    # Built on the meta device (no weights drawn), then given the loaded backbone and a real
    # head: the pretrained blocks never go through a fresh initialisation.
    with torch.device("meta"):
        model = PromptClassifier(config)
    model.model = lm.model
    model.score = torch.nn.Linear(config.hidden_size, len(ids), bias=False)
    with torch.no_grad():
        model.score.weight.copy_(rows.weight[ids])
    return model
