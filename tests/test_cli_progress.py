"""A piped run shows its progress as it goes: one line per round, not a bar drawn at the end."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedfit.cli import main
from tests.helpers import TINY_RUN


def test_piped_progress_is_one_line_per_round(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sets = [f"--set={s}" for s in (*TINY_RUN, "run.rounds=3", "run.eval_every=2")]
    assert main(["run", *sets, f"--set=run.output_dir={tmp_path}"]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if re.search(r"round \d+/3", x)]
    assert [re.search(r"round (\d+)/3", x).group(1) for x in lines] == ["0", "1", "2", "3"]  # type: ignore[union-attr]
    assert "acc " in lines[0] and "acc " not in lines[1] and "acc " in lines[2]
    assert "ETA" in lines[2]
