"""Frozen-prefix cache: the uncached run's results bit for bit (final tensors, eval, client
FLOPs), also when its RAM cap evicts; float16 entries at half the bytes, within a stated
tolerance."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedfit.algorithms import layers
from fedfit.algorithms.prefix_cache import MIN_WIDTH, PrefixCache
from fedfit.config import ConfigError, load_config
from fedfit.data.tokens import collate
from fedfit.engine.experiment import run
from fedfit.engine.runfolder import RunFolder
from fedfit.models.structure import hidden_states_at
from fedfit.models.zoo import load_model
from tests.helpers import TINY_RUN

WORDS = "good bad movie love hate the a of to and is it was this not very great awful".split()


def short_texts(path: Path) -> Path:
    """240 texts, half of 1-6 words and half of 8-30: batches of 2 are padded to widths on
    both sides of MIN_WIDTH, the case where the padding changes a row's softmax floats."""
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(240):
            n = rng.choice([rng.randint(1, 6), rng.randint(8, 30)])
            text = " ".join(rng.choice(WORDS) for _ in range(n))
            f.write(json.dumps({"text": text, "label": "abc"[i % 3]}) + "\n")
    return path


# 4 clients of 16 examples, 2 a round for 4 rounds, 8 steps of 2: every visit after a
# client's first replays cached states.
REVISITS = [
    "data.partition=iid",
    "data.eval_examples=0",
    "data.num_clients=4",
    "data.clients_per_round=2",
    "data.max_examples=16",
    "run.rounds=4",
    "model.max_length=64",
    "train.batch_size=2",
    "train.local_steps=8",
    "method.name=layers",
    "method.max_depth=1",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return short_texts(tmp_path_factory.mktemp("data") / "short.jsonl")


@pytest.fixture
def caches(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[PrefixCache]]:
    """The caches the runs build, to read their counters."""
    made: list[PrefixCache] = []

    class Recorded(PrefixCache):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            made.append(self)

    monkeypatch.setattr(layers, "PrefixCache", Recorded)
    yield made


def go(out: Path, data: Path, model: str, name: str, *extra: str) -> RunFolder:
    config = load_config(
        None,
        [
            *TINY_RUN,
            *REVISITS,
            f"data.path={data}",
            f"model.name={model}",
            f"run.output_dir={out}",
            f"run.name={name}",
            *extra,
        ],
    )
    return RunFolder(run(config, plots=False))


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, data: Path) -> dict[str, RunFolder]:
    """The uncached runs, one per model."""
    out = tmp_path_factory.mktemp("plain")
    return {
        model: go(out, data, model, model, "method.prefix_cache=false")
        for model in ("tiny-bert", "tiny-llama")
    }


def tensors(folder: RunFolder) -> dict[str, torch.Tensor]:
    state, _ = folder.load_checkpoint()
    return state.params


def assert_same_run(a: RunFolder, b: RunFolder) -> None:
    """Bit for bit: final tensors, every round's eval and train loss, every client's FLOPs."""
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[name], tb[name]) for name in ta)
    for x, y in zip(a.rounds(), b.rounds(), strict=True):
        assert x["eval"] == y["eval"] and x.get("train_loss") == y.get("train_loss")
    for x, y in zip(a.clients(), b.clients(), strict=True):
        # the device runs the prefix either way: its FLOPs are counted exactly...
        assert x["flops"] == y["flops"]
        assert x["memory"]["weights_bytes"] == y["memory"]["weights_bytes"]
        # ...and its memory within the tolerance of the cost model
        assert x["peak_memory_bytes"] == pytest.approx(y["peak_memory_bytes"], rel=0.1)


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
def test_cached_run_equals_uncached(
    tmp_path: Path, data: Path, plain: dict[str, RunFolder], caches: list, model: str
) -> None:
    cached = go(tmp_path, data, model, "cached")
    (cache,) = caches
    assert cache.served > 0 and cache.computed > 0  # revisits were replayed
    assert_same_run(cached, plain[model])


def test_cap_evicts_and_still_equals_uncached(
    tmp_path: Path, data: Path, plain: dict[str, RunFolder], caches: list
) -> None:
    cap_mb = 0.05  # about two of the four clients' entries
    cached = go(tmp_path, data, "tiny-bert", "capped", f"method.prefix_cache_mb={cap_mb}")
    (cache,) = caches
    assert cache.evicted > 0 and cache.served > 0
    assert cache.held_bytes == cache.stored_bytes()  # the running count is the measured one
    assert cache.peak_bytes <= cap_mb * 2**20 and cache.stored_bytes() <= cap_mb * 2**20
    assert_same_run(cached, plain["tiny-bert"])


def test_float16_halves_the_bytes_within_tolerance(
    tmp_path: Path, data: Path, plain: dict[str, RunFolder], caches: list
) -> None:
    go(tmp_path, data, "tiny-bert", "fp32")
    half = go(tmp_path, data, "tiny-bert", "fp16", "method.prefix_cache_dtype=float16")
    fp32, fp16 = caches
    assert fp16.peak_bytes * 2 == fp32.peak_bytes  # the same entries, 2 bytes a float
    # Measured: eval loss within 1.0e-4 of the uncached run after 4 rounds; tolerance 1e-3.
    for x, y in zip(half.rounds(), plain["tiny-bert"].rounds(), strict=True):
        assert x["eval"]["loss"] == pytest.approx(y["eval"]["loss"], abs=1e-3)
    for x, y in zip(half.clients(), plain["tiny-bert"].clients(), strict=True):
        assert x["flops"] == y["flops"]


def test_states_do_not_depend_on_padding_from_min_width() -> None:
    """What exactness rests on: an example's states at block k are the same floats in a batch
    of any width >= MIN_WIDTH (torch's vectorised CPU softmax adds padded keys as zeros)."""
    model, _ = load_model("tiny-bert", "classification", num_labels=3)
    short = torch.arange(5, 5 + MIN_WIDTH // 2).numpy()

    def states(width: int) -> torch.Tensor:
        other = torch.arange(7, 7 + width).numpy()
        batch = collate([short, other], pad_id=0, labels=[0, 0])
        return hidden_states_at(model, batch, 1)[0, : len(short)]

    assert all(torch.equal(states(MIN_WIDTH), states(w)) for w in (MIN_WIDTH + 1, 40, 64))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("method.prefix_cache_mb=-1", "method.prefix_cache_mb"),
        ("method.prefix_cache_dtype=int8", "method.prefix_cache_dtype"),
    ],
)
def test_bad_cache_options_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(None, ["method.name=layers", override])
