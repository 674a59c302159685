"""Population scale (issue 17): how long ``fedfit run`` takes to set up 100, 1,000 and 10,000
clients, what each part costs, and the peak memory of a 3-round run.

    .venv/bin/python benchmarks/population.py              # 9 runs, about 12 min on 2 cores
    .venv/bin/python benchmarks/population.py --quick      # tiny-bert smoke test (to /tmp)
    .venv/bin/python benchmarks/population.py --settings tiers --sizes 10000 --force

Every run: tweets split iid over the clients with every training example used (33,000-odd:
10,000 clients hold 3 or 4 each), 10 clients per round, 3 rounds, evaluation at rounds 0 and
3 on 200 held-out tweets, one torch thread. Settings:

- ``lora``: examples/default.toml on minilm-l3 (LoRA r=8), one unlimited budget for all;
- ``tiers``: examples/heterogeneous.toml (minilm-l6, layer fine-tuning, four memory tiers of
  1/8, 1/4, 1/2 and 1x full fine-tuning): every client planned against its tier's budget;
- ``trace``: the same model and method with a trace of one budget per device (a CSV written
  here, memory drawn uniformly in [1/8, 1]x to 4 decimals): about as many distinct budgets
  as devices, the planner's worst case.

Each run is ``fedfit run`` in its own subprocess (a fresh interpreter, so memory is honest;
procs.run_measured samples the RSS of its process tree every 0.1 s). From the run's
timing.jsonl: the set-up by part (engine/setup.py ``build``, round 0's ``setup_s``: data load
and partition, model load and the method's wrap, tokenisation and shards, planning), round
0's evaluation apart, and the 3 rounds (training and evaluation); beside them the process's
wall time (imports and exit included) and how many lines it logged. Goals at 10,000 clients:
set-up under 60 s, peak RSS under 2 GB, 3 rounds done. Results are written after every run,
and a run already in population.json is skipped unless --force.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS, ROOT, log
from procs import run_measured

from fedfit.engine.runfolder import RunFolder

RUNS = ROOT / "runs" / "bench" / "population"
SIZES = (100, 1000, 10000)
SETTINGS = {
    "lora": ("default.toml", ["model.name=minilm-l3"]),
    "tiers": ("heterogeneous.toml", []),
    "trace": ("default.toml", ["method.name=layers", "devices.population=trace"]),
}
COMMON = ["data.partition=iid", "data.min_examples=1", "data.clients_per_round=10",
          "data.eval_examples=200", "run.rounds=3", "run.eval_every=3",
          "run.threads=1"]  # fmt: skip
QUICK = ["model.name=tiny-bert", "model.max_length=32", "train.local_steps=1"]
GOAL_CLIENTS = 10000
GOAL_SETUP_S = 60.0
GOAL_RSS_BYTES = 2 * 10**9  # 2 GB (decimal, as fedfit prints sizes)


def write_trace(path: Path, num_clients: int, seed: int = 0) -> None:
    """One row per device: a memory budget drawn uniformly in [1/8, 1] of full fine-tuning
    (4 decimals), FLOPs and upload unlimited."""
    fractions = np.random.default_rng(seed).uniform(1 / 8, 1, num_clients)
    rows = [f"{cid},{f:.4f}x,," for cid, f in enumerate(fractions)]
    path.write_text("\n".join(["client_id,memory,flops,upload", *rows]) + "\n")


def measure(setting: str, num_clients: int, out: Path, quick: bool) -> dict[str, Any]:
    """One ``fedfit run`` of ``setting`` with ``num_clients`` clients in a subprocess."""
    toml, sets = SETTINGS[setting]
    name = f"{setting}-{num_clients}"
    sets = [*sets, *COMMON, *(QUICK if quick else []), f"data.num_clients={num_clients}",
            f"run.output_dir={out}", f"run.name={name}"]  # fmt: skip
    if setting == "trace":
        trace = out / f"trace-{num_clients}.csv"
        write_trace(trace, num_clients)
        sets.append(f"devices.trace={trace}")
    fedfit = Path(sys.executable).parent / "fedfit"
    cmd = [str(fedfit), "run", str(ROOT / "examples" / toml), "--overwrite"]
    for s in sets:
        cmd += ["--set", s]
    measured = run_measured(cmd, out / f"{name}.log", timeout_s=1800)
    lines = Path(measured["log"]).read_text(errors="replace").splitlines()
    row: dict[str, Any] = {
        "setting": setting,
        "clients": num_clients,
        "rc": measured["rc"],
        "process_s": round(measured["wall_s"], 2),
        "peak_rss_bytes": measured.get("peak_rss_sum_bytes"),
        "log_lines": len(lines),
        "command": " ".join(cmd[1:3] + [f"--set {s}" for s in sets]),
    }
    if measured["rc"] != 0:
        row["log_tail"] = lines[-20:]
        return row
    folder = RunFolder(out / name)
    timing, summary = folder.timing(), folder.summary()
    sizes = [c["num_examples"] for c in folder.clients() if c["round"] > 0]
    parts = timing[0]["setup_s"]
    row.update(
        setup_parts_s=parts,
        setup_s=round(sum(parts.values()), 2),
        round0_eval_s=timing[0]["eval_s"],
        rounds_s=round(sum(t["train_s"] + t["eval_s"] for t in timing[1:]), 2),
        rounds_completed=summary["rounds_completed"],
        excluded=summary["excluded_clients"],
        examples_per_client=[min(sizes), max(sizes)],
        final_accuracy=summary["final"]["accuracy"],
    )
    return row


def goals(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Met / not met at ``GOAL_CLIENTS`` clients, for every setting measured there."""
    out = []
    for row in rows.values():
        if row["clients"] != GOAL_CLIENTS:
            continue
        done = row["rc"] == 0 and row.get("rounds_completed") == 3
        rss = row.get("peak_rss_bytes")
        out.append(
            {
                "setting": row["setting"],
                "setup_under_60_s": done and row["setup_s"] < GOAL_SETUP_S,
                "peak_rss_under_2_GB": rss is not None and rss < GOAL_RSS_BYTES,
                "three_rounds_done": done,
            }
        )
    return out


def markdown(result: dict[str, Any]) -> str:
    def met(ok: bool) -> str:
        return "met" if ok else "**not met**"

    lines = [
        "# Population scale: set-up and memory of 100 to 10,000 clients", "",
        f"Command: `{result['command']}`", "",
        f"Setting: {result['setting']}", "",
        "Set-up is engine/setup.py `build` (round 0's `setup_s` in timing.jsonl): data (load, "
        "partition, prior), model (load, the method's wrap), tokenize (token ids, shards, "
        "held-out set), planning (cost context, budgets, one plan per distinct budget, "
        "exclusions). Process: `fedfit run` from start to exit (imports, run folder, summary "
        "and plots included). Peak RSS: the subprocess's tree, sampled every 0.1 s.", "",
        "| setting | clients | examples / client | data | model | tokenize | planning | "
        "set-up | round-0 eval | 3 rounds | process | peak RSS | excluded | log lines |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row in result["runs"].values():
        rss = row.get("peak_rss_bytes")
        shown = f"{rss / 1e9:.2f} GB" if rss else "-"
        if row["rc"] != 0:
            lines.append(f"| {row['setting']} | {row['clients']:,} | failed (exit {row['rc']}) "
                         f"| | | | | | | | {row['process_s']:.0f} s | {shown} | | |")  # fmt: skip
            continue
        p, (lo, hi) = row["setup_parts_s"], row["examples_per_client"]
        lines.append(
            f"| {row['setting']} | {row['clients']:,} | {lo}-{hi} | {p['data']:.2f} s | "
            f"{p['model']:.2f} s | {p['tokenize']:.2f} s | {p['planning']:.2f} s | "
            f"{row['setup_s']:.2f} s | {row['round0_eval_s']:.2f} s | {row['rounds_s']:.1f} s | "
            f"{row['process_s']:.1f} s | {shown} | {row['excluded']:,} | {row['log_lines']:,} |"
        )
    lines += ["", f"Goals at {GOAL_CLIENTS:,} clients:", ""]
    for g in result["goals"]:
        lines.append(
            f"- {g['setting']}: set-up < {GOAL_SETUP_S:.0f} s {met(g['setup_under_60_s'])}; "
            f"peak RSS < 2 GB {met(g['peak_rss_under_2_GB'])}; "
            f"3 rounds {'done' if g['three_rounds_done'] else '**not done**'}"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)),
                        help="client counts, comma-separated")  # fmt: skip
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated, of {', '.join(SETTINGS)}")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="rerun sizes already measured")
    parser.add_argument("--quick", action="store_true", help="tiny-bert, one local step")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    settings = args.settings.split(",")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    out = Path("/tmp/population-quick") if args.quick else RESULTS / "population"
    runs_dir = RUNS.with_name("population-quick") if args.quick else RUNS
    runs_dir.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    old = json.loads(path.read_text()) if path.exists() and not args.quick else {}
    result = {
        "command": ".venv/bin/python benchmarks/population.py" + (" --quick" if args.quick else ""),
        "setting": "tweets iid, " + " ".join(COMMON + (QUICK if args.quick else [])),
        "runs": old.get("runs", {}),
    }
    for setting in settings:
        for n in sizes:
            key = f"{setting}/{n}"
            if key in result["runs"] and result["runs"][key]["rc"] == 0 and not args.force:
                log(f"{key}: measured already (--force reruns it)")
                continue
            log(f"{key}: running")
            row = result["runs"][key] = measure(setting, n, runs_dir, args.quick)
            log(f"{key}: set-up {row.get('setup_s')} s {row.get('setup_parts_s')}, 3 rounds "
                f"{row.get('rounds_s')} s, peak RSS {(row['peak_rss_bytes'] or 0) / 1e9:.2f} GB")  # fmt: skip
            # sizes in order, whatever order they were measured in
            result["runs"] = dict(
                sorted(result["runs"].items(),
                       key=lambda kv: (list(SETTINGS).index(kv[1]["setting"]), kv[1]["clients"]))
            )  # fmt: skip
            write(result, out)
    write(result, out)
    log(f"wrote {out.with_suffix('.md')}")


def write(result: dict[str, Any], out: Path) -> None:
    """population.json and population.md as they stand (after every run)."""
    result["goals"] = goals(result["runs"])
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))


if __name__ == "__main__":
    main()
