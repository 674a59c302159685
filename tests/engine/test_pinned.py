"""Rows pinned before the engine's redesign (issue 15): the same tiny configs must write the
same rounds.jsonl, so a change of the engine's shape cannot change what a run computes.

The files under tests/engine/pinned/ were written by the engine as it stood at commit b15e009
(``engine/local.py``'s loop) for the configs below. Integers, strings and lists must match
exactly; floats to 1e-6 (relative), the width of BLAS differences between machines.
One correction since: spry's client FLOPs (issue 17), which the meter had reported for every
client as the first client's share (its cache key missed which tensors a forward-gradient
step trains); tests/engine/test_meter.py checks the new figures against FlopCounterMode.

An accuracy is compared only where the model's logits do not tie: lora-ncm's round 0 (the
class-mean head of a random tiny BERT, whose class means are nearly parallel) has loss ln 3 to
seven digits, so its argmax is decided by float32 rounding, which differs between CPUs (an
AMD EPYC gave 59/150 where the pinning machine gave 56/150). Its loss is still compared.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from fedfit.engine.experiment import run
from tests.helpers import read_rows, tiny_run_config

PINNED = Path(__file__).parent / "pinned"
CASES = {
    "fedavg": ["method.name=fedavg"],
    "lora-ncm": ["method.name=lora", "model.head_init=ncm", "model.head_init_clients=4"],
    "spry": ["method.name=spry"],
    "fedmezo": ["method.name=fedmezo"],
    "fedkseed": ["method.name=fedkseed"],
    # pinned when the per-holder mean was partial's only rule (issue 19 made all_clients the
    # default): the engine must still compute those rows with it
    "partial-q4": ["method.name=partial", "compress.upload_bits=4", "method.aggregation=holders"],
}


# The tiny run's task (tweet sentiment) has 3 classes: a loss this close to ln 3 means tied logits.
TIED_LOSS = math.log(3)


def logits_tie(row: dict[str, Any]) -> bool:
    return math.isclose(row["eval"]["loss"], TIED_LOSS, rel_tol=0.0, abs_tol=1e-5)


def assert_same(got: Any, want: Any, where: str) -> None:
    if isinstance(want, float) and isinstance(got, float):
        assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9), f"{where}: {got} != {want}"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), f"{where}: keys differ"
        for key in want:
            assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: lengths differ"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_rounds_as_pinned(tmp_path: Path, case: str) -> None:
    config = tiny_run_config(tmp_path, "run.rounds=2", f"run.name={case}", *CASES[case])
    run_dir = run(config, plots=False)
    got = read_rows(run_dir / "rounds.jsonl")
    want = read_rows(PINNED / f"{case}.rounds.jsonl")
    assert len(got) == len(want) == 3  # round 0 and two rounds
    for g, w in zip(got, want, strict=True):
        if logits_tie(w):
            assert logits_tie(g), f"{case} round {w['round']}: logits no longer tie"
            g["eval"].pop("accuracy"), w["eval"].pop("accuracy")
        assert_same(g, w, f"{case} round {w['round']}")
