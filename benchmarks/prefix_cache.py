"""Speed-up of the frozen-prefix cache for layer fine-tuning, on a population with revisits.

    .venv/bin/python benchmarks/prefix_cache.py [--clients 20] [--per-round 10] [--rounds 6]
        [--depths 2 1] [--max-examples 64] [--threads 1]

The default experiment (examples/default.toml: tweets, minilm-l6, 4 local steps of batch 16)
with method ``layers`` limited to the top ``depth`` blocks, so the blocks below are trained
by no device and can be cached, on a small population (20 clients, 10 a round) whose
clients keep ``--max-examples`` examples (64: a visit's 4 x 16 examples are the whole shard),
so a revisited client's examples are all in the cache. For each depth it runs uncached,
cached, uncached, cached (alternating, so machine noise hits both; best of two each), then
one cached run with float16 entries and one with the RAM cap at half of what the float32
cache held. Reported: training wall time, speed-up, the cache's hit rate (share of
example-visits whose states came from the store), the bytes its stored tensors held, and the
largest differences from the uncached run in final eval loss / accuracy, final tensors and
reported client FLOPs. Writes benchmarks/results/prefix_cache.json and .md (partial results
after every run).

The FLOP ceiling: with F the forward FLOPs of one block (embeddings and head are small), an
uncached step of a model of L blocks training the top d costs L F forward + 2 d F backward;
a cached step d F + 2 d F, plus the prefix's (L - d) F for each example-visit the cache
does not serve. With hit rate h the speed-up is at most (L + 2d) / (3d + (L - d)(1 - h)):
for minilm-l6 (L = 6) at d = 2 at most 10/6 = 1.67x even at h = 1; at d = 1 at most 8/3.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import torch

from fedfit.algorithms import layers
from fedfit.algorithms.prefix_cache import PrefixCache
from fedfit.config import apply_overrides, from_dict
from fedfit.engine.experiment import run
from fedfit.engine.runfolder import RunFolder
from fedfit.log import log

RESULTS = Path(__file__).parent / "results"
EXAMPLE = Path(__file__).parents[1] / "examples" / "default.toml"
BLOCKS = 6  # minilm-l6

made: list[PrefixCache] = []


class _Recorded(PrefixCache):
    """The run's cache, kept so that its counters can be read after the run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        made.append(self)


layers.PrefixCache = _Recorded  # type: ignore[misc]


def one(
    runs_dir: str, name: str, depth: int, cache: bool, args: argparse.Namespace, *extra: str
) -> dict:
    """One run; ``extra``: the cache variant's overrides (none: float32, default cap)."""
    raw = tomllib.loads(EXAMPLE.read_text())
    raw["method"] = {"name": "layers"}  # the example's LoRA options do not apply
    overrides = [
        f"run.output_dir={runs_dir}",
        f"run.name={name}",
        f"run.rounds={args.rounds}",
        f"run.eval_every={args.rounds}",
        f"run.threads={args.threads}",
        f"data.num_clients={args.clients}",
        f"data.clients_per_round={args.per_round}",
        f"data.max_examples={args.max_examples}",
        f"data.min_examples={min(20, args.max_examples)}",
        f"method.max_depth={depth}",
        f"method.prefix_cache={str(cache).lower()}",
        *extra,
    ]
    made.clear()
    out = RunFolder(run(from_dict(apply_overrides(raw, overrides)), plots=False))
    state, _ = out.load_checkpoint()
    cache = made[0] if made else None  # none when uncached
    row: dict[str, Any] = {
        "name": name,
        "depth": depth,
        "overrides": list(extra),
        "train_s": round(sum(t["train_s"] for t in out.timing()), 2),
        "eval": out.rounds()[-1]["eval"],
        "client_flops": [c["flops"] for c in out.clients()],
        "params": state.params,  # dropped before writing
    }
    if cache is not None:
        visits = cache.served + cache.computed
        row["cache"] = {
            "hit_rate": round(cache.served / visits, 4),
            "served": cache.served,
            "computed": cache.computed,
            "stored_bytes": cache.stored_bytes(),  # held at the end, from the tensors
            "peak_bytes": cache.peak_bytes,
            "cap_bytes": cache.max_bytes,
            "evicted_clients": cache.evicted,
        }
    log(f"  {name}: {row['train_s']:.1f} s training, cache {row.get('cache')}")
    return row


def differences(a: dict, b: dict) -> dict[str, Any]:
    """Largest |a - b| in final eval loss / accuracy and final tensors; FLOPs identical?"""
    return {
        "eval_loss": abs(a["eval"]["loss"] - b["eval"]["loss"]),
        "accuracy": abs(a["eval"]["accuracy"] - b["eval"]["accuracy"]),
        "tensors": max((a["params"][n] - b["params"][n]).abs().max().item() for n in a["params"]),
        "client_flops_identical": a["client_flops"] == b["client_flops"],
    }


def ceiling(depth: int, hit_rate: float) -> float:
    """The FLOP bound on the speed-up (module docstring)."""
    return (BLOCKS + 2 * depth) / (3 * depth + (BLOCKS - depth) * (1 - hit_rate))


def summarise(depth: int, runs: list[dict]) -> dict[str, Any] | None:
    plain = [r for r in runs if r["depth"] == depth and "cache" not in r]
    cached = [r for r in runs if r["depth"] == depth and "cache" in r and not r["overrides"]]
    if not plain or not cached:
        return None
    ref = min(plain, key=lambda r: r["train_s"])
    best = min(cached, key=lambda r: r["train_s"])
    variants = [r for r in runs if r["depth"] == depth and "cache" in r and r["overrides"]]
    rows = [
        {
            "variant": ", ".join(r["overrides"]) or "float32, default cap",
            "train_s": r["train_s"],
            "speedup": round(ref["train_s"] / r["train_s"], 3),
            **r["cache"],
            "flop_ceiling": round(ceiling(depth, r["cache"]["hit_rate"]), 3),
            "diff": differences(r, ref),
        }
        for r in (best, *variants)
    ]
    return {
        "depth": depth,
        "train_s_uncached": ref["train_s"],
        "uncached_runs_s": [r["train_s"] for r in plain],
        "cached_runs_s": [r["train_s"] for r in cached],
        "flop_ceiling_at_full_hits": round(ceiling(depth, 1.0), 3),
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    args = result["args"]
    lines = [
        "# Frozen-prefix cache: layer fine-tuning, minilm-l6, tweets, clients revisited",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Default experiment (4 local steps of batch 16) with method layers, {args['clients']} "
        f"clients of at most {args['max_examples']} examples, {args['per_round']} a round, "
        f"{args['rounds']} rounds ({args['rounds'] * args['per_round'] / args['clients']:.1f} "
        f"visits per client), torch threads {args['threads']}. Uncached and cached runs "
        "alternate; best of two each. Hit rate: share of example-visits whose prefix states "
        "came from the store. FLOP ceiling: the speed-up the FLOPs allow at that hit rate "
        "(uncached step = forward of all 6 blocks + backward of the top d; cached = forward + "
        "backward of the top d + the prefix for each example-visit not served). Differences: "
        "largest |cached - uncached| in final eval loss, accuracy and final tensors.",
        "",
        "| depth | variant | training wall (s) | uncached (s) | speed-up | FLOP ceiling | "
        "hit rate | cache held, peak (MiB) | evicted clients | d eval loss | d accuracy | "
        "d tensors | client FLOPs identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["depths"]:
        for r in s["rows"]:
            d = r["diff"]
            lines.append(
                f"| {s['depth']} | {r['variant']} | {r['train_s']:.1f} | "
                f"{s['train_s_uncached']:.1f} | {r['speedup']:.2f}x | {r['flop_ceiling']:.2f}x | "
                f"{r['hit_rate']:.1%} | {r['peak_bytes'] / 2**20:.1f} | {r['evicted_clients']} | "
                f"{d['eval_loss']:.1e} | {d['accuracy']:.1e} | {d['tensors']:.1e} | "
                f"{d['client_flops_identical']} |"
            )
    lines.append("")
    for s in result["depths"]:
        lines.append(
            f"- Depth {s['depth']}, every run's training wall time (s): uncached "
            f"{', '.join(f'{t:.1f}' for t in s['uncached_runs_s'])}; cached "
            f"{', '.join(f'{t:.1f}' for t in s['cached_runs_s'])}. FLOP ceiling at every "
            f"example-visit served: {s['flop_ceiling_at_full_hits']:.2f}x."
        )
    lines += [*[f"- {note}" for note in result["notes"]], ""]
    return "\n".join(lines)


def write(result: dict[str, Any], runs: list[dict], out: Path) -> None:
    result["depths"] = [s for d in result["args"]["depths"] if (s := summarise(d, runs))]
    result["runs"] = [{k: v for k, v in r.items() if k != "params"} for r in runs]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20, help="population size")
    parser.add_argument("--per-round", type=int, default=10, help="clients sampled per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 1], help="top blocks trained")
    parser.add_argument("--max-examples", type=int, default=64, help="examples kept per client")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (run.threads)")
    parser.add_argument("--out", default=str(RESULTS / "prefix_cache"))
    args = parser.parse_args()
    result: dict[str, Any] = {
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "args": vars(args),
        "notes": [
            "float32 entries are computed only in batches padded to >= 16 tokens (prefix_cache."
            "MIN_WIDTH) and served only to such batches: torch's CPU softmax reduces a row of "
            "fewer than 16 floats in another order, so an entry computed at one width and "
            "replayed at another could differ in the last bit; with the rule the cached run "
            "is bit-identical to the uncached one.",
            "A batch of a shape not seen before is measured on a full prefix forward (the "
            "FLOPs and memory the device would spend), so it counts as computed, not served.",
        ],
    }
    out, runs = Path(args.out), []
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as runs_dir:
        for depth in args.depths:
            for i, cache in enumerate((False, True, False, True)):
                runs.append(one(runs_dir, f"d{depth}-r{i}", depth, cache, args))
                write(result, runs, out)
            held = max(
                r["cache"]["peak_bytes"] for r in runs if r["depth"] == depth and "cache" in r
            )
            variants = {
                "fp16": "method.prefix_cache_dtype=float16",
                "cap": f"method.prefix_cache_mb={round(held / 2 / 2**20, 2)}",  # half of it
            }
            for name, override in variants.items():
                runs.append(one(runs_dir, f"d{depth}-{name}", depth, True, args, override))
                write(result, runs, out)
    print(markdown(result))


if __name__ == "__main__":
    main()
