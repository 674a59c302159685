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

- local: ``fedfit run`` in process (torch's default threads), fedfit's defaults;
- local-fast: the same executor with its speed options, ``run.lanes = 2`` (two forked lanes of
  one torch thread each train a round's clients side by side, engine/lanes.py) and
  ``train.bucket_by_length = true`` (length-bucketed minibatches: less padding, other batch
  composition, so its tensors differ from local's);
- ray: ``fedfit run --executor ray --workers N`` (one torch thread per actor);
- flower: ``fedfit run --executor flower --workers N`` (Flower's simulation runtime);
- floor: a bare loop (benchmarks/engine_workers.py ``--floor-worker``) on the run fedfit's own
  setup builds (``engine.setup.build``: the model loaded once and wrapped by the method, the
  shards, the held-out set): per round per client the global trainable tensors copied in, a
  fresh AdamW, the same seeded batches and dropout as fedfit's client, then the
  example-weighted mean. No metering, no serialisation, no run folder. The engine's own
  ``sample_clients`` and ``derive_seed`` pick its clients and batches, so its final tensors are
  compared to the local run's.

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

Layout: this file runs the engines side by side and writes the result; engine_workers.py holds
the floor, FLOPs and matmul workers; procs.py runs one subprocess (RSS sampler, session
killer); engines_report.py turns the measurements into ratios, the markdown and the plot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from engine_workers import DEFAULT_TOML, worker_cmd
from engines_report import markdown, plot, summarise
from procs import check_ok, run_measured

from fedfit.engine.runfolder import CHECKPOINT, RunFolder

FULL = {"rounds": 3, "clients_per_round": 4, "eval_examples": 300, "scales": "1,10"}
QUICK = {"rounds": 1, "clients_per_round": 2, "eval_examples": 64, "scales": "1"}
ENGINES = ("local", "local-fast", "ray", "flower", "floor")
FAST = ["run.lanes=2", "train.bucket_by_length=true"]  # local-fast's options
MATMUL_SIZES = (1024, 2048, 3072)


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


# ---------------------------------------------------------------- one engine run


def fedfit_cmd(engine: str, sets: list[str], workers: int) -> list[str]:
    exe = Path(sys.executable).with_name("fedfit")
    if not exe.exists():
        raise FileNotFoundError(f"{exe}: fedfit's CLI is not installed in this environment")
    cmd = [str(exe), "run", str(DEFAULT_TOML)]
    for s in [*sets, *(FAST if engine == "local-fast" else [])]:
        cmd += ["--set", s]
    if engine not in ("local", "local-fast"):
        cmd += ["--executor", engine, "--workers", str(workers)]
    return cmd


def run_engine(engine: str, args: argparse.Namespace, rounds: int, work: Path) -> dict[str, Any]:
    """Run one engine at ``rounds`` rounds in a subprocess and read back what it recorded."""
    from common import log

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
        folder = RunFolder(work / "runs" / name)
        timing, clients, summary = folder.timing(), folder.clients(), folder.summary()
        train_s = sum(t["train_s"] for t in timing)
        eval_s = sum(t["eval_s"] for t in timing)
        row.update(
            train_s=train_s,
            eval_s=eval_s,
            # timing.jsonl's wall_s = setup in the process + rounds (imports and exit excluded)
            in_process_setup_s=timing[-1]["wall_s"] - train_s - eval_s,
            accuracy=summary["final"]["accuracy"],
            eval_loss=summary["final"]["loss"],
            # training rounds only: round 0 (the starting model's evaluation) samples no one
            clients=[r["clients"] for r in folder.rounds() if r["round"] > 0],
            steps=sum(c["steps"] for c in clients),
            fedfit_flops=sum(c["flops"] for c in clients),
            client_updates=sum(1 for c in clients if c["round"] > 0 and c["steps"] > 0),
            # the cost meter's instrumented steps and their whole wall time (an upper bound
            # on what metering cost; per process: each actor and lane has its own meter)
            measured_steps=sum(c.get("measured_steps", 0) for c in clients),
            meter_s=sum(c.get("measured_s", 0.0) for c in clients),
            client_s=sum(c.get("wall_s", 0.0) for c in clients),
            params_file=str(folder.file(CHECKPOINT)),
        )
    row["outside_loop_s"] = row["wall_s"] - row["train_s"] - row["eval_s"]
    log(
        f"  {name}: {row['wall_s']:.1f} s end to end, round loop {row['train_s']:.1f} s + eval "
        f"{row['eval_s']:.1f} s, peak RSS {row.get('peak_rss_sum_bytes', 0) / 2**20:.0f} MiB, "
        f"accuracy {row['accuracy']:.4f}"
    )
    return row


def final_params(row: dict[str, Any]) -> dict[str, Any]:
    """The final trainable tensors: the floor's file, or the run folder's checkpoint."""
    if row["engine"] != "floor":
        state, _ = RunFolder(Path(row["params_file"]).parent).load_checkpoint()
        return state.params
    import torch

    final: dict[str, Any] = torch.load(row["params_file"], weights_only=False)["final"]
    return final


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


# ---------------------------------------------------------------- the matmul peak


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
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows of the --out JSON whose run folders are still in --work-dir and "
        "run only the missing (engine, rounds) pairs",
    )
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
    if args.resume and not args.work_dir:
        parser.error("--resume needs the --work-dir of the run it continues")
    args.work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="fedfit-engines-"))
    if args.out is None:
        from common import RESULTS

        args.out = str(args.work_dir / "engines_quick" if args.quick else RESULTS / "engines")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
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
    done: list[dict[str, Any]] = []
    if args.resume and out.with_suffix(".json").exists():
        previous = json.loads(out.with_suffix(".json").read_text())
        done = [r for r in previous["rows"] if Path(r["params_file"]).exists()]
        result["matmul"] = previous["matmul"]
        log(f"resuming: {len(done)} engine runs kept from {out}.json")
    if "before" not in result["matmul"]:
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
    log("FLOPs of one training step per sequence length")
    flops_out = work / "flops_per_length.json"
    spec = {
        "sets": overrides(args, 1, work / "runs", "flops"),
        "out": str(flops_out),
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
            kept = [r for r in done if (r["engine"], r["rounds"]) == (engine, rounds)]
            at.append(kept[0] if kept else run_engine(engine, args, rounds, work))
            result["rows"] = [r for r in result["rows"] if r["rounds"] != rounds] + at
            save()
        compare_params(at)
        save()
    result["matmul"]["after"] = matmul_peak(args, work, "after")
    save()
    print(markdown(result))


if __name__ == "__main__":
    main()
