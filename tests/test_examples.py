"""Every shipped config in examples/: it parses, its header names the command that runs it,
and one round of it runs end to end on a tiny model (torchtune's config tests).

The glob picks up a new example file with no change here. The smoke run keeps the example's
method, data set, partition, devices and compression and shrinks only the sizes: the model
becomes the tiny random one of the same family (devices' fractional budgets such as "1/8x"
scale with it), a few clients with a few examples each, one local step, one round.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedfit.config import Config, load_config
from fedfit.engine.experiment import run
from fedfit.engine.runfolder import RunFolder
from tests.helpers import read_rows, tiny_sizes

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.toml"))


def header(path: Path) -> str:
    """The comment lines at the top of a config file, joined."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def test_examples_exist() -> None:
    assert len(EXAMPLES) >= 6, [p.name for p in EXAMPLES]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_parses_and_its_header_names_its_command(path: Path) -> None:
    config = load_config(path)
    text = header(path)
    assert text, f"{path.name} starts without a comment saying what it is"
    assert f"fedfit run examples/{path.name}" in text
    # runs/NAME is the file's own name, so two examples never write into one folder
    assert config.run.name == path.stem
    # every table in the file is one the config knows (load_config would have said otherwise)
    assert set(tomllib.loads(path.read_text())) <= {*Config.__dataclass_fields__}


def tiny_overrides(config: Config, tmp_path: Path) -> list[str]:
    """Overrides that shrink ``config`` to one round on a tiny model, keeping its setting."""
    clients = ["data.num_clients=8", "data.clients_per_round=2", "data.min_examples=10"]
    return [*tiny_sizes(config), *clients, f"run.output_dir={tmp_path}"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_one_round_on_a_tiny_model(path: Path, tmp_path: Path) -> None:
    config = load_config(path)
    tiny = load_config(path, tiny_overrides(config, tmp_path))

    out = run(tiny, plots=False)

    rows = read_rows(out / "rounds.jsonl")
    summary = RunFolder(out).summary()
    assert out == tmp_path / path.stem
    assert rows[-1]["round"] == 1 and rows[-1]["clients"]
    assert summary["method"] == config.method.name
    assert summary["rounds_completed"] == 1
    assert rows[-1]["upload_bytes"] > 0 and rows[-1]["client_flops"] > 0
    metric = "perplexity" if summary["task"] == "lm" else "accuracy"
    assert metric in rows[-1]["eval"]
    if config.devices.population == "tiers":
        # budgets planned before round 1: no device trained over its memory budget
        clients = read_rows(out / "clients.jsonl")
        assert clients and all(c["budget"]["memory_bytes"] for c in clients)
        for c in clients:
            assert c["peak_memory_bytes"] <= c["budget"]["memory_bytes"], c
    if config.compress.upload_bits < 32:
        # b-bit numbers: far fewer bytes up than the float32 tensors that come down
        assert rows[-1]["upload_bytes"] < rows[-1]["download_bytes"] / 2
    if config.model.head_init == "ncm":
        # round 0 is the measured class-mean pass: clients uploaded their class sums
        assert rows[0]["round"] == 0 and rows[0]["upload_bytes"] > 0
