"""Running one benchmark subprocess honestly: in a session of its own, its memory sampled
over the whole process tree, and every process it left behind killed when it ends.

``run_measured`` is what benchmarks/engines.py runs each engine and worker through. Stopping
the processes goes through fedfit's own ``stop_processes`` (engine/processes.py), the one
a Flower deployment ends with.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from fedfit.engine.processes import stop_processes

ROOT = Path(__file__).resolve().parent.parent
PSS_EVERY = 10  # samples (1 s)
SAMPLE_S = 0.1  # the RSS sampling period


class RssSampler(threading.Thread):
    """Every ``SAMPLE_S``: RSS summed over a process and all its descendants, and the largest."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.stop = threading.Event()
        self.seen: dict[int, Any] = {}  # pid -> psutil.Process (kept to kill leftovers safely)
        self.labels: dict[int, str] = {}  # pid -> its command line, as first seen
        self.peak_sum = self.peak_single = self.max_procs = self.samples = 0
        # PSS: a page shared by k processes counts 1/k in each (fork's copy-on-write pages,
        # shared libraries), so the sum is what the tree really holds. Reading it walks every
        # mapping (smaps_rollup): sampled every PSS_EVERY-th time only, or the sampler takes
        # a third of a core on a 12-process tree
        self.peak_pss_sum = 0
        self.peak_single_name = ""
        self.cpu_s = 0.0
        self.at_peak: list[str] = []

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.sample()
                self.stop.wait(SAMPLE_S)
        except psutil.Error:  # the root process is gone
            pass
        self.cpu_s = time.thread_time()  # what sampling cost (it shares the cores)

    def sample(self) -> None:
        procs = [self.root, *self.root.children(recursive=True)]
        total, pss, sizes = 0, 0, []
        for p in procs:
            try:
                rss = p.memory_info().rss
                if self.samples % PSS_EVERY == 0:
                    pss += getattr(p.memory_full_info(), "pss", 0)
            except psutil.Error:
                continue
            if p.pid not in self.seen:
                self.seen[p.pid], self.labels[p.pid] = p, _label(p)
            total += rss
            sizes.append((rss, p))
        self.samples += 1
        self.peak_pss_sum = max(self.peak_pss_sum, pss)
        self.max_procs = max(self.max_procs, len(sizes))
        if total > self.peak_sum:
            self.peak_sum = total
            self.at_peak = [self.describe(p, rss) for rss, p in sorted(sizes, key=_first)[::-1]]
        if sizes:
            rss, p = max(sizes, key=_first)
            if rss > self.peak_single:
                self.peak_single, self.peak_single_name = rss, self.describe(p, rss)

    def describe(self, p: Any, rss: int) -> str:
        return f"{rss / 2**20:.0f} MiB {self.labels.get(p.pid, '?')}"


def _first(item: tuple[int, Any]) -> int:
    return item[0]


def _label(p: Any) -> str:
    try:
        return (" ".join(p.cmdline()[:3]) or p.name())[:80]
    except Exception:  # the process may be gone already; a label is only a label
        return "?"


def kill_session(proc: subprocess.Popen[bytes], sampler: RssSampler | None) -> list[str]:
    """SIGKILL every descendant the sampler saw that still runs (Ray's gcs and raylet leave
    the subprocess's tree when it exits) and the subprocess's session (it leads its own
    process group); returns the labels of the descendants that were still alive."""
    seen = sampler.seen if sampler is not None else {}
    labels = sampler.labels if sampler is not None else {}
    alive = stop_processes([p for pid, p in seen.items() if pid != proc.pid], grace_s=0)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    return [labels[p.pid] for p in alive]


def run_measured(cmd: list[str], log_path: Path, timeout_s: float) -> dict[str, Any]:
    """Run ``cmd`` in its own session with stdout/stderr to ``log_path``; returns wall time,
    exit code, peak RSS (sum over the process tree and largest process). Whatever happens
    (error, timeout, Ctrl-C) the whole session is killed before this returns."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as log_file:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        sampler = None
        try:
            sampler = RssSampler(proc.pid)
            sampler.start()
        except Exception:  # the process exited before psutil saw it
            sampler = None
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out, rc = True, -9
        finally:
            wall = time.perf_counter() - t0
            if sampler is not None:
                sampler.stop.set()
                sampler.join()
            leftovers = kill_session(proc, sampler)
    out = {
        "wall_s": wall,
        "rc": rc,
        "timed_out": timed_out,
        # descendants still alive when the subprocess exited (then killed)
        "leftover_processes": leftovers,
        "log": str(log_path),
    }
    if sampler is not None:
        out.update(
            peak_rss_sum_bytes=sampler.peak_sum,
            peak_rss_single_bytes=sampler.peak_single,
            peak_pss_sum_bytes=sampler.peak_pss_sum,
            peak_rss_single=sampler.peak_single_name,
            processes_max=sampler.max_procs,
            processes_at_peak=sampler.at_peak[:12],
            rss_samples=sampler.samples,
            sampler_cpu_s=sampler.cpu_s,
        )
    return out


def check_ok(name: str, measured: dict[str, Any]) -> None:
    """Fail loudly: a failed engine stops the benchmark with the tail of its log."""
    if measured["rc"] == 0:
        return
    tail = "\n".join(Path(measured["log"]).read_text(errors="replace").splitlines()[-30:])
    why = (
        f"timed out after {measured['wall_s']:.0f} s"
        if measured["timed_out"]
        else (f"exit code {measured['rc']}")
    )
    raise RuntimeError(f"engine {name} failed ({why}); log {measured['log']}:\n{tail}")
