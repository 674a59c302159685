"""The Ray executor against the local one: same seed, same rounds, same global model.

Ray's start-up dominates this file (measured on 2 cores busy with other work: a local
instance 7-8 s, `ray start --head` 10 s, joining it 1.6 s, two actors importing torch and
fedfit and building their setup 15-20 s; the whole file about 65 s), so each is paid once:
the head of the "existing cluster" starts in the background when the first test that needs it
begins, while the CLI test starts (and stops) fedfit's own local instance for FedAvg; the
cluster test runs LoRA and FedKSeed on one pool of actors (``run(config, pool=...)``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedfit.cli import _executor_changes, main, parser
from fedfit.config import load_config
from fedfit.engine.experiment import run
from fedfit.engine.server import sample_clients
from fedfit.errors import ConfigError

ray = pytest.importorskip("ray")

from fedfit.algorithms.base import ClientTask, ServerState  # noqa: E402
from fedfit.engine.executors.flower import free_port  # noqa: E402
from fedfit.engine.executors.ray import RayPool, RoundWork, import_ray, split  # noqa: E402
from tests.helpers import TINY_RUN, assert_same_as_local, read_rows, tiny_run_config  # noqa: E402

# 3 clients per round split 2 + 1 over two workers; the local executor and each actor on one
# thread, the same kernels.
TINY = [*TINY_RUN, "run.rounds=2", "run.threads=1"]


def tiny(tmp_path: Path, *extra: str):
    return tiny_run_config(tmp_path, *extra, base=TINY)


rows = read_rows


def assert_same_run(local: Path, remote: Path) -> None:
    """As the local run (tests/helpers.py), and both actors trained clients."""
    assert_same_as_local(local, remote, rounds=2)
    assert {c["worker"] for c in rows(remote / "clients.jsonl")} == {0, 1}


class Head:
    """`ray start --head --block` on loopback, started at once, ready when ``address`` is read;
    stopped by signalling that process (it stops what it started), never `ray stop`, which
    would stop every Ray instance on the machine."""

    def __init__(self) -> None:
        self.port = free_port()
        # Ray's socket paths must stay short: a private temp dir directly under /tmp.
        self.temp = tempfile.mkdtemp(prefix="fedfit-ray-", dir="/tmp")
        env = {
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # bind to 127.0.0.1 (engine/executors/ray.py)
        }
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "ray"),
                "start",
                "--head",
                "--block",
                f"--port={self.port}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=2",
                "--include-dashboard=false",
                "--disable-usage-stats",
                f"--ray-client-server-port={free_port()}",
                f"--temp-dir={self.temp}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.log: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)
            if "Ray runtime started" in line:
                self.ready.set()

    @property
    def address(self) -> str:
        if not self.ready.wait(90):
            raise RuntimeError("ray start --head did not start:\n" + "".join(self.log[-20:]))
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    cluster = Head()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_split_contiguous_balanced() -> None:
    assert split(3, 2) == [(0, 2), (2, 3)]
    assert split(6, 3) == [(0, 2), (2, 4), (4, 6)]
    assert split(1, 3) == [(0, 1)]  # idle workers get nothing


def test_round_work_serialises_a_shared_download_once() -> None:
    # Prepare: the global tensors (400 kB) downloaded by three clients, as FedAvg configures.
    params = {"w": torch.randn(100_000)}
    state = ServerState(1, params)
    tasks = [ClientTask(c, 2, c, download=params) for c in range(3)]
    # Execute: the round's work pickled as ray.put does (cloudpickle), vs one client's.
    three = len(ray.cloudpickle.dumps(RoundWork(state, [0, 1, 2], tasks)))
    one = len(ray.cloudpickle.dumps(RoundWork(state, [0], tasks[:1])))
    # Assert: the tensor travels once, not once per client (nor again with the state).
    assert 400_000 < one < 410_000 and three - one < 1_000


def test_config_and_flags() -> None:
    cfg = load_config(None, ["run.executor=ray", "run.workers=3", "run.ray_address=h:6379"])
    assert (cfg.run.executor, cfg.run.workers, cfg.run.ray_address) == ("ray", 3, "h:6379")
    for bad, key in (
        (["run.executor=dask"], "run.executor"),
        (["run.executor=ray", "run.workers=0"], "run.workers"),
        (["run.ray_address=h:6379"], "run.ray_address"),  # without executor = ray
        (["run.executor=ray", "run.ray_address=nohost"], "run.ray_address"),
    ):
        with pytest.raises(ConfigError, match=key):
            load_config(None, bad)
    args = parser().parse_args(["run", "--workers", "4"])
    assert _executor_changes(args) == {"workers": 4, "executor": "ray"}
    args = parser().parse_args(["run", "--executor", "ray", "--ray-address", "127.0.0.1:1"])
    assert _executor_changes(args) == {"executor": "ray", "ray_address": "127.0.0.1:1"}


def test_missing_ray_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RAY_USAGE_STATS_ENABLED", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        monkeypatch.setenv(name, os.environ.get(name, ""))  # restored afterwards
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(ConfigError, match=r'pip install "ray\[default\]"'):
        import_ray(loopback=True)


def test_unreachable_cluster_fails_fast(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.perf_counter()
    code = main(["run", *(f"--set={s}" for s in TINY), f"--set=run.output_dir={tmp_path}",
                 "--ray-address", address])  # fmt: skip
    assert code == 2 and time.perf_counter() - t0 < 15
    assert f"no Ray cluster answers at {address}" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_local_ray_instance_matches_local_executor(tmp_path: Path, head: Head) -> None:
    # `head` starts the cluster of the next test now, so that its start-up overlaps this one.
    sets = [f"--set={s}" for s in (*TINY, f"run.output_dir={tmp_path}", "method.name=fedavg")]
    assert main(["run", *sets, "--set=run.name=ray", "--executor", "ray", "--workers", "2"]) == 0
    assert not ray.is_initialized()  # fedfit's own instance is shut down at the end
    recorded = load_config(tmp_path / "ray" / "config.toml")
    assert (recorded.run.executor, recorded.run.workers) == ("ray", 2)
    local = run(tiny(tmp_path, "run.name=local", "method.name=fedavg"), plots=False)
    assert_same_run(local, tmp_path / "ray")


def test_existing_cluster_matches_local_executor(tmp_path: Path, head: Head) -> None:
    address = head.address
    bad = ",".join(str(sample_clients(0, r, list(range(12)), 3)[0]) for r in (1, 2))
    extra = {"lora": ["method.name=lora"], "fedkseed": ["method.name=fedkseed",
                                                        "method.num_seeds=64"],
             # clients that send NaN or crash, on the actors: rejected, the rounds go on
             "nan": ["method.name=fedavg", "attack.kind=nan", f"attack.clients=[{bad}]"],
             "error": ["method.name=fedavg", "attack.kind=error", f"attack.clients=[{bad}]"],
             "shape": ["method.name=fedavg", "attack.kind=shape", f"attack.clients=[{bad}]"],
             "count": ["method.name=fedavg", "attack.kind=count", f"attack.clients=[{bad}]"],
             }  # fmt: skip
    with RayPool(workers=2, threads=1, address=address) as pool:
        for name, method in extra.items():
            on_ray = tiny(tmp_path, f"run.name={name}-ray", "run.executor=ray",
                          f"run.ray_address={address}", *method)  # fmt: skip
            remote = run(on_ray, plots=False, pool=pool)
            local = run(tiny(tmp_path, f"run.name={name}-local", *method), plots=False)
            assert_same_run(local, remote)
            if name in ("nan", "error", "shape", "count"):
                assert sum("rejected" in c for c in rows(remote / "clients.jsonl")) == 2
    assert not ray.is_initialized()
    assert head.proc.poll() is None  # the cluster is left running: it is not ours to stop
