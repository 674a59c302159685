"""Shared test helpers: tiny shards, dropout off, tiny engine runs and their rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfit.algorithms.base import ClientData
from fedfit.config import Config, load_config
from fedfit.engine.runfolder import RunFolder

# A whole federated run on tiny-bert in seconds (the engine tests' workload).
TINY_RUN = [
    "model.name=tiny-bert",
    "model.max_length=32",
    "data.num_clients=12",
    "data.clients_per_round=3",
    "data.min_examples=20",
    "data.eval_examples=150",
    "run.rounds=3",
    "run.eval_every=1",
    "train.local_steps=2",
    "train.batch_size=8",
    "train.lr=5e-3",
]


# The tiny random model of each zoo family.
TINY_MODEL = {"bert": "tiny-bert", "llama": "tiny-llama"}


def tiny_sizes(config: Config) -> list[str]:
    """Overrides that shrink ``config``'s run to one round of tiny steps, keeping its setting
    (method and options, task, data): short sequences, 16 examples per client, one local step;
    a zoo model becomes the tiny one of its family (the client counts are the caller's)."""
    from fedfit.models import get_model_info
    from fedfit.models.checkpoints import is_path

    sets = [
        "model.max_length=32",
        "data.max_examples=16",
        "data.eval_examples=24",
        "train.local_steps=1",
        "train.batch_size=4",
        "train.eval_batch_size=24",
        "run.rounds=1",
        "run.eval_every=1",
    ]
    if not is_path(config.model.name):
        tiny = TINY_MODEL[get_model_info(config.model.name).family]
        sets.append(f"model.name={tiny}")
        if getattr(config.method.options, "split", None):  # a block of the real model
            sets.append(f"method.split={get_model_info(tiny).num_layers}")  # the tiny one's top
    if config.model.head_init_clients > 0:
        sets.append("model.head_init_clients=2")
    return sets


def tiny_run_config(tmp_path: Path, *extra: str, base: list[str] = TINY_RUN) -> Config:
    """``base`` (TINY_RUN) writing under ``tmp_path``, then ``extra`` overrides."""
    return load_config(None, [*base, f"run.output_dir={tmp_path}", *extra])


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's .jsonl file (``run_dir / "rounds.jsonl"``, ...)."""
    return RunFolder(path.parent).rows(path.name)


def assert_same_as_local(local: Path, remote: Path, rounds: int) -> None:
    """Another executor's run folder against the local executor's for the same config: bytes
    and FLOPs exactly, losses and accuracies to 1e-6, every global tensor to atol 1e-6."""
    import pytest

    a, b = read_rows(local / "rounds.jsonl"), read_rows(remote / "rounds.jsonl")
    assert len(a) == len(b) == rounds + 1  # round 0: the starting model's evaluation
    for ra, rb in zip(a, b, strict=True):
        for key in ("clients", "upload_bytes", "download_bytes", "client_flops"):
            assert ra[key] == rb[key], key
        if ra["round"] == 0:
            assert ra["train_loss"] is rb["train_loss"] is None
        else:
            assert ra["cum_upload_bytes"] == rb["cum_upload_bytes"] > 0
            assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-6, abs=1e-6)
        for key, value in ra["eval"].items():
            assert rb["eval"][key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    ca, cb = read_rows(local / "clients.jsonl"), read_rows(remote / "clients.jsonl")
    assert len(ca) == len(cb)
    for x, y in zip(ca, cb, strict=True):
        for key in ("round", "client_id", "num_examples", "steps", "upload_bytes", "flops"):
            assert x[key] == y[key], key
        assert x["download_bytes"] == y["download_bytes"]
        assert (x.get("attack"), x.get("rejected")) == (y.get("attack"), y.get("rejected"))
    pa = RunFolder(local).load_checkpoint()[0].params
    pb = RunFolder(remote).load_checkpoint()[0].params
    assert pa.keys() == pb.keys() and pa
    for name in pa:
        torch.testing.assert_close(pb[name], pa[name], atol=1e-6, rtol=0)


def no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Zero every dropout so train-mode outputs are deterministic functions of the weights."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def random_shard(
    client_id: int,
    n: int,
    seed: int,
    num_labels: int = 3,
    lm: bool = False,
    vocab: tuple[int, int] = (1000, 1200),
    length: int | None = None,
) -> ClientData:
    """``n`` random token sequences of 5..12 tokens (or exactly ``length``; real vocab ids),
    with labels."""
    rng = np.random.default_rng(seed)
    sizes = [length or int(rng.integers(5, 13)) for _ in range(n)]
    seqs = [rng.integers(*vocab, size=size).astype(np.int32) for size in sizes]
    labels = None if lm else rng.integers(0, num_labels, size=n)
    return ClientData(client_id, seqs, labels, pad_id=0, lm=lm)


def misbehave(monkeypatch: Any, change: Any) -> list[int]:
    """Make the first client of every round misbehave: its update, once computed, goes
    through ``change(update, task)`` (which may alter it in place, return another, or raise).
    It patches ``Algorithm.client_update``: methods that override it (head) are not hit.
    Returns the ids of the clients it hit, one per round (the local executor only: Ray and
    Flower run clients in other processes)."""
    from fedfit.algorithms.base import Algorithm

    client_update, start_round = Algorithm.client_update, Algorithm.start_round
    hit: list[int] = []

    def patched_update(self: Any, model: Any, task: Any, shard: Any, ctx: Any) -> Any:
        update = client_update(self, model, task, shard, ctx)
        if task.client_id != min(self.round_clients):
            return update
        hit.append(task.client_id)
        return change(update, task)

    def patched_start(self: Any, state: Any, clients: list[int]) -> None:
        self.round_clients = clients
        start_round(self, state, clients)

    monkeypatch.setattr(Algorithm, "client_update", patched_update)
    monkeypatch.setattr(Algorithm, "start_round", patched_start)
    return hit


def processes_of(home: Path) -> list[Any]:
    """Live processes started with FLWR_HOME = ``home`` (SuperLink, SuperNodes, their
    SuperExecs and app processes)."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("FLWR_HOME") == str(home):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found
