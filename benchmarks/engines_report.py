"""What benchmarks/engines.py makes of its measurements: achieved FLOP/s against the matmul
peak, the ratios with their goals, each engine's cost per round from the scales, the
consistency checks, and the markdown table and plot of a result.

Pure functions of the result dict that benchmarks/engines.py writes to JSON, so a saved
result can be re-rendered without running anything.
"""

from __future__ import annotations

import json
from typing import Any

GOALS = {  # ratio -> (goal, "<=" or ">="); fedfit issue 17
    "local/floor": (0.7, "<="),  # the round loop
    "local-fast/floor": (0.7, "<="),
    "flower/local": (1.6, ">="),  # end to end and the round loop
    "flower/local-fast": (1.6, ">="),
    "achieved/peak": (0.6, ">="),
    "executed/useful": (1.1, "<="),
}
PAIRS = (
    ("local", "floor"),
    ("local-fast", "floor"),
    ("local-fast", "local"),
    ("flower", "local"),
    ("flower", "local-fast"),
    ("ray", "local"),
)


def useful_flops(lengths: dict[str, int], per_length: dict[str, int]) -> int:
    """FLOPs on real tokens: sum over processed sequences of one-sequence step FLOPs f(len)."""
    return sum(count * per_length[length] for length, count in lengths.items())


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
    # fedfit's measured client FLOPs are what an engine executed (its padded batches); the
    # floor runs the local executor's batches.
    executed = {
        r["rounds"]: r["fedfit_flops"] for r in rows if r["engine"] == "local" and r["fedfit_flops"]
    }
    for r in rows:
        ran = r["fedfit_flops"] or executed.get(r["rounds"])
        if ran:
            r["executed_flops"] = ran
            r["executed_flops_loop"] = ran / r["train_s"]
        if r.get("client_updates"):
            r["clients_per_s_loop"] = r["client_updates"] / r["train_s"]
            r["clients_per_s_e2e"] = r["client_updates"] / r["wall_s"]
        r["rounds_per_hour"] = 3600 * r["rounds"] / r["wall_s"]
        if r.get("meter_s") is not None and r.get("client_s"):
            r["meter_share"] = r["meter_s"] / r["client_s"]
        lengths = lengths_by_rounds.get(r["rounds"])
        if per_length is None or lengths is None:
            continue
        r["useful_flops"] = useful_flops(lengths, per_length)
        if ran:
            r["executed_per_useful"] = ran / r["useful_flops"]
        r["achieved_flops_loop"] = r["useful_flops"] / r["train_s"]
        r["achieved_flops_e2e"] = r["useful_flops"] / r["wall_s"]
        if peak:
            r["peak_fraction_loop"] = r["achieved_flops_loop"] / peak
            r["peak_fraction_e2e"] = r["achieved_flops_e2e"] / peak
    ratios = []
    for rounds in sorted({r["rounds"] for r in rows}):
        at = {r["engine"]: r for r in rows if r["rounds"] == rounds}
        for num, den in PAIRS:
            if num in at and den in at:
                for what, key in (
                    ("round loop", "train_s"),
                    ("end to end", "wall_s"),
                    ("peak RSS", "peak_rss_sum_bytes"),
                    ("peak PSS", "peak_pss_sum_bytes"),
                ):
                    goal = GOALS.get(f"{num}/{den}") if key in ("train_s", "wall_s") else None
                    if not at[num].get(key) or not at[den].get(key):
                        continue
                    if den == "floor" and key != "train_s":
                        goal = None  # the goal against the floor is on the round loop
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
            if "executed_per_useful" in r and engine != "floor":
                ratios.append(
                    _ratio(
                        f"{engine} executed/useful",
                        "FLOPs",
                        rounds,
                        r["executed_per_useful"],
                        GOALS["executed/useful"],
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


def _x(x: float | None, digits: int = 2, unit: str = "x") -> str:
    return "-" if x is None else f"{x:.{digits}f}{unit}"


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
        "overstates what the tree really holds); peak PSS (sampled every 1 s): the same with each shared page split "
        "between the processes that share it (what the tree holds; fork's copy-on-write pages, "
        "the lanes' shared backbone, count once). Useful FLOPs: training steps on real tokens "
        "(no padding); achieved = useful FLOPs / time; executed GFLOP/s counts the padded "
        "batches every engine really runs (fedfit's measured client FLOPs).",
        "",
    ]
    sampling = [r["sampler_cpu_s"] / r["wall_s"] for r in rows if r.get("sampler_cpu_s")]
    if sampling:
        out += [f"The RSS sampler used at most {max(sampling):.1%} of one core during a run.", ""]
    if peak:
        rates = "; ".join(
            f"{tag}: " + ", ".join(f"n={r['n']} {r['gflops']:.1f}" for r in info["rows"])
            for tag, info in result["matmul"].items()
        )
        out += [f"fp32 matmul GFLOP/s ({rates}); peak taken as {peak / 1e9:.1f} GFLOP/s.", ""]
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
                    "; fedfit's cost meter instruments "
                    + ", ".join(
                        f"{r['engine']} {r['measured_steps']}"
                        for r in at
                        if r.get("measured_steps") is not None
                    )
                    + " of them (per process: each Ray/Flower actor and each lane has its own "
                    "meter; engine/meter.py)"
                )
            out += [line + ".", ""]
        header = (
            "engine | end to end | round loop | eval | outside | peak RSS (tree) | peak PSS (tree) "
            "| largest process | procs | GFLOP/s loop | GFLOP/s e2e | loop / peak | executed GFLOP/s loop "
            "| executed / useful FLOPs | client updates/s loop | client updates/s e2e | rounds/h "
            "| meter share of client time | accuracy | max abs diff vs ref | max abs update"
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
                    _mib(r.get("peak_pss_sum_bytes")),
                    _mib(r.get("peak_rss_single_bytes")),
                    r.get("processes_max", "-"),
                    _g(r.get("achieved_flops_loop")),
                    _g(r.get("achieved_flops_e2e")),
                    "-" if frac is None else f"{frac:.2f}",
                    _g(r.get("executed_flops_loop")),
                    _x(r.get("executed_per_useful")),
                    _x(r.get("clients_per_s_loop"), 3, ""),
                    _x(r.get("clients_per_s_e2e"), 3, ""),
                    f"{r['rounds_per_hour']:.0f}",
                    "-" if r.get("meter_share") is None else f"{r['meter_share']:.1%}",
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
