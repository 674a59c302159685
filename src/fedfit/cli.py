"""``fedfit`` command line: run | central | plan | report | compare | methods | models | data."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fedfit.engine.executors import executor_names
from fedfit.errors import ConfigError

console = Console(stderr=True)

EPILOG = "Config keys: see examples/default.toml; every key can be overridden with --set."


def _metric(ev: dict[str, Any] | None) -> str | None:
    if not ev:
        return None
    return f"acc {ev['accuracy']:.3f}" if "accuracy" in ev else f"ppl {ev['perplexity']:.2f}"


def _progress_lines(label: str) -> tuple[Any, Any]:
    """Progress when stderr is not a terminal (a pipe, a log file, CI): one line per round
    with the evaluation when there is one, the elapsed time and an ETA."""
    import time

    t0 = time.perf_counter()
    first: list[int] = []

    def update(round_: int, total: int, ev: dict[str, Any] | None) -> None:
        elapsed = time.perf_counter() - t0
        if not first:
            first.append(round_)
        done = round_ - first[0]
        eta = f", ETA {elapsed / done * (total - round_):.0f} s" if done > 0 else ""
        metric = _metric(ev)
        console.print(
            f"{label}: round {round_}/{total}{', ' + metric if metric else ''}, "
            f"{elapsed:.0f} s{eta}",
            highlight=False,
        )

    return contextlib.nullcontext(), update


def _progress_bar(label: str) -> tuple[Any, Any]:
    if not console.is_terminal:
        return _progress_lines(label)
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("round {task.completed}/{task.total}"),
        TextColumn("{task.fields[metric]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )
    task_id = bar.add_task(label, total=None, metric="")

    def update(round_: int, total: int, ev: dict[str, Any] | None) -> None:
        metric = _metric(ev)
        if metric:
            bar.update(task_id, completed=round_, total=total, metric=metric)
        else:
            bar.update(task_id, completed=round_, total=total)

    return bar, update


def _final_line(run_dir: Path) -> None:
    from fedfit.engine.runfolder import RunFolder

    summary = RunFolder(run_dir).summary()
    final = summary.get("final") or {}
    start = summary.get("start") or {}
    if "accuracy" in final:
        base = summary.get("majority_baseline")
        console.print(
            f"[bold green]final accuracy {final['accuracy']:.4f}[/] "
            f"(round 0: {start.get('accuracy', float('nan')):.4f}; majority-class baseline "
            f"{base:.4f}) after {summary['rounds_completed']} rounds, {summary['wall_s']:.0f} s"
        )
        if summary.get("prior_loss") is not None:
            console.print(
                f"eval loss {final['loss']:.4f} (round 0: {start.get('loss', float('nan')):.4f};"
                f" class-prior cross-entropy {summary['prior_loss']:.4f})"
                + ("" if summary.get("learned") is not False else ": it did not learn")
            )
        _central_line(run_dir, "accuracy")
    elif "perplexity" in final:
        console.print(
            f"[bold green]final perplexity {final['perplexity']:.2f}[/] "
            f"(round 0: {start.get('perplexity', float('nan')):.2f})"
        )
        _central_line(run_dir, "perplexity")
    console.print(f"results in {run_dir}")


def _central_line(run_dir: Path, metric: str) -> None:
    """The centralised reference beside a federated result: read from the sibling
    ``NAME-central`` run when one exists (it takes as long as the federated run, so it is
    not rerun every time), otherwise the command that makes it."""
    from fedfit.engine.runfolder import RunFolder

    if run_dir.name.endswith("-central"):
        return
    central = RunFolder(run_dir.parent / f"{run_dir.name}-central")
    if central.has_summary():
        final = central.summary().get("final") or {}
        if metric in final:
            console.print(
                f"centralised reference (same model, method and step budget, pooled data): "
                f"{metric} {final[metric]:.4f} ({central.path})"
            )
            return
    console.print(
        f"centralised reference: not run yet; `fedfit central {run_dir}/config.toml` "
        f"writes {run_dir}-central (README.md records the measured one)"
    )


def _executor_changes(args: argparse.Namespace) -> dict[str, Any]:
    """[run] keys from --executor, --workers and --ray-address (those given)."""
    changes = {
        key: value
        for key, value in (
            ("executor", args.executor),
            ("workers", args.workers),
            ("ray_address", args.ray_address),
        )
        if value is not None
    }
    if "executor" not in changes and {"workers", "ray_address"} & set(changes):
        changes["executor"] = "ray"  # --workers / --ray-address only mean something on Ray
    return changes


def cmd_run(args: argparse.Namespace) -> int:
    from fedfit.config import load_config
    from fedfit.engine.experiment import resume_run, run
    from fedfit.engine.runfolder import RunFolder

    changes = _executor_changes(args)
    if args.resume:
        if args.config or args.set:
            raise SystemExit("--resume takes the run folder's own config; drop CONFIG and --set")
        args.run_dir = Path(args.resume)
        if args.run_dir.is_dir():  # a missing folder is resume_run's own error
            _check_writable(args.run_dir, "--resume", make=False)
        bar, update = _progress_bar(f"resume {Path(args.resume).name}")
        with bar:
            run_dir = resume_run(args.resume, changes, progress=update)
    else:
        config = load_config(args.config, args.set)
        if changes:
            config = dataclasses.replace(config, run=dataclasses.replace(config.run, **changes))
        args.run_dir = RunFolder.of(config).path
        _check_writable(args.run_dir, "run.output_dir")
        bar, update = _progress_bar(f"{config.method.name} on {config.data.name}")
        with bar:
            run_dir = run(config, overwrite=args.overwrite, progress=update)
    _final_line(run_dir)
    if args.central:
        return _central(run_dir / "config.toml", [], overwrite=args.overwrite)
    return 0


def _central(config_path: str | Path | None, overrides: Sequence[str], overwrite: bool) -> int:
    from fedfit.config import load_config
    from fedfit.engine.central import central_config, run_central
    from fedfit.engine.runfolder import RunFolder

    config = load_config(config_path, overrides)
    _check_writable(RunFolder.of(central_config(config)).path, "run.output_dir")
    bar, update = _progress_bar(f"central {config.method.name} on {config.data.name}")
    with bar:
        run_dir = run_central(config, overwrite=overwrite, progress=update)
    _final_line(run_dir)
    return 0


def _check_writable(folder: Path, key: str, make: bool = True) -> None:
    """A ConfigError naming ``key`` and the path now, rather than an OSError traceback once
    the run has loaded everything: ``folder`` is made (as the run would make it, unless
    ``make`` is False) and a scratch file is created in it and removed. (A full disk usually
    still lets a small file be created: that case is the OSError handler of :func:`main`.)"""
    import tempfile

    try:
        if make:
            folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        elsewhere = (
            "write elsewhere with --set run.output_dir=PATH"
            if make
            else "copy the folder somewhere writable and resume the copy"
        )
        reason = _os_reason(err, with_path=err.filename != str(folder))
        raise ConfigError(
            f"{key}: cannot write the run folder {folder} ({reason}); make it writable, or "
            f"{elsewhere}"
        ) from err


def _os_reason(err: OSError, with_path: bool = True) -> str:
    """``Permission denied [EACCES] at /the/path``: the errno text, its name and the path."""
    name = errno.errorcode.get(err.errno or -1)
    text = f"{err.strerror or err}" + (f" [{name}]" if name else "")
    return text + (f" at {err.filename}" if err.filename and with_path else "")


def cmd_central(args: argparse.Namespace) -> int:
    return _central(args.config, args.set, args.overwrite)


def cmd_plan(args: argparse.Namespace) -> int:
    from fedfit.config import load_config
    from fedfit.engine.tier_table import plan_rows
    from fedfit.units import format_bytes, format_flops

    config = load_config(args.config, args.set)
    auto_model = config.model.name == "auto"
    choice_config = config
    if auto_model:
        from fedfit.engine.tier_table import choice_reference, resolve_model

        choice_config = choice_reference(config)  # the choice table as resolve_model saw it
        config = resolve_model(config)
    rows = plan_rows(config, tuple(args.methods or ()))
    out = Console()
    for tier in dict.fromkeys(r.tier for r in rows):
        group = [r for r in rows if r.tier == tier]
        budget = group[0].budget
        table = Table(
            title=f"tier {tier}: {group[0].num_devices} devices, budget {budget}",
            caption=f"predicted on a {group[0].ctx.batch_size} x {group[0].ctx.seq_len} batch, "
            f"{group[0].ctx.steps} steps/round, +{config.devices.margin:.0%} margin",
        )
        for col in ("method", "trains", "peak memory", "FLOPs / round", "upload", "devices"):
            table.add_column(col)
        for r in group:
            fits = r.plan.ok
            trains = r.plan.describe() if fits else f"[red]excluded: {r.plan.reason}[/]"
            if fits and r.plan.passed:  # method "auto": why the stronger candidates did not fit
                trains += "".join(f"\n[dim]not {escape(why)}[/]" for why in r.plan.passed)
            table.add_row(
                r.method,
                trains,
                format_bytes(r.memory),
                format_flops(r.flops),
                format_bytes(r.upload),
                f"{r.num_devices if fits else 0}/{r.num_devices}",
            )
        out.print(table)
    if config.method.name == "layers" or args.choose_model or auto_model:
        _print_model_choice(choice_config, out)
    return 0


def _print_model_choice(config: Any, out: Console) -> None:
    from fedfit.engine.tier_table import choose_model

    picked, choices, why = choose_model(config)
    table = Table(title="model choice for layer fine-tuning (Pfeiffer et al.)")
    tiers = list(choices[0].depth_by_tier)
    for col in ("model", "blocks", *(f"depth: {t}" for t in tiers), "mean depth", "excluded"):
        table.add_column(col)
    for c in choices:
        table.add_row(
            c.model,
            str(c.num_blocks),
            *(str(c.depth_by_tier[t]) for t in tiers),
            f"{c.mean_depth:.2f}",
            str(c.excluded),
        )
    out.print(table)
    out.print(f"picked {why}")


def cmd_report(args: argparse.Namespace) -> int:
    from fedfit.report import print_report

    print_report(args.run)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fedfit.report import compare_runs

    compare_runs(args.runs, Path(args.out))  # prints the table and the plot paths
    return 0


def _options_text(options_cls: type) -> str:
    parts = [
        f"{f.name}={f.default!r}"
        for f in dataclasses.fields(options_cls)
        if f.default is not dataclasses.MISSING
    ]
    return ", ".join(parts) or "-"


def cmd_methods(args: argparse.Namespace) -> int:
    from fedfit.algorithms import ALGORITHMS

    table = Table(title="fedfit methods (\\[method] name = ...)")
    for col in ("name", "description", "options (defaults)"):
        table.add_column(col)
    for name in sorted(ALGORITHMS):
        entry = ALGORITHMS[name]
        table.add_row(name, entry.description, _options_text(entry.options))
    Console().print(table)
    return 0


def cmd_inspect(path: str) -> int:
    """``fedfit models --inspect PATH``: a local checkpoint's layout and the methods for it."""
    from fedfit.algorithms import ALGORITHMS
    from fedfit.models.checkpoints import inspect_checkpoint

    ckpt = inspect_checkpoint(path)
    cfg = ckpt.config
    console = Console()
    console.print(f"[bold]{ckpt.folder}[/]")
    for key, value in (
        ("family", f"{ckpt.family} (model_type {cfg['model_type']!r})"),
        ("tasks", ", ".join(ckpt.tasks)),
        ("layers", cfg.get("num_hidden_layers")),
        ("hidden size", cfg.get("hidden_size")),
        ("vocabulary", cfg.get("vocab_size")),
        ("max positions", cfg.get("max_position_embeddings")),
        ("parameters", f"{ckpt.num_params:,} (backbone, no task head)"),
        ("weights", ckpt.weights),
    ):
        console.print(f"  {key:<14} {value}")
    for task in ckpt.tasks:
        names = [
            n for n, e in sorted(ALGORITHMS.items())
            if task in getattr(e.cls, "tasks", ("classification", "lm"))
        ]  # fmt: skip
        console.print(f"  methods for {task}: {', '.join(names)}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from fedfit.models import list_models

    if args.inspect:
        return cmd_inspect(args.inspect)

    table = Table(title="fedfit model zoo (\\[model] name = ...)")
    for col in ("name", "family", "tasks", "layers", "hidden", "params", "source"):
        table.add_column(col)
    for m in list_models():
        table.add_row(
            m.name,
            m.family,
            ", ".join(m.tasks),
            str(m.num_layers),
            str(m.hidden_size),
            f"{m.num_params / 1e6:.1f}M",
            m.source,
        )
    Console().print(table)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from collections import Counter

    from fedfit.data import list_datasets, load_dataset

    table = Table(title="fedfit datasets (\\[data] name = ...)")
    for col in ("name", "task", "train", "test", "labels / groups", "source"):
        table.add_column(col)
    for info in list_datasets():
        try:
            ds = load_dataset(info.name)
        except Exception as err:  # a missing package: show how to get it, keep listing
            table.add_row(info.name, info.task, "-", "-", f"[red]{err}[/]", info.install)
            continue
        if ds.train_labels is not None:
            counts = Counter(ds.train_labels)
            detail = ", ".join(f"{ds.label_names[k]} {counts[k]}" for k in sorted(counts))
        else:
            detail = f"{len(set(ds.train_groups or []))} groups"
        table.add_row(
            info.name,
            info.task,
            str(len(ds.train_texts)),
            str(len(ds.test_texts)),
            detail,
            info.source,
        )
    Console().print(table)
    return 0


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML config (defaults when omitted)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=1e-3 (repeatable)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="fedfit",
        description="Federated fine-tuning of language models on small devices.",
        epilog=EPILOG,
    )
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a federated experiment", epilog=EPILOG)
    _add_config_args(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its folder")
    p.add_argument(
        "--central",
        action="store_true",
        help="afterwards, also run the centralised reference with the same step budget",
    )
    p.add_argument(
        "--executor",
        choices=executor_names(),
        help="where clients train: in this process (local, default), on Ray actors (ray) or "
        "through Flower's simulation runtime (flower) (run.executor)",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="Ray (or Flower simulation) actors, each with its own model (run.workers, "
        "default 2; implies --executor ray unless flower is given); torch threads per actor: "
        "run.threads, or 1",
    )
    p.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="join an existing Ray cluster (run.ray_address; implies --executor ray); default: "
        "start a local Ray instance and stop it at the end",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "central",
        help="centralised reference: pooled data, same model and step budget",
        epilog=EPILOG,
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_central)

    p = sub.add_parser(
        "plan",
        help="per device tier: what each method would train, predicted cost vs budget",
        epilog=EPILOG,
    )
    _add_config_args(p)
    p.add_argument(
        "--choose-model",
        action="store_true",
        help="also pick the zoo model for layer fine-tuning (always shown for method layers)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        metavar="NAME",
        help="methods to compare besides the configured one (default: layers lora fedavg)",
    )
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("report", help="print a run's table and redraw its plots")
    p.add_argument("run", help="run folder, e.g. runs/default")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="overlay several runs in one plot")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", default="runs/compare", help="folder for the plots")
    p.set_defaults(func=cmd_compare)

    sub.add_parser("methods", help="list the methods").set_defaults(func=cmd_methods)
    p = sub.add_parser("models", help="list the model zoo, or inspect a local checkpoint")
    p.add_argument("--inspect", metavar="PATH", help="a local Hugging Face checkpoint folder")
    p.set_defaults(func=cmd_models)
    sub.add_parser("data", help="list the datasets").set_defaults(func=cmd_data)

    p = sub.add_parser(
        "flower",
        help="deploy a run through Flower (SuperLink + SuperNodes)",
        description="`app` writes a Flower App folder for `flwr run` and prints the command "
        "sequence of a deployment; `local` runs that sequence on 127.0.0.1 (a SuperLink and "
        "one SuperNode per client, as separate processes), waits for the run and stops them. "
        "(Flower's simulation runtime: fedfit run --executor flower.)",
    )
    p.add_argument("action", choices=("app", "local"))
    _add_config_args(p)
    p.add_argument(
        "--dir",
        default="flower-app",
        help="app: the folder to write; local: where the app, logs and FLWR_HOME go",
    )
    p.set_defaults(func=cmd_flower)
    return top


def cmd_flower(args: argparse.Namespace) -> int:
    from fedfit.config import load_config
    from fedfit.engine.executors.flower import (
        deploy_commands,
        deploy_local,
        deployed_folder,
        write_app,
    )

    config = load_config(args.config, args.set)
    if args.action == "app":
        app_dir = write_app(config, args.dir, overwrite_run=args.overwrite)
        print(f"wrote {app_dir / 'pyproject.toml'}; a deployment on this machine:")
        port = 9092
        node_ports = [9094 + k for k in range(config.data.num_clients)]
        for command in deploy_commands(app_dir, port, node_ports, "fedfit"):
            print(f"  {command}")
        print(
            f"with the SuperLink connection in $FLWR_HOME/config.toml (default ~/.flwr):\n"
            f'  [superlink]\n  default = "fedfit"\n  [superlink.fedfit]\n'
            f'  address = "127.0.0.1:{port}"\n  insecure = true'
        )
        return 0
    args.run_dir = deployed_folder(config).path
    _check_writable(args.run_dir, "run.output_dir")
    run_dir = deploy_local(config, args.dir, overwrite=args.overwrite)
    _final_line(run_dir)
    return 0


def _quiet_libraries() -> None:
    """Keep the terminal for fedfit's own progress: no per-load bars or deprecation chatter
    from transformers/peft (their errors still show)."""
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def _error(label: str, text: str) -> None:
    """One line on stderr: the message is escaped (a ``[run]`` in it is text, not markup)
    and not wrapped at the terminal's width."""
    console.print(f"[bold red]{label}:[/] {escape(text)}", soft_wrap=True, highlight=False)


# errno values that mean "not allowed to write there": the user can fix them (exit 2); any
# other OSError (a full disk, an I/O error) stopped a run that had started (exit 1).
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)
_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # a full disk, a full quota


def _os_error_text(err: OSError, run_dir: Path | None) -> str:
    """What failed, where, and what to do. A failed write to an open file carries no file
    name, so the run folder stands for it; a full disk keeps the rounds already written."""
    where = err.filename or run_dir or "a file"
    text = f"{where}: {_os_reason(err, with_path=False)}"
    if err.errno in _FULL:
        text += (
            "; free some space, or move run.output_dir (or fedfit's cache, $FEDFIT_CACHE) "
            "to another disk"
        )
    elif err.errno in _DENIED:
        text += "; check that path's permissions (runs go elsewhere with --set run.output_dir=PATH)"
    if run_dir is not None and (run_dir / "checkpoint.pt").is_file():
        text += (
            f"; the rounds finished so far are kept in {run_dir}: continue with "
            f"fedfit run --resume {run_dir}"
        )
    return text


def _write_traceback(err: BaseException, run_dir: Path | None) -> Path | None:
    """The full traceback of an unexpected error, in ``run_dir/traceback.txt`` when the run
    folder was made, else in a new temporary file; None when neither can be written."""
    import tempfile
    import traceback

    text = "".join(traceback.format_exception(err))
    if run_dir is not None and (run_dir / "config.toml").is_file():
        with contextlib.suppress(OSError):
            (run_dir / "traceback.txt").write_text(text)
            return run_dir / "traceback.txt"
    try:
        fd, name = tempfile.mkstemp(prefix="fedfit-traceback-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except OSError:
        return None
    return Path(name)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``fedfit`` command. Exit codes: 0 done; 2 a named error the user can fix (config,
    data, files, a missing package), one line naming the key or path; 1 a run that had to stop
    (diverged, disk full: its folder is kept) or an unexpected error, whose one line names the
    file holding the full traceback. ``FEDFIT_DEBUG=1`` lets every exception through."""
    from fedfit.errors import DatasetNotAvailable, RunStopped
    from fedfit.models import ModelNotAvailable

    args = parser().parse_args(argv)
    _quiet_libraries()
    if os.environ.get("FEDFIT_DEBUG"):
        return int(args.func(args))
    try:
        return int(args.func(args))
    except (
        ConfigError,
        DatasetNotAvailable,
        ModelNotAvailable,
        FileNotFoundError,
        FileExistsError,
        ValueError,
    ) as err:
        _error("error", str(err))
        return 2
    except RunStopped as err:
        _error("run stopped", str(err))
        return 1
    except OSError as err:
        run_dir = getattr(args, "run_dir", None)
        _error("error", _os_error_text(err, run_dir))
        return 2 if err.errno in _DENIED else 1
    except Exception as err:
        where = _write_traceback(err, getattr(args, "run_dir", None))
        shown = f"full traceback in {where}" if where else "FEDFIT_DEBUG=1 shows the traceback"
        _error("internal error", f"{type(err).__name__}: {err} ({shown}; please report it)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
