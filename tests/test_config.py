"""Config loading: defaults, overrides, round trip, and bad keys/values named in the error."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedfit.config import load_config, to_toml
from fedfit.errors import ConfigError

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.toml"))


def test_defaults_and_overrides() -> None:
    cfg = load_config(None, ["train.lr=1e-3", "method.r=4", "data.partition=iid"])
    assert cfg.train.lr == 1e-3 and cfg.method.options.r == 4 and cfg.data.partition == "iid"


def test_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, ["method.target_modules=['query', 'key']", "run.rounds=3"])
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_parses(path: Path) -> None:
    load_config(path)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.lrr=0.1", "train.lrr"),  # misspelled key
        ("train.lr=-1", "train.lr"),  # out of range
        ("train.lr=fast", "train.lr"),  # wrong type
        ("train.optimizer=adam", "train.optimizer"),
        ("data.partition=zipf", "data.partition"),
        ("data.clients_per_round=1000", "data.clients_per_round"),
        ("server.optimizer=sgd", "server.optimizer"),
        ("method.name=nope", "method.name"),
        ("method.r=0", "method.r"),
        ("method.rank=4", "method.rank"),  # not a LoRA option
        ("nosection.x=1", "nosection"),
        ("run.rounds=2.5", "run.rounds"),
    ],
)
def test_bad_values_name_their_key(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_suggests_close_key() -> None:
    with pytest.raises(ConfigError, match="did you mean 'local_steps'"):
        load_config(None, ["train.local_step=3"])


def test_bad_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nlr = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
