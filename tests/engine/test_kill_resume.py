"""kill -9 at random moments, then ``--resume``: the run ends byte-identical to an
uninterrupted one (rounds.jsonl), whatever the moment (a torn line, a checkpoint older than
the rows, a kill during start-up)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedfit.engine.experiment import run
from tests.helpers import TINY_RUN, tiny_run_config

ROUNDS = ["run.rounds=4", "method.name=fedavg", "run.threads=1"]


def fedfit(*args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "fedfit.cli", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_killed_at_random_moments_then_resumed_ends_byte_identical(tmp_path: Path) -> None:
    sets = [f"--set={s}" for s in (*TINY_RUN, *ROUNDS, f"run.output_dir={tmp_path}")]
    reference = run(tiny_run_config(tmp_path, *ROUNDS, "run.name=whole"), plots=False)
    folder = tmp_path / "killed"
    rng = random.Random(16)
    start = fedfit("run", *sets, "--set=run.name=killed")
    kills = 0
    process = start
    # each kill comes after the process has run a random while past its first written row
    while kills < 3:
        deadline = time.monotonic() + 120
        rows = folder / "rounds.jsonl"
        while time.monotonic() < deadline and process.poll() is None:
            if rows.exists() and rows.stat().st_size > 0:
                break
            time.sleep(0.05)
        if process.poll() is not None:
            break  # finished before this kill: the remaining kills have nothing to hit
        time.sleep(rng.uniform(0.0, 1.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        process = fedfit("run", "--resume", str(folder))
    assert process.wait(timeout=300) == 0, process.stderr.read().decode() if process.stderr else ""
    assert kills >= 1
    assert (folder / "rounds.jsonl").read_bytes() == (reference / "rounds.jsonl").read_bytes()
