"""``--set`` values are typed by the key they set, and switching method on the command line
drops the file's options of the old method."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedfit.config import load_config
from fedfit.errors import ConfigError

DEFAULT = Path(__file__).resolve().parents[1] / "examples" / "default.toml"


def test_a_string_key_takes_the_text_as_typed() -> None:
    config = load_config(None, ["run.name=inf", "data.eval_examples=100", "train.lr=1e-3"])
    assert load_config(None, ['run.name="quoted"']).run.name == "quoted"
    assert config.run.name == "inf" and config.data.eval_examples == 100
    assert config.train.lr == 1e-3
    with pytest.raises(ConfigError, match="train.lr: expected a number, got 'abc'"):
        load_config(None, ["train.lr=abc"])


def test_switching_method_drops_the_old_methods_options(capsys: pytest.CaptureFixture[str]) -> None:
    lora = load_config(DEFAULT)
    assert lora.method.name == "lora" and lora.method.options.r == 8
    config = load_config(DEFAULT, ["method.name=fedavg", "train.lr=5e-5", "run.name=fedavg"])
    assert config.method.name == "fedavg" and config.train.lr == 5e-5
    assert "[method] options (alpha, r) were lora's; dropped" in capsys.readouterr().err
    # the same method keeps the file's options; options given on the command line stay
    same = load_config(DEFAULT, ["method.name=lora", "method.alpha=4.0"])
    assert (same.method.options.r, same.method.options.alpha) == (8, 4.0)
    spry = load_config(DEFAULT, ["method.r=1", "method.name=spry"])
    assert spry.method.name == "spry" and spry.method.options.r == 1
