"""Test-wide guards: no hub access, and no socket may leave this machine."""

from __future__ import annotations

import os
import socket

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

_LOCAL = ("127.", "::1", "localhost", "0.0.0.0")
_connect = socket.socket.connect


def _guarded_connect(self: socket.socket, address: object) -> object:
    host = address[0] if isinstance(address, tuple) else None
    if host is not None and not str(host).startswith(_LOCAL):
        raise RuntimeError(f"test tried to reach the network: {address!r}")
    return _connect(self, address)  # type: ignore[arg-type]


@pytest.fixture(autouse=True, scope="session")
def _no_network() -> object:
    socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
    yield
    socket.socket.connect = _connect  # type: ignore[method-assign]


# Under pytest-xdist (`make test` runs `pytest -n 2`): each worker gets one of the machine's
# cores, so torch runs one thread per worker rather than two workers each spinning two.
# The tests that start other processes (a Ray instance, a Flower simulation, which starts
# Ray too, or a Flower deployment) run in one worker, one after another, as without xdist:
# a `ray.init()` in one worker would attach to the cluster a `ray start` of the other left
# running, and those processes need the cores they were sized for.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)

_PROCESS_MODULES = ("test_ray.py", "test_flower.py", "test_secagg.py", "test_kill_resume.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        name = item.nodeid
        if name.split("::")[0].endswith(_PROCESS_MODULES) or (
            "test_readme_commands.py" in name and ("flower" in name or "--executor ray" in name)
        ):
            item.add_marker(pytest.mark.xdist_group("processes"))
