"""An LSTM language model: the baseline that cross-device FL papers compare transformers with.

Ro et al. (2022, "Scaling Language Model Size in Cross-Device Federated Learning") set their
pretrained ~21M transformer against an LSTM of similar size trained from scratch. ``lstm-19m``
is that baseline on fedfit's own tokenizer: smollm2-19m's 8192-token BPE, a tied input/output
embedding of width ``hidden_size``, and ``num_hidden_layers`` LSTM layers of ``lstm_units``
cells, each projected back to ``hidden_size`` (PyTorch's ``proj_size``, the projected LSTM of
Sak et al. 2014). The next-token logits are the last layer's outputs times the embedding
matrix. No positions and no attention mask are needed: padding is on the right, and its
labels are -100.

It is a transformers ``PreTrainedModel`` so that the engine, checkpoints and the cost meter
handle it as any zoo model; it always starts from random weights drawn from the run seed
(there is no pretrained LSTM to ship). Its layout mirrors Llama's (``model.embed_tokens``,
``model.layers``), so methods that address blocks (partial training) find its layers.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from fedfit.data.tokens import IGNORE_INDEX


class LstmConfig(PretrainedConfig):  # type: ignore[misc]
    """Hyper-parameters of :class:`LstmForCausalLM` (see the module docstring)."""

    model_type = "fedfit_lstm"

    def __init__(
        self,
        vocab_size: int = 8192,
        hidden_size: int = 576,
        lstm_units: int = 1344,
        num_hidden_layers: int = 2,
        max_position_embeddings: int = 8192,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        **kwargs: Any,
    ) -> None:
        if not tie_word_embeddings:
            raise ValueError("lstm: only tied input/output embeddings are implemented")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.lstm_units = lstm_units
        self.num_hidden_layers = num_hidden_layers
        # Not a limit of the LSTM: the tokenizer truncates to it, as for the other zoo models.
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        self.tie_word_embeddings = tie_word_embeddings


class _Pretrained(PreTrainedModel):  # type: ignore[misc]
    config_class = LstmConfig
    base_model_prefix = "model"

    def _init_weights(self, module: torch.nn.Module) -> None:
        if isinstance(module, torch.nn.Embedding):
            module.weight.data.normal_(0.0, self.config.initializer_range)
        elif isinstance(module, torch.nn.LSTM):
            module.reset_parameters()  # PyTorch's U(-1/sqrt(units), 1/sqrt(units))


class LstmModel(_Pretrained):
    """Embedding and the LSTM layers; returns the last layer's outputs [batch, seq, hidden]."""

    def __init__(self, config: LstmConfig) -> None:
        super().__init__(config)
        self.embed_tokens = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = torch.nn.ModuleList(
            torch.nn.LSTM(
                config.hidden_size,
                config.lstm_units,
                proj_size=config.hidden_size,
                batch_first=True,
            )
            for _ in range(config.num_hidden_layers)
        )
        self.post_init()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        if not isinstance(value, torch.nn.Embedding):
            raise TypeError(f"lstm: the input embedding must be an nn.Embedding, not {value}")
        self.embed_tokens = value

    def forward(self, input_ids: torch.Tensor, **_: Any) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        with warnings.catch_warnings():
            # PyTorch notes once per process that oneDNN has no projected LSTM and that it
            # runs its default kernel: nothing for a user to act on.
            warnings.filterwarnings("ignore", "LSTM with projections is not supported")
            for layer in self.layers:
                hidden, _state = layer(hidden)
        return hidden


class LstmForCausalLM(_Pretrained):
    """Next-token prediction with the tied embedding as the output layer; the loss is the mean
    over predicted tokens (labels shifted by one inside, -100 ignored), as transformers'."""

    def __init__(self, config: LstmConfig) -> None:
        super().__init__(config)
        self.model = LstmModel(config)
        self.post_init()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> None:
        return None  # tied by construction: the logits use the input embedding's matrix

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: Any,
    ) -> CausalLMOutput:
        hidden = self.model(input_ids)
        logits = hidden @ self.model.embed_tokens.weight.T
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX,
            )
        return CausalLMOutput(loss=loss, logits=logits)
