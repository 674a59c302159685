"""Speed-up of the frozen-prefix cache for layer fine-tuning, side by side in one run.

    .venv/bin/python benchmarks/prefix_cache.py [--rounds 4] [--depth 3]

The default experiment (examples/default.toml: tweets, minilm-l6, 100 clients, 10 per round)
with method ``layers`` limited to the top ``--depth`` blocks, so the blocks below are trained
by no device and can be cached. Runs uncached, cached, uncached, cached (alternating, so
machine noise hits both), and reports training wall time per round, the ratio, and the
largest difference in evaluation metrics and client FLOPs. Writes
benchmarks/results/prefix_cache.json and .md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import tomllib
from pathlib import Path

from fedfit.config import apply_overrides, from_dict
from fedfit.engine.experiment import run
from fedfit.engine.runfolder import RunFolder

RESULTS = Path(__file__).parent / "results"
EXAMPLE = Path(__file__).parents[1] / "examples" / "default.toml"


def one(runs_dir: str, name: str, cache: bool, args: argparse.Namespace) -> dict:
    raw = tomllib.loads(EXAMPLE.read_text())
    raw["method"] = {"name": "layers"}  # the example's LoRA options do not apply
    config = from_dict(
        apply_overrides(
            raw,
            [
                f"run.output_dir={runs_dir}",
                f"run.name={name}",
                f"run.rounds={args.rounds}",
                f"data.num_clients={args.clients}",
                f"run.eval_every={args.rounds}",
                "method.name=layers",
                f"method.max_depth={args.depth}",
                f"method.prefix_cache={str(cache).lower()}",
            ],
        )
    )
    out = run(config, plots=False)
    rounds, timing = RunFolder(out).rounds(), RunFolder(out).timing()
    return {
        "cache": cache,
        "train_s": sum(t["train_s"] for t in timing),
        "eval": rounds[-1]["eval"],
        "client_flops": [r["client_flops"] for r in rounds],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument(
        "--clients", type=int, default=100, help="population size (10 sampled per round)"
    )
    parser.add_argument("--out", default=str(RESULTS / "prefix_cache"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as runs_dir:
        results = [
            one(runs_dir, f"r{i}", cache, args)
            for i, cache in enumerate((False, True, False, True))
        ]
    plain = [r for r in results if not r["cache"]]
    cached = [r for r in results if r["cache"]]
    t_plain = min(r["train_s"] for r in plain)
    t_cached = min(r["train_s"] for r in cached)
    d_loss = max(abs(a["eval"]["loss"] - b["eval"]["loss"]) for a in plain for b in cached)
    d_acc = max(abs(a["eval"]["accuracy"] - b["eval"]["accuracy"]) for a in plain for b in cached)
    same_flops = all(a["client_flops"] == b["client_flops"] for a in plain for b in cached)
    command = (
        f".venv/bin/python benchmarks/prefix_cache.py --rounds {args.rounds} --depth {args.depth} "
        f"--clients {args.clients}"
    )
    summary = {
        "command": command,
        "train_s_uncached": t_plain,
        "train_s_cached": t_cached,
        "speedup": t_plain / t_cached,
        "max_abs_eval_loss_diff": d_loss,
        "max_abs_accuracy_diff": d_acc,
        "client_flops_identical": same_flops,
        "runs": results,
    }
    md = "\n".join(
        [
            "# Frozen-prefix cache: layer fine-tuning, minilm-l6, tweets",
            "",
            f"Command: `{command}`",
            "",
            f"Default experiment, {args.rounds} rounds, method layers with max_depth "
            f"{args.depth} (blocks below are trained by no device), {args.clients} clients, "
            "10 per round. Best of two runs each, run alternately. The cache is filled on a "
            "client's first visit (its prefix runs as usual) and pays off from its second "
            f"visit on: {args.rounds} rounds x 10 / {args.clients} clients = "
            f"{args.rounds * 10 / args.clients:.1f} visits per client.",
            "",
            "| | training wall time (s) |",
            "|---|---|",
            f"| uncached | {t_plain:.1f} |",
            f"| cached | {t_cached:.1f} |",
            f"| speed-up | {t_plain / t_cached:.2f}x |",
            "",
            f"Largest |difference| in final eval loss {d_loss:.2e}, accuracy {d_acc:.2e}; "
            f"reported client FLOPs identical: {same_flops}.",
            "",
        ]
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
