"""Length-bucketed minibatches (``train.bucket_by_length``) on the default experiment: the
padding they save, and what they do to accuracy and to the round loop's wall time.

    .venv/bin/python benchmarks/bucketing.py            # about 12 min on this 2-core machine
    .venv/bin/python benchmarks/bucketing.py --quick    # tiny-bert smoke test

Padding: for every client of every round of the run, the batches its clients train on
(``batch_indices``, the run's own seeds), each padded to its longest: executed tokens
(batch x longest) over useful tokens (the real ones), without and with buckets. Then the
default experiment (examples/default.toml) runs both ways, one after the other in this
process, on the same threads: final accuracy from round 0, and the ratio of the two runs'
training wall time (a ratio measured side by side, as these machines are noisy).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from common import DEFAULT_TOML, RESULTS, ROOT, log, run_and_read

from fedfit.algorithms.base import batch_indices
from fedfit.config import Config, load_config
from fedfit.engine.seeds import derive_seed
from fedfit.engine.server import sample_clients
from fedfit.engine.setup import build

RUNS = ROOT / "runs" / "bench" / "bucketing"
QUICK = ["model.name=tiny-bert", "model.max_length=32", "data.num_clients=12",
         "data.clients_per_round=3", "run.rounds=2", "run.eval_every=1",
         "data.eval_examples=100"]  # fmt: skip


def padding(config: Config) -> dict[str, float]:
    """Executed over useful tokens of every batch the run's clients train on."""
    setup = build(config)
    out = {}
    for bucket in (False, True):
        train = dataclasses.replace(config.train, bucket_by_length=bucket)
        executed = useful = 0
        for r in range(1, config.run.rounds + 1):
            clients = sample_clients(config.run.seed, r, setup.eligible,
                                     config.data.clients_per_round)  # fmt: skip
            for cid in clients:
                shard = setup.shards[cid]
                lengths = np.array([len(s) for s in shard.seqs])
                for index in batch_indices(shard, train, derive_seed(config.run.seed, r, cid)):
                    executed += int(lengths[index].max()) * len(index)
                    useful += int(lengths[index].sum())
        out["bucketed" if bucket else "plain"] = executed / useful
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    common = QUICK if args.quick else []
    out = Path("/tmp/bucketing-quick") if args.quick else RESULTS / "bucketing"
    base = load_config(DEFAULT_TOML, [*common, f"run.output_dir={RUNS}"])
    ratios = padding(base)
    log(f"executed / useful tokens: {ratios}")
    runs: dict[str, Any] = {}
    for name, sets in (("plain", []), ("bucketed", ["train.bucket_by_length=true"])):
        config = load_config(DEFAULT_TOML, [*common, *sets, f"run.output_dir={RUNS}",
                                            f"run.name={name}"])  # fmt: skip
        runs[name] = run_and_read(config)
    plain, bucketed = runs["plain"], runs["bucketed"]
    result = {
        "command": "python benchmarks/bucketing.py" + (" --quick" if args.quick else ""),
        "setting": "examples/default.toml" + (" " + " ".join(common) if common else ""),
        "executed_over_useful_tokens": ratios,
        "runs": runs,
        "train_s_ratio_bucketed_over_plain": bucketed["train_s"] / plain["train_s"],
    }
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Length-bucketed minibatches on the default experiment", "",
        f"Command: `{result['command']}`", "", f"Setting: {result['setting']}", "",
        "| minibatches | executed / useful tokens | round 0 | final accuracy | eval loss | "
        "training wall time |", "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, r in runs.items():
        lines.append(
            f"| {name} | {ratios[name]:.2f} | {100 * r['start_accuracy']:.1f}% | "
            f"{100 * r['final_accuracy']:.1f}% | {r['final_loss']:.3f} | {r['train_s']:.0f} s |"
        )
    lines += ["", f"Training wall time, bucketed / plain (one after the other in one process): "
              f"{result['train_s_ratio_bucketed_over_plain']:.2f}", ""]  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines))
    log(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
