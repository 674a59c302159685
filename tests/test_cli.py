"""CLI surface: --help on every command, listings show every registered name."""

from __future__ import annotations

import pytest

from fedfit.algorithms import ALGORITHMS
from fedfit.cli import main, parser
from fedfit.models import list_models

COMMANDS = ["run", "central", "plan", "report", "compare", "methods", "models", "data"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: fedfit " + command in capsys.readouterr().out


def test_methods_and_models_list_every_name(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps cells in a narrow terminal
    assert main(["methods"]) == 0 and main(["models"]) == 0
    out = capsys.readouterr().out
    for name in [*ALGORITHMS, *(m.name for m in list_models())]:
        assert name in out


def test_missing_run_folder_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "runs/does-not-exist"]) == 2
    assert "does-not-exist" in capsys.readouterr().err


@pytest.mark.real
def test_plan_prints_a_table_per_tier(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["plan", "examples/heterogeneous.toml"]) == 0
    out = capsys.readouterr().out
    for tier in ("eighth", "quarter", "half", "full"):
        assert f"tier {tier}: 25 devices" in out
    assert "full model" in out and "LoRA r=8 + head" in out and "blocks + head" in out
    assert "excluded: memory" in out
    # method = "layers": the model choice over the zoo is shown with its reason
    assert "model choice for layer fine-tuning" in out and "picked minilm-l" in out
    assert "blocks per device on average" in out
