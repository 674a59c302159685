"""The subprocesses benchmarks/engines.py measures beside fedfit's engines: the bare-loop floor,
the FLOPs per sequence length, and the machine's matmul peak.

    .venv/bin/python benchmarks/engine_workers.py --floor-worker '{"sets": [...], "out": ..., "attn": "eager"}'

Each worker reads one JSON spec from the command line and writes its result where the spec's
``out`` says. The floor and the FLOPs worker build the run as fedfit builds it
(``fedfit.engine.setup.build``: the model loaded and wrapped by the method, the clients' shards
and the held-out set) and pick clients and batches with the engine's own functions
(``sample_clients``, ``derive_seed``, ``batch_indices``): only the round loop is the floor's.

Workers import torch and fedfit lazily: the floor's start-up pays for what it uses only, and
its ``import_s`` counts those imports.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

DEFAULT_TOML = Path(__file__).resolve().parent.parent / "examples" / "default.toml"


def load_workload(sets: list[str]) -> Any:
    """The fedfit Config the engines run (examples/default.toml + ``sets``)."""
    from fedfit.config import load_config

    return load_config(DEFAULT_TOML, sets)


def build_run(sets: list[str], attn: str) -> Any:
    """fedfit's RunSetup of the workload, its model switched to ``attn`` attention (fedfit
    loads eager; "sdpa" changes the dropout draws, so the tensors no longer match)."""
    from fedfit.engine.setup import build

    setup = build(load_workload(sets))
    if attn != "eager":
        model: Any = setup.model  # a transformers model (inside peft's wrapper)
        model.set_attn_implementation(attn)
    return setup


def floor_worker(spec: dict[str, Any]) -> None:
    """The floor: fedfit's workload as a bare PyTorch loop; writes ``spec["out"]``.json and
    its initial and final trainable tensors to ``spec["out"]``.pt.

    Per round per client: the global trainable tensors copied in, a fresh AdamW, the client's
    seeded batches and dropout as fedfit's client draws them, then the example-weighted mean.
    No metering, no serialisation, no run folder."""
    t_enter = time.perf_counter()
    import torch

    from fedfit.algorithms.base import batch_indices
    from fedfit.engine.seeds import derive_seed
    from fedfit.engine.server import sample_clients
    from fedfit.engine.setup import evaluate

    import_s = time.perf_counter() - t_enter
    setup = build_run(spec["sets"], spec["attn"])
    config, model, shards = setup.config, setup.model, setup.shards
    seed, train = config.run.seed, config.train
    num_labels = max(2, len(setup.dataset.label_names))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    global_ = {n: p.detach().clone() for n, p in params.items()}
    initial = {n: t.clone() for n, t in global_.items()}
    setup_s = time.perf_counter() - t_enter

    rounds, clients_log = [], []
    for round_ in range(1, config.run.rounds + 1):
        t0 = time.perf_counter()
        clients = sample_clients(seed, round_, setup.eligible, config.data.clients_per_round)
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
            for index in batch_indices(shard, train, client_seed):
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
            evaluation = evaluate(model, setup.test, train.eval_batch_size)
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
    length 1..max_length on the floor's model, and the replays of ``spec["rounds"]`` rounds;
    writes ``{"per_length": {length: FLOPs}, "replays": ...}`` to ``spec["out"]``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    setup = build_run(spec["sets"], spec["attn"])
    config, model, tokenizer = setup.config, setup.model, setup.tokenizer
    replays = {str(r): replay_batches(setup, r) for r in spec["rounds"]}
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


def replay_batches(setup: Any, rounds: int) -> dict[str, Any]:
    """fedfit's sampled clients and batches over ``rounds`` rounds, replayed without training:
    how many sequences of each length the client steps process, the steps, and how many of
    them fedfit's CostMeter measures (the first of each (batch shape, fresh optimiser) key;
    the others reuse that measurement)."""
    from fedfit.algorithms.base import batch_indices
    from fedfit.engine.seeds import derive_seed
    from fedfit.engine.server import sample_clients

    config = setup.config
    seed = config.run.seed
    counts: Counter[int] = Counter()
    keys, steps = set(), 0
    for round_ in range(1, rounds + 1):
        for cid in sample_clients(seed, round_, setup.eligible, config.data.clients_per_round):
            shard, client_seed = setup.shards[cid], derive_seed(seed, round_, cid)
            for step, index in enumerate(batch_indices(shard, config.train, client_seed)):
                sizes = [len(shard.seqs[i]) for i in index]
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


def worker_cmd(flag: str, spec: dict[str, Any]) -> list[str]:
    """The command line that runs worker ``flag`` on ``spec`` in a fresh interpreter."""
    if flag not in WORKERS:
        raise ValueError(f"unknown worker {flag!r}; known: {', '.join(WORKERS)}")
    return [sys.executable, str(Path(__file__).resolve()), flag, json.dumps(spec)]


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in WORKERS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(WORKERS)}}} SPEC_JSON")
    WORKERS[sys.argv[1]](json.loads(sys.argv[2]))
