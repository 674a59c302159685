"""Engine overhead: fedfit's local and Ray executors and Flower's simulation against a bare
PyTorch loop on the same federated workload, and all of them against the machine's matmul peak.

    .venv/bin/python benchmarks/engines.py                  # full: 3 and 30 rounds (~25 min)
    .venv/bin/python benchmarks/engines.py --quick          # smoke test: 1 round, 2 clients
    .venv/bin/python benchmarks/engines.py --engines local,ray,floor --scales 1

Workload (fedfit issue 7): tweets, minilm-l6 with LoRA r=8 on query/value plus the classifier
head (fedfit's ``lora`` defaults), 20 iid clients of 64 examples each (``data.max_examples``),
4 clients per round, 3 rounds (x ``--scales``), 4 local AdamW steps (lr 3e-3) of batch 16, max
length 64, server FedAvg; one evaluation, at the last round, on 300 held-out tweets.

Engines, each in its own subprocess (a fresh interpreter: start-up and memory are honest):

- local: ``fedfit run`` in process (torch's default threads);
- ray: ``fedfit run --executor ray --workers N`` (one torch thread per actor);
- flower: ``fedfit run --executor flower --workers N`` (Flower's simulation runtime);
- floor: a bare loop in this file (``--floor-worker``): the model loaded once (transformers +
  peft, as fedfit builds it), per round per client the global trainable tensors copied in, a
  fresh AdamW, the same seeded batches and dropout as fedfit's client, then the example-weighted
  mean. No metering, no serialisation, no run folder. fedfit's data helpers give it the same
  shards, sampled clients and batches, so its final tensors are compared to the local run's.

Per engine: wall time from subprocess start to exit; the round loop (training, and evaluation
apart) as the run's timing.jsonl records it (the floor times its loop the same way); peak RSS
summed over the subprocess and every descendant (Ray and Flower start gcs, raylet, workers),
sampled every 0.1 s, and the largest single process. Useful FLOPs are those of the training
steps on real tokens: FlopCounterMode on one training step (forward, backward, AdamW) of one
unpadded sequence for every length 1..max_length (``--flops-worker``), summed over every
sequence every client step processes; fedfit's own measured client FLOPs (padded batches) are
shown beside it. Achieved FLOP/s = useful FLOPs / time, against the best fp32 ``torch.mm``
rate at n = 1024, 2048, 3072 (measured before and after the engines, ``--matmul-worker``).
Two scales give each engine's cost per round (slope) and fixed cost (intercept).

Nothing else may run on the machine while it measures. Run folders go to a temp folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

# Workers import torch / fedfit lazily: the floor's start-up should pay for what it uses only.
BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# common.DEFAULT_TOML, without importing common (matplotlib, the engine) in the lean workers.
DEFAULT_TOML = ROOT / "examples" / "default.toml"

FULL = {"rounds": 3, "clients_per_round": 4, "eval_examples": 300, "scales": "1,10"}
QUICK = {"rounds": 1, "clients_per_round": 2, "eval_examples": 64, "scales": "1"}
ENGINES = ("local", "ray", "flower", "floor")
GOALS = {  # ratio -> (goal, "<=" or ">=")
    "local/floor": (1.05, "<="),
    "flower/local": (1.6, ">="),
    "achieved/peak": (0.5, ">="),
}
MATMUL_SIZES = (1024, 2048, 3072)
SAMPLE_S = 0.1


# ---------------------------------------------------------------- the workload as --set keys


def overrides(args: argparse.Namespace, rounds: int, runs_dir: Path, name: str) -> list[str]:
    """The workload as ``--set`` overrides of examples/default.toml (every engine reads these)."""
    return [
        f"run.name={name}",
        f"run.output_dir={json.dumps(str(runs_dir))}",
        f"run.seed={args.seed}",
        f"run.rounds={rounds}",
        f"run.eval_every={rounds}",  # evaluate only at the last round
        "model.name=minilm-l6",
        f"model.max_length={args.max_length}",
        "data.name=tweets",
        "data.partition=iid",
        f"data.num_clients={args.num_clients}",
        f"data.max_examples={args.max_examples}",
        f"data.clients_per_round={args.clients_per_round}",
        f"data.eval_examples={args.eval_examples}",
        f"train.local_steps={args.local_steps}",
        f"train.batch_size={args.batch_size}",
        "train.optimizer=adamw",
        f"train.lr={args.lr}",
        "server.optimizer=fedavg",
        "server.lr=1.0",
        "method.name=lora",
        "method.r=8",
        "method.alpha=16.0",
    ]


def load_workload(sets: list[str]) -> Any:
    """The fedfit Config the engines run (examples/default.toml + ``sets``)."""
    from fedfit.config import load_config

    return load_config(DEFAULT_TOML, sets)


# ---------------------------------------------------------------- workers (subprocesses)


def load_floor_model(config: Any, num_labels: int, attn: str) -> tuple[Any, Any]:
    """MiniLM-L6 for classification with LoRA r=8 on query/value and a trainable head, built
    as fedfit builds it (models/zoo.py load_model, algorithms/peft.py LoRA.prepare, and the
    seed engine/setup.py build sets before it), so its initial tensors are fedfit's."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    from fedfit.engine.setup import derive_seed
    from fedfit.models.sources import minilm_l6_dir
    from fedfit.models.zoo import init_head_

    if config.model.name != "minilm-l6":
        raise ValueError(f"the floor loads minilm-l6 only, not {config.model.name!r}")
    path = str(minilm_l6_dir())
    logging.set_verbosity_error()  # not transformers' load report of the fresh head
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=num_labels,
        attn_implementation=attn,
        dtype=torch.float32,
        local_files_only=True,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    init_head_(model.classifier, config.run.seed, model.config.initializer_range)
    torch.manual_seed(derive_seed(config.run.seed, 0x5EED))  # peft draws LoRA A from it
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=config.method.options.r,
        lora_alpha=config.method.options.alpha,
        lora_dropout=config.method.options.dropout,
        target_modules=["query", "value"],
    )
    return get_peft_model(model, lora), tokenizer


def floor_worker(spec: dict[str, Any]) -> None:
    """The floor: fedfit's workload as a bare PyTorch loop; writes ``spec["out"]``.json and
    its initial and final trainable tensors to ``spec["out"]``.pt."""
    t_enter = time.perf_counter()
    import numpy as np
    import torch

    from fedfit.algorithms.base import ClientData, batch_indices
    from fedfit.data import load_configured, tokenize
    from fedfit.engine.local import sample_clients
    from fedfit.engine.setup import derive_seed, evaluate, partition_clients

    import_s = time.perf_counter() - t_enter
    config = load_workload(spec["sets"])
    seed, train = config.run.seed, config.train
    dataset = load_configured(config.data, seed)
    parts = partition_clients(config, dataset)
    num_labels = max(2, len(dataset.label_names))
    model, tokenizer = load_floor_model(config, num_labels, spec["attn"])
    pad_id = int(tokenizer.pad_token_id)
    seqs = tokenize(dataset.train_texts, tokenizer, config.model.max_length)
    labels = np.asarray(dataset.train_labels)
    shards = [
        ClientData(c, [seqs[i] for i in p], labels[p], pad_id, False) for c, p in enumerate(parts)
    ]
    test_seqs = tokenize(dataset.test_texts, tokenizer, config.model.max_length)
    idx = np.arange(len(test_seqs))
    if config.data.eval_examples and config.data.eval_examples < len(idx):
        idx = np.sort(
            np.random.default_rng(0).choice(len(idx), config.data.eval_examples, replace=False)
        )
    test = ClientData(
        -1, [test_seqs[i] for i in idx], np.asarray(dataset.test_labels)[idx], pad_id, False
    )
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    global_ = {n: p.detach().clone() for n, p in params.items()}
    initial = {n: t.clone() for n, t in global_.items()}
    setup_s = time.perf_counter() - t_enter

    rounds, clients_log = [], []
    for round_ in range(1, config.run.rounds + 1):
        t0 = time.perf_counter()
        clients = sample_clients(
            seed, round_, list(range(len(shards))), config.data.clients_per_round
        )
        trained, weights = [], []
        for cid in clients:
            shard, client_seed = shards[cid], derive_seed(seed, round_, cid)
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(global_[n])
            torch.manual_seed(client_seed)  # dropout, as fedfit's local_train seeds it
            model.train()
            opt = torch.optim.AdamW(params.values(), lr=train.lr, weight_decay=train.weight_decay)
            steps = 0
            for index in batch_indices(len(shard), train, client_seed):
                model(**shard.batch(index)).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                steps += 1
            trained.append({n: p.detach().clone() for n, p in params.items()})
            weights.append(float(len(shard)))
            clients_log.append({"round": round_, "client_id": cid, "steps": steps})
        total = sum(weights)
        for n, x in global_.items():
            # FedAvg: the example-weighted mean (float64), reached as fedfit's server step with
            # lr 1 reaches it, x + float32(mean - x), so that the float32 roundings agree.
            mean = sum(w * t[n].double() for w, t in zip(weights, trained, strict=True)) / total
            global_[n] = x + (mean - x.double()).to(x.dtype)
        train_s = time.perf_counter() - t0
        eval_s, evaluation = 0.0, None
        if round_ == config.run.rounds:
            t1 = time.perf_counter()
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(global_[n])
            evaluation = evaluate(model, test, train.eval_batch_size)
            eval_s = time.perf_counter() - t1
        rounds.append({"round": round_, "clients": clients, "train_s": train_s, "eval_s": eval_s})
    torch.save({"initial": initial, "final": global_}, spec["out"] + ".pt")
    result = {
        "import_s": import_s,
        "setup_s": setup_s,
        "rounds": rounds,
        "clients": clients_log,
        "final": evaluation,
        "num_labels": num_labels,
        "torch_threads": torch.get_num_threads(),
    }
    Path(spec["out"] + ".json").write_text(json.dumps(result))


def flops_worker(spec: dict[str, Any]) -> None:
    """FLOPs of one training step (forward, backward, AdamW) of ONE unpadded sequence of each
    length 1..max_length on the floor's model; writes {length: FLOPs} to ``spec["out"]``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    config = load_workload(spec["sets"])
    model, tokenizer = load_floor_model(config, spec["num_labels"], spec["attn"])
    replays = {str(r): replay_batches(config, tokenizer, r) for r in spec["rounds"]}
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.train.lr)
    flops = {}
    for s in range(1, config.model.max_length + 1):
        # FLOPs depend on shapes only; the ids are any real token.
        batch = {
            "input_ids": torch.full((1, s), int(tokenizer.cls_token_id), dtype=torch.long),
            "attention_mask": torch.ones((1, s), dtype=torch.long),
            "labels": torch.zeros(1, dtype=torch.long),
        }
        with FlopCounterMode(display=False) as counter:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        flops[str(s)] = counter.get_total_flops()
    Path(spec["out"]).write_text(json.dumps({"per_length": flops, "replays": replays}))


def replay_batches(config: Any, tokenizer: Any, rounds: int) -> dict[str, Any]:
    """fedfit's sampled clients and batches over ``rounds`` rounds, replayed without training:
    how many sequences of each length the client steps process, the steps, and how many of
    them fedfit's CostMeter measures (the first of each (batch shape, fresh optimiser) key;
    the others reuse that measurement)."""
    from fedfit.algorithms.base import batch_indices
    from fedfit.data import load_configured, tokenize
    from fedfit.engine.local import sample_clients
    from fedfit.engine.setup import derive_seed, partition_clients

    seed = config.run.seed
    dataset = load_configured(config.data, seed)
    parts = partition_clients(config, dataset)
    seqs = tokenize(dataset.train_texts, tokenizer, config.model.max_length)
    counts: Counter[int] = Counter()
    keys, steps = set(), 0
    for round_ in range(1, rounds + 1):
        for cid in sample_clients(
            seed, round_, list(range(len(parts))), config.data.clients_per_round
        ):
            part, seed_ = parts[cid], derive_seed(seed, round_, cid)
            for step, index in enumerate(batch_indices(len(part), config.train, seed_)):
                sizes = [len(seqs[part[i]]) for i in index]
                counts.update(sizes)
                keys.add((len(sizes), max(sizes), step > 0))
                steps += 1
    lengths = {str(k): v for k, v in sorted(counts.items())}
    return {"lengths": lengths, "steps": steps, "meter_measured_steps": len(keys)}


def matmul_worker(spec: dict[str, Any]) -> None:
    """Best-of-``reps`` fp32 ``torch.mm`` rate at each n, torch's default threads."""
    import torch

    torch.manual_seed(0)
    rows = []
    for n in spec["sizes"]:
        a, b = torch.randn(n, n), torch.randn(n, n)
        c = torch.empty(n, n)
        torch.mm(a, b, out=c)  # warm-up: thread pool, caches
        times = []
        for _ in range(spec["reps"]):
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            times.append(time.perf_counter() - t0)
        best = min(times)
        rows.append({"n": n, "best_s": best, "gflops": 2 * n**3 / best / 1e9, "reps": len(times)})
    info = {
        "rows": rows,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "mkl": torch.backends.mkl.is_available(),
        "mkldnn": torch.backends.mkldnn.is_available(),
    }
    Path(spec["out"]).write_text(json.dumps(info))


WORKERS = {
    "--floor-worker": floor_worker,
    "--flops-worker": flops_worker,
    "--matmul-worker": matmul_worker,
}


# ---------------------------------------------------------------- running one subprocess


class RssSampler(threading.Thread):
    """Every ``SAMPLE_S``: RSS summed over a process and all its descendants, and the largest."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.stop = threading.Event()
        self.seen: dict[int, Any] = {}  # pid -> psutil.Process (kept to kill leftovers safely)
        self.labels: dict[int, str] = {}  # pid -> its command line, as first seen
        self.peak_sum = self.peak_single = self.max_procs = self.samples = 0
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
        total, sizes = 0, []
        for p in procs:
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            if p.pid not in self.seen:
                self.seen[p.pid], self.labels[p.pid] = p, _label(p)
            total += rss
            sizes.append((rss, p))
        self.samples += 1
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


def _kill_session(proc: subprocess.Popen[bytes], sampler: RssSampler | None) -> list[str]:
    """SIGKILL the subprocess's session (it leads its own process group) and every descendant
    the sampler saw that still runs; returns those that were still alive."""
    alive = []
    if sampler is not None:
        for p in sampler.seen.values():
            try:
                if p.is_running() and p.pid != proc.pid:  # is_running checks the start time
                    alive.append((p, sampler.labels[p.pid]))
            except Exception:
                continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for p, _ in alive:
        try:
            p.kill()
        except Exception:
            continue
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    return [label for _, label in alive]


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
            leftovers = _kill_session(proc, sampler)
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


def worker_cmd(flag: str, spec: dict[str, Any]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), flag, json.dumps(spec)]


# ---------------------------------------------------------------- one engine run


def fedfit_cmd(engine: str, sets: list[str], workers: int) -> list[str]:
    exe = Path(sys.executable).with_name("fedfit")
    if not exe.exists():
        raise FileNotFoundError(f"{exe}: fedfit's CLI is not installed in this environment")
    cmd = [str(exe), "run", str(DEFAULT_TOML)]
    for s in sets:
        cmd += ["--set", s]
    if engine != "local":
        cmd += ["--executor", engine, "--workers", str(workers)]
    return cmd


def run_engine(engine: str, args: argparse.Namespace, rounds: int, work: Path) -> dict[str, Any]:
    """Run one engine at ``rounds`` rounds in a subprocess and read back what it recorded."""
    from common import log, read_jsonl

    name = f"{engine}-r{rounds}"
    sets = overrides(args, rounds, work / "runs", name)
    if engine == "floor":
        stem = str(work / name)
        cmd = worker_cmd("--floor-worker", {"sets": sets, "out": stem, "attn": args.floor_attn})
    else:
        cmd = fedfit_cmd(engine, sets, args.workers)
    log(f"  {name}: {shlex.join(cmd[:4])} ...")
    measured = run_measured(cmd, work / f"{name}.log", args.timeout)
    check_ok(name, measured)
    row: dict[str, Any] = {"engine": engine, "rounds": rounds, "command": cmd, **measured}
    if engine == "floor":
        rec = json.loads(Path(stem + ".json").read_text())
        row.update(
            train_s=sum(r["train_s"] for r in rec["rounds"]),
            eval_s=sum(r["eval_s"] for r in rec["rounds"]),
            in_process_setup_s=rec["setup_s"],
            import_s=rec["import_s"],
            accuracy=rec["final"]["accuracy"],
            eval_loss=rec["final"]["loss"],
            clients=[r["clients"] for r in rec["rounds"]],
            steps=sum(c["steps"] for c in rec["clients"]),
            num_labels=rec["num_labels"],
            torch_threads=rec["torch_threads"],
            fedfit_flops=None,
            params_file=stem + ".pt",
        )
    else:
        run_dir = work / "runs" / name
        timing = read_jsonl(run_dir / "timing.jsonl")
        clients = read_jsonl(run_dir / "clients.jsonl")
        summary = json.loads((run_dir / "summary.json").read_text())
        train_s = sum(t["train_s"] for t in timing)
        eval_s = sum(t["eval_s"] for t in timing)
        row.update(
            train_s=train_s,
            eval_s=eval_s,
            # timing.jsonl's wall_s = setup in the process + rounds (imports and exit excluded)
            in_process_setup_s=timing[-1]["wall_s"] - train_s - eval_s,
            accuracy=summary["final"]["accuracy"],
            eval_loss=summary["final"]["loss"],
            clients=[r["clients"] for r in read_jsonl(run_dir / "rounds.jsonl")],
            steps=sum(c["steps"] for c in clients),
            fedfit_flops=sum(c["flops"] for c in clients),
            params_file=str(run_dir / "checkpoint.pt"),
        )
    row["outside_loop_s"] = row["wall_s"] - row["train_s"] - row["eval_s"]
    log(
        f"  {name}: {row['wall_s']:.1f} s end to end, round loop {row['train_s']:.1f} s + eval "
        f"{row['eval_s']:.1f} s, peak RSS {row.get('peak_rss_sum_bytes', 0) / 2**20:.0f} MiB, "
        f"accuracy {row['accuracy']:.4f}"
    )
    return row


def final_params(row: dict[str, Any]) -> dict[str, Any]:
    import torch

    data = torch.load(row["params_file"], weights_only=False)
    return data["final"] if row["engine"] == "floor" else data["state"]["params"]


def compare_params(rows: list[dict[str, Any]]) -> None:
    """Max |difference| of each engine's final trainable tensors to the local run's (to the
    floor's if local did not run), beside the largest change any tensor made in training."""
    ref = next((r for r in rows if r["engine"] == "local"), None) or next(
        (r for r in rows if r["engine"] == "floor"), None
    )
    if ref is None:
        return
    import torch

    ref_params = final_params(ref)
    floor = next((r for r in rows if r["engine"] == "floor"), None)
    initial = torch.load(floor["params_file"], weights_only=False)["initial"] if floor else None
    for r in rows:
        params = final_params(r)
        if set(params) != set(ref_params):
            raise RuntimeError(
                f"{r['engine']}: trainable tensors differ in name from {ref['engine']}'s"
            )
        r["params_vs"] = ref["engine"]
        r["max_abs_diff"] = max(float((params[n] - ref_params[n]).abs().max()) for n in params)
        if initial is not None:
            r["max_abs_update"] = max(float((params[n] - initial[n]).abs().max()) for n in params)


# ---------------------------------------------------------------- FLOPs, peak, ratios


def useful_flops(lengths: dict[str, int], per_length: dict[str, int]) -> int:
    """FLOPs on real tokens: sum over processed sequences of one-sequence step FLOPs f(len)."""
    return sum(count * per_length[length] for length, count in lengths.items())


def matmul_peak(args: argparse.Namespace, work: Path, tag: str) -> dict[str, Any]:
    from common import log

    out = work / f"matmul-{tag}.json"
    spec = {"sizes": list(MATMUL_SIZES), "reps": 2 if args.quick else 5, "out": str(out)}
    measured = run_measured(worker_cmd("--matmul-worker", spec), work / f"matmul-{tag}.log", 600)
    check_ok(f"matmul-{tag}", measured)
    info = json.loads(out.read_text())
    log(
        "  matmul "
        + tag
        + ": "
        + ", ".join(f"n={r['n']} {r['gflops']:.1f} GFLOP/s" for r in info["rows"])
    )
    return info


def slope_intercept(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Least-squares line through the points (exact through two): (per unit x, at x = 0)."""
    if len(set(xs)) < 2:
        return None
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return slope, my - slope * mx


def summarise(result: dict[str, Any]) -> None:
    """Achieved FLOP/s, ratios with their goals, and per-round cost from the scales."""
    rows, per_length = result["rows"], result.get("flops_per_length")
    peaks = [r["gflops"] for m in result["matmul"].values() for r in m["rows"]]
    peak = max(peaks) * 1e9 if peaks else None
    result["matmul_peak_flops"] = peak
    lengths_by_rounds = {int(k): v["lengths"] for k, v in result.get("replays", {}).items()}
    # Every engine runs the same padded batches: fedfit's measured FLOPs are what each executed.
    executed = {r["rounds"]: r["fedfit_flops"] for r in rows if r["fedfit_flops"]}
    for r in rows:
        if r["rounds"] in executed:
            r["executed_flops_loop"] = executed[r["rounds"]] / r["train_s"]
        lengths = lengths_by_rounds.get(r["rounds"])
        if per_length is None or lengths is None:
            continue
        r["useful_flops"] = useful_flops(lengths, per_length)
        r["achieved_flops_loop"] = r["useful_flops"] / r["train_s"]
        r["achieved_flops_e2e"] = r["useful_flops"] / r["wall_s"]
        if peak:
            r["peak_fraction_loop"] = r["achieved_flops_loop"] / peak
            r["peak_fraction_e2e"] = r["achieved_flops_e2e"] / peak
    ratios = []
    for rounds in sorted({r["rounds"] for r in rows}):
        at = {r["engine"]: r for r in rows if r["rounds"] == rounds}
        for num, den in (("local", "floor"), ("flower", "local"), ("ray", "local")):
            if num in at and den in at:
                for what, key in (
                    ("round loop", "train_s"),
                    ("end to end", "wall_s"),
                    ("peak RSS", "peak_rss_sum_bytes"),
                ):
                    goal = GOALS.get(f"{num}/{den}") if key != "peak_rss_sum_bytes" else None
                    ratios.append(
                        _ratio(f"{num}/{den}", what, rounds, at[num][key] / at[den][key], goal)
                    )
        for engine, r in at.items():
            if "peak_fraction_loop" in r:
                ratios.append(
                    _ratio(
                        f"{engine} achieved/peak",
                        "round loop",
                        rounds,
                        r["peak_fraction_loop"],
                        GOALS["achieved/peak"],
                    )
                )
    result["ratios"] = ratios
    growth = []
    for engine in dict.fromkeys(r["engine"] for r in rows):
        mine = sorted((r for r in rows if r["engine"] == engine), key=lambda r: r["rounds"])
        xs = [float(r["rounds"]) for r in mine]
        lines = {
            k: slope_intercept(xs, [float(r[k]) for r in mine])
            for k in ("wall_s", "train_s", "peak_rss_sum_bytes")
        }
        if lines["wall_s"] is not None:
            growth.append(
                {
                    "engine": engine,
                    "rounds": xs,
                    **{f"{k}_per_round": v[0] for k, v in lines.items() if v},
                    **{f"{k}_fixed": v[1] for k, v in lines.items() if v},
                }
            )
    result["growth"] = growth
    notes = []
    for rounds in sorted({r["rounds"] for r in rows}):
        fed = [r for r in rows if r["rounds"] == rounds and r["engine"] != "floor"]
        if len({r["accuracy"] for r in fed}) > 1:
            notes.append(
                f"{rounds} rounds: final accuracy differs between engines: "
                + ", ".join(f"{r['engine']} {r['accuracy']:.4f}" for r in fed)
            )
        if len({json.dumps(r["clients"]) for r in rows if r["rounds"] == rounds}) > 1:
            notes.append(f"{rounds} rounds: the engines sampled different clients")
        if len({r["steps"] for r in rows if r["rounds"] == rounds}) > 1:
            notes.append(f"{rounds} rounds: the engines ran different numbers of steps")
        replay = result.get("replays", {}).get(str(rounds))
        if replay and any(r["steps"] != replay["steps"] for r in rows if r["rounds"] == rounds):
            notes.append(f"{rounds} rounds: an engine ran other steps than the replay counted")
    result["checks"] = notes


def _ratio(
    name: str, what: str, rounds: int, value: float, goal: tuple[float, str] | None
) -> dict[str, Any]:
    met = None
    if goal is not None:
        met = value <= goal[0] if goal[1] == "<=" else value >= goal[0]
    return {
        "ratio": name,
        "of": what,
        "rounds": rounds,
        "value": value,
        "goal": f"{goal[1]} {goal[0]:g}" if goal else None,
        "met": met,
    }


# ---------------------------------------------------------------- markdown and plot


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f} MiB"


def _g(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x / 1e9:.{digits}f}"


def _md_table(header: str, rows: list[list[Any]]) -> list[str]:
    """A markdown table (``header``: column names joined by " | "), then a blank line."""
    width = len(header.split(" | "))
    lines = [f"| {header} |", "|" + "---|" * width]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def markdown(result: dict[str, Any]) -> str:
    a, rows, m = result["args"], result["rows"], result["machine"]
    peak = result.get("matmul_peak_flops")
    out = [
        "# Engines: fedfit local and Ray executors, Flower simulation, and a bare PyTorch floor",
        "",
        f"Command: `{result['command']}`",
        "",
        f"tweets, minilm-l6 + LoRA r=8 (query/value) + classifier head; {a['num_clients']} iid "
        f"clients of {a['max_examples']} examples, {a['clients_per_round']} per round, "
        f"{a['local_steps']} local AdamW steps (lr {a['lr']:g}) of batch {a['batch_size']}, max "
        f"length {a['max_length']}, server FedAvg; evaluation at the last round only, on "
        f"{a['eval_examples']} held-out tweets. Ray and Flower: {a['workers']} workers, 1 torch "
        f"thread each; local and floor: torch default threads ({m.get('torch_threads')}). "
        f"Floor attention: {a['floor_attn']} (fedfit loads eager).",
        "",
        f"Machine: {m.get('cpu')}, {m.get('cores_logical')} logical / {m.get('cores_physical')} "
        f"physical cores, {_mib(m.get('memory_bytes'))}; Python {m.get('python')}, torch "
        f"{m.get('torch_version')}, ray {m.get('ray')}, flwr {m.get('flwr')}.",
        "",
        "End to end: subprocess start to exit. Round loop: training of every round (sampling, "
        "clients, aggregation), evaluation apart; outside = end to end - loop - eval (imports, "
        "model and data load, Ray/Flower start and stop, plots). Peak RSS: summed over the "
        "process tree every 0.1 s (shared library pages count once per process, so the sum "
        "overstates what the tree really holds). Useful FLOPs: training steps on real tokens "
        "(no padding); achieved = useful FLOPs / time; executed GFLOP/s counts the padded "
        "batches every engine really runs (fedfit's measured client FLOPs).",
        "",
    ]
    sampling = [r["sampler_cpu_s"] / r["wall_s"] for r in rows if r.get("sampler_cpu_s")]
    if sampling:
        out += [f"The RSS sampler used at most {max(sampling):.1%} of one core during a run.", ""]
    if peak:
        cells = "; ".join(
            f"{tag}: " + ", ".join(f"n={r['n']} {r['gflops']:.1f}" for r in info["rows"])
            for tag, info in result["matmul"].items()
        )
        out += [f"fp32 matmul GFLOP/s ({cells}); peak taken as {peak / 1e9:.1f} GFLOP/s.", ""]
    out += [f"- {c}" for c in result.get("checks", [])] + ([""] if result.get("checks") else [])
    for rounds in sorted({r["rounds"] for r in rows}):
        at = [r for r in rows if r["rounds"] == rounds]
        first = next((r for r in at if r.get("useful_flops")), None)
        fed = next((r for r in at if r.get("fedfit_flops")), None)
        out += [f"## {rounds} round{'s' * (rounds != 1)}", ""]
        if first:
            line = f"Useful FLOPs (real tokens): {_g(first['useful_flops'], 2)} GFLOP"
            if fed:
                line += (
                    f"; fedfit's measured client FLOPs (padded batches): "
                    f"{_g(fed['fedfit_flops'], 2)} GFLOP "
                    f"({fed['fedfit_flops'] / first['useful_flops']:.2f}x)"
                )
            replay = result.get("replays", {}).get(str(rounds), {})
            line += f"; {first['steps']} client steps"
            if replay:
                line += (
                    f", of which fedfit's cost meter instruments {replay['meter_measured_steps']}"
                    " (the first step of each batch shape, with and without optimiser state; "
                    "per process: each Ray/Flower actor has its own meter)"
                )
            out += [line + ".", ""]
        header = (
            "engine | end to end | round loop | eval | outside | peak RSS (tree) | largest "
            "process | procs | GFLOP/s loop | GFLOP/s e2e | loop / peak | executed GFLOP/s loop "
            "| accuracy | max abs diff vs ref | max abs update"
        )
        cells = []
        for r in at:
            frac = r.get("peak_fraction_loop")
            diff = f"{r['max_abs_diff']:.2e} ({r['params_vs']})" if "max_abs_diff" in r else "-"
            update = f"{r['max_abs_update']:.2e}" if "max_abs_update" in r else "-"
            cells.append(
                [
                    r["engine"],
                    f"{r['wall_s']:.1f} s",
                    f"{r['train_s']:.1f} s",
                    f"{r['eval_s']:.1f} s",
                    f"{r['outside_loop_s']:.1f} s",
                    _mib(r.get("peak_rss_sum_bytes")),
                    _mib(r.get("peak_rss_single_bytes")),
                    r.get("processes_max", "-"),
                    _g(r.get("achieved_flops_loop")),
                    _g(r.get("achieved_flops_e2e")),
                    "-" if frac is None else f"{frac:.2f}",
                    _g(r.get("executed_flops_loop")),
                    f"{r['accuracy']:.4f}",
                    diff,
                    update,
                ]
            )
        out += _md_table(header, cells)
    if result.get("ratios"):
        out += ["## Ratios", ""]
        cells = [
            [
                q["ratio"],
                q["of"],
                q["rounds"],
                f"{q['value']:.2f}",
                q["goal"] or "-",
                "-" if q["met"] is None else ("yes" if q["met"] else "**no**"),
            ]
            for q in result["ratios"]
        ]
        out += _md_table("ratio | of | rounds | value | goal | met", cells)
    if result.get("growth"):
        out += ["## Cost per round and fixed cost (line through the scales)", ""]
        cells = [
            [
                g["engine"],
                f"{g['wall_s_per_round']:.2f} s",
                f"{g['wall_s_fixed']:.1f} s",
                f"{g['train_s_per_round']:.2f} s",
                f"{g['train_s_fixed']:.1f} s",
                _mib(g.get("peak_rss_sum_bytes_per_round")),
                _mib(g.get("peak_rss_sum_bytes_fixed")),
            ]
            for g in result["growth"]
        ]
        header = (
            "engine | end to end / round | fixed (end to end at 0 rounds) | round loop / round "
            "| loop at 0 rounds | peak RSS / round | peak RSS at 0 rounds"
        )
        out += _md_table(header, cells)
    return "\n".join(out) + "\n"


def plot(result: dict[str, Any]) -> Any:
    """One panel per scale: each engine's end-to-end time split into outside the loop, the
    round loop and evaluation."""
    from matplotlib.figure import Figure

    scales = sorted({r["rounds"] for r in result["rows"]})
    fig = Figure(figsize=(4.2 * len(scales) + 1, 3.6), layout="constrained")
    axes = fig.subplots(1, len(scales), squeeze=False)[0]
    parts = (("outside_loop_s", "outside the loop"), ("train_s", "round loop"),
             ("eval_s", "evaluation"))  # fmt: skip
    for ax, rounds in zip(axes, scales, strict=True):
        rows = [r for r in result["rows"] if r["rounds"] == rounds]
        bottom = [0.0] * len(rows)
        for i, (key, label) in enumerate(parts):
            values = [r[key] for r in rows]
            ax.bar([r["engine"] for r in rows], values, bottom=bottom, label=label, color=f"C{i}")
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_title(f"{rounds} rounds", fontsize=9)
        ax.set_ylabel("seconds, end to end")
    axes[0].legend(fontsize=8)
    return fig


# ---------------------------------------------------------------- main


def machine_info(matmul: dict[str, Any]) -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor()
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for pkg in ("ray", "flwr", "transformers", "peft"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu": cpu,
        "cores_logical": psutil.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "memory_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_version": matmul["torch_version"],
        "torch_threads": matmul["torch_threads"],
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "mkl": matmul["mkl"],
        **versions,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help=f"comma-separated, run in this order ({','.join(ENGINES)})",
    )
    parser.add_argument("--scales", help="round multipliers (default 1,10; --quick: 1)")
    parser.add_argument("--rounds", type=int, help="rounds at scale 1 (default 3; --quick: 1)")
    parser.add_argument("--clients-per-round", type=int, help="default 4 (--quick: 2)")
    parser.add_argument("--eval-examples", type=int, help="default 300 (--quick: 64)")
    parser.add_argument("--num-clients", type=int, default=20)
    parser.add_argument("--max-examples", type=int, default=64, help="examples per client")
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="Ray / Flower workers")
    parser.add_argument(
        "--floor-attn",
        default="eager",
        choices=("eager", "sdpa"),
        help="the floor's attention (fedfit loads eager; sdpa changes dropout "
        "draws, so its tensors no longer match)",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per engine run")
    parser.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the untimed floor run that warms caches first",
    )
    parser.add_argument("--out", help="output stem (default benchmarks/results/engines)")
    parser.add_argument("--work-dir", help="run folders and logs (default: a temp folder)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 round, 2 clients")
    args = parser.parse_args(argv)
    from common import fill_sizes

    fill_sizes(args, QUICK if args.quick else FULL)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in args.engines if e not in ENGINES]
    if unknown or not args.engines:
        parser.error(f"--engines: unknown {unknown}; allowed {', '.join(ENGINES)}")
    args.scales = [int(s) for s in str(args.scales).split(",") if s.strip()]
    if not args.scales or min(args.scales) < 1:
        parser.error("--scales: positive integers, e.g. 1,10")
    args.work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="fedfit-engines-"))
    if args.out is None:
        from common import RESULTS

        args.out = str(args.work_dir / "engines_quick" if args.quick else RESULTS / "engines")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in WORKERS:
        WORKERS[argv[0]](json.loads(argv[1]))
        return
    # SIGTERM ends the benchmark like Ctrl-C: run_measured's finally kills the engine's session.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from common import log, write_outputs

    args = parse_args(argv)
    work = args.work_dir
    (work / "runs").mkdir(parents=True, exist_ok=True)
    keys = (
        "engines",
        "scales",
        "rounds",
        "clients_per_round",
        "eval_examples",
        "num_clients",
        "max_examples",
        "local_steps",
        "batch_size",
        "max_length",
        "lr",
        "seed",
        "workers",
        "floor_attn",
        "timeout",
        "quick",
    )
    result: dict[str, Any] = {
        "command": shlex.join([".venv/bin/python", "benchmarks/engines.py", *argv]),
        "args": {**{k: getattr(args, k) for k in keys}, "work_dir": str(work)},
        "matmul": {},
        "rows": [],
    }
    out = Path(args.out)
    t_start = time.perf_counter()

    def save() -> None:
        summarise(result)
        result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        write_outputs(result, out, markdown, plot)

    log(f"work folder {work}; results to {out}.md/.json/.png")
    result["matmul"]["before"] = matmul_peak(args, work, "before")
    result["machine"] = machine_info(result["matmul"]["before"])
    if not args.no_warmup:
        # Untimed: fills the tokenised-data cache and the OS page cache for every engine alike.
        log("warm-up (untimed floor run, 1 round, 1 client)")
        sets = overrides(args, 1, work / "runs", "warmup")
        sets = [*sets, "data.clients_per_round=1", "train.local_steps=1"]
        spec = {"sets": sets, "out": str(work / "warmup"), "attn": args.floor_attn}
        check_ok(
            "warm-up",
            run_measured(worker_cmd("--floor-worker", spec), work / "warmup.log", args.timeout),
        )
        num_labels = json.loads((work / "warmup.json").read_text())["num_labels"]
    else:
        num_labels = 3  # tweets: negative / neutral / positive
    log("FLOPs of one training step per sequence length")
    flops_out = work / "flops_per_length.json"
    spec = {
        "sets": overrides(args, 1, work / "runs", "flops"),
        "out": str(flops_out),
        "num_labels": num_labels,
        "attn": args.floor_attn,
        "rounds": [args.rounds * s for s in args.scales],
    }
    check_ok(
        "flops", run_measured(worker_cmd("--flops-worker", spec), work / "flops.log", args.timeout)
    )
    flops = json.loads(flops_out.read_text())
    result["flops_per_length"], result["replays"] = flops["per_length"], flops["replays"]
    save()
    for scale in args.scales:
        rounds = args.rounds * scale
        log(f"{rounds} rounds (elapsed {time.perf_counter() - t_start:.0f} s)")
        at: list[dict[str, Any]] = []
        for engine in args.engines:
            at.append(run_engine(engine, args, rounds, work))
            result["rows"] = [r for r in result["rows"] if r["rounds"] != rounds] + at
            save()
        compare_params(at)
        save()
    result["matmul"]["after"] = matmul_peak(args, work, "after")
    save()
    print(markdown(result))


if __name__ == "__main__":
    main()
