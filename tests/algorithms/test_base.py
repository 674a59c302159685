"""The Algorithm base: every method derives from it, declares what its upload holds (read on
the instance, where the options are known), and the shared "train only these tensors" helper."""

from __future__ import annotations

import pytest
import torch

from fedfit.algorithms import ALGORITHMS, make_algorithm
from fedfit.algorithms.base import Algorithm, train_subset
from fedfit.config import ConfigError, load_config
from fedfit.engine.setup import build, make_channel

KINDS = ("weights", "gradient", "subset", "slices", "scalars")


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_method_is_an_algorithm_with_a_payload_kind(name: str) -> None:
    algorithm = make_algorithm(load_config(None, [f"method.name={name}"]))
    assert isinstance(algorithm, Algorithm)
    assert algorithm.payload_kind in KINDS
    assert make_channel(load_config(None, [f"method.name={name}"])).payload_kind == (
        algorithm.payload_kind
    )


@pytest.mark.parametrize(("communication", "kind"), [("epoch", "subset"), ("iteration", "scalars")])
def test_spry_payload_kind_follows_its_options(communication: str, kind: str) -> None:
    config = load_config(None, ["method.name=spry", f"method.communication={communication}"])
    assert make_algorithm(config).payload_kind == kind
    assert make_channel(config).payload_kind == kind


def test_spry_per_iteration_refuses_quantised_uploads_before_training() -> None:
    # Regression: the channel read payload_kind from the class, where Spry's was a property,
    # so this config passed the check and failed on the first upload with another message.
    config = load_config(
        None,
        [
            "model.name=tiny-bert",
            "method.name=spry",
            "method.communication=iteration",
            "compress.upload_bits=8",
        ],
    )
    with pytest.raises(ConfigError, match=r"compress: spry sends .* bit-exact"):
        build(config)  # before the data or the model load


def test_spry_per_epoch_may_quantise() -> None:
    config = load_config(None, ["method.name=spry", "compress.upload_bits=8"])
    assert make_channel(config).payload_kind == "subset"


def toy() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))


def test_train_subset_trains_only_the_names_and_uploads_them() -> None:
    # Prepare: layer 0's bias frozen from the start; of the rest, train layer 1 only.
    model = toy()
    model[0].bias.requires_grad_(False)
    trainable = {"0.weight", "1.weight", "1.bias"}
    names = {"1.bias", "1.weight"}
    seen: dict[str, bool] = {}

    def train() -> dict[str, float]:
        seen.update({n: p.requires_grad for n, p in model.named_parameters()})
        with torch.no_grad():
            model[1].bias.add_(1.0)
        return {"train_loss": 0.5}

    # Execute
    payload, metrics = train_subset(model, names, trainable, train)

    # Assert: during training only the names required grad; afterwards all of trainable
    assert seen == {"0.weight": False, "0.bias": False, "1.weight": True, "1.bias": True}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    assert grads == {"0.weight": True, "0.bias": False, "1.weight": True, "1.bias": True}
    assert list(payload) == ["1.bias", "1.weight"]
    assert torch.equal(payload["1.bias"], model[1].bias.detach())
    assert payload["1.bias"].data_ptr() != model[1].bias.data_ptr()  # a copy
    assert metrics == {"train_loss": 0.5}


def test_train_subset_restores_on_error() -> None:
    model = toy()
    trainable = {n for n, _ in model.named_parameters()}

    def fail() -> dict[str, float]:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        train_subset(model, {"1.bias"}, trainable, fail)
    assert all(p.requires_grad for p in model.parameters())
