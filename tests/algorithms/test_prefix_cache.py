"""Frozen-prefix cache: same results and same reported device costs as the uncached run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedfit.config import load_config
from fedfit.engine.experiment import run
from tests.engine.test_local import TINY


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
def test_cached_run_equals_uncached(tmp_path: Path, model: str) -> None:
    def go(cache: bool) -> Path:
        cfg = load_config(
            None,
            [
                *TINY,
                f"run.output_dir={tmp_path}",
                f"run.name=cache-{cache}",
                f"model.name={model}",
                "method.name=layers",
                "method.max_depth=1",
                f"method.prefix_cache={str(cache).lower()}",
            ],
        )
        return run(cfg, plots=False)

    cached, plain = go(True), go(False)
    for a, b in zip(rows(cached / "rounds.jsonl"), rows(plain / "rounds.jsonl"), strict=True):
        assert a["eval"]["loss"] == pytest.approx(b["eval"]["loss"], abs=1e-5)
        assert a["eval"]["accuracy"] == pytest.approx(b["eval"]["accuracy"], abs=1e-9)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
    for a, b in zip(rows(cached / "clients.jsonl"), rows(plain / "clients.jsonl"), strict=True):
        # the device runs the prefix either way: its FLOPs are counted exactly...
        assert a["flops"] == b["flops"]
        assert a["memory"]["weights_bytes"] == b["memory"]["weights_bytes"]
        # ...and its memory within the tolerance of the cost model
        assert a["peak_memory_bytes"] == pytest.approx(b["peak_memory_bytes"], rel=0.1)
