"""Every ``fedfit`` command in README.md's code blocks runs, shrunk to seconds.

The commands are parsed out of README.md (indented and fenced blocks; ``fedfit ...`` and
``.venv/bin/fedfit ...``, continuation lines joined, comments dropped), so a command added
there is tested with no change here. Each runs through ``fedfit.cli.main`` in a fresh folder
(``examples/`` linked into it, ``runs/`` written there) with ``--set`` overrides appended
that keep its method, data set, partition and options and shrink the sizes, as
tests/test_examples.py does: the tiny random model of the same family (a local checkpoint
folder stays), at most 4 clients with 16 examples each, one local step, one round. What a
command reads is made first: the run folders it names (a stopped one for ``--resume``) and,
for the "your own model and data" commands, README's own Python snippet (my-model,
reviews.csv). Commands other than fedfit's (``ray start``, ``flower-superlink``,
``flower-supernode``, ``flwr run``) are not parsed: ``fedfit flower local`` runs that same
Flower sequence.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fedfit.cli import main, parser
from fedfit.config import load_config
from fedfit.engine.experiment import run
from fedfit.models import ModelNotAvailable, sources
from tests.helpers import tiny_sizes

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
EXAMPLE = "examples/default.toml"  # the config of the run folders a command reads
# Commands that cannot run in a test, and why (matched as substrings of the command).
SKIPPED = {
    "--ray-address HEAD:6379": "HEAD:6379 stands for a Ray cluster's head node; joining an "
    "existing cluster is tests/engine/test_ray.py::test_existing_cluster_matches_local_executor",
}


def code_blocks(text: str) -> list[list[str]]:
    """The lines of each fenced (```) and indented (4 spaces, after a blank line) block."""
    blocks, lines, i, after_blank = [], text.splitlines(), 0, True
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = next(
                (j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines)
            )
            blocks.append(lines[i + 1 : end])
            i, after_blank = end + 1, False
        elif line.startswith("    ") and after_blank:
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            blocks.append([x[4:] for x in lines[i:end]])
            i, after_blank = end, True
        else:
            after_blank, i = not line.strip(), i + 1
    return blocks


def readme_commands() -> list[str]:
    """Every fedfit command line in README.md's code blocks: continuations joined, a
    trailing comment dropped, as the shell would split it (shlex.join)."""
    commands = []
    for block in code_blocks(README):
        for line in "\n".join(block).replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] in ("fedfit", ".venv/bin/fedfit"):
                commands.append(shlex.join(words))
    return commands


COMMANDS = readme_commands()


def python_snippet() -> str:
    """README's ``.venv/bin/python - <<'PY' ... PY`` script (it writes my-model and
    reviews.csv)."""
    match = re.search(r"python - <<'PY'\n(.*?)\nPY\n", README, re.S)
    assert match, "README.md lost its Python snippet"
    return match.group(1)


def shrink(argv: list[str]) -> list[str]:
    """``argv`` (without ``fedfit``) with --set overrides appended that shrink its run."""
    args = parser().parse_args(argv)
    if not hasattr(args, "set") or getattr(args, "resume", None):
        return argv  # report, compare, models; --resume takes the folder's own config
    config = load_config(args.config, args.set)
    data = config.data
    secure = config.server.secure_aggregation != "none"
    sets = [
        *tiny_sizes(config),
        f"data.num_clients={min(data.num_clients, 4)}",
        # SecAgg+ needs 3 clients per round (with 2, each learns the other's upload)
        f"data.clients_per_round={min(data.clients_per_round, 3 if secure else 2)}",
        f"data.min_examples={min(data.min_examples, 10)}",
    ]
    return [*argv, *(f"--set={s}" for s in sets)]


def make_inputs(argv: list[str], cwd: Path) -> None:
    """What the command reads: README's snippet output, and the run folders it names."""
    if any("my-model" in a or "reviews.csv" in a for a in argv):
        try:
            sources.minilm_l3_onnx()  # the snippet saves minilm-l3 as "your checkpoint"
        except ModelNotAvailable as err:
            pytest.skip(str(err))
        subprocess.run(
            [sys.executable, "-"], input=python_snippet(), text=True, cwd=cwd, check=True
        )
    args = parser().parse_args(argv)
    # compare RUNS..., report RUN, run --resume RUN
    named = getattr(args, "runs", None) or [
        getattr(args, "run", None) or getattr(args, "resume", None)
    ]
    for folder in filter(None, named):
        small = shrink(["run", EXAMPLE, "--set", f"run.name={Path(folder).name}"])
        sets = [s.removeprefix("--set=") for s in small[4:]]
        sets += [f"run.output_dir={Path(folder).parent}", f"run.name={Path(folder).name}"]
        if args.command == "run":  # --resume: a stopped run, killed after round 1 of 2
            run(load_config(EXAMPLE, [*sets, "run.rounds=2"]), stop_after=1)
        else:
            run(load_config(EXAMPLE, sets))


@pytest.mark.parametrize("command", COMMANDS, ids=COMMANDS)
def test_readme_command_runs(
    command: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for pattern, reason in SKIPPED.items():
        if pattern in command:
            pytest.skip(reason)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(command)[1:]  # drop fedfit / .venv/bin/fedfit
    make_inputs(argv, tmp_path)
    code = main(shrink(argv))
    assert code == 0, capsys.readouterr().err


def test_the_readme_commands_are_found() -> None:
    # the parse itself: both spellings, a continued line, a quoted --set, a comment dropped
    assert len(COMMANDS) >= 15, COMMANDS
    assert "fedfit report runs/default" in COMMANDS  # "# table + redraw the plots" dropped
    assert any(c.startswith(".venv/bin/fedfit run --set model.name=./my-model") for c in COMMANDS)
    prompt = shlex.split(next(c for c in COMMANDS if "data.prompt" in c))
    assert 'data.prompt="Tweet: {text} Sentiment:"' in prompt
    assert prompt[-1] == "method.name=fedmezo"  # its third line, joined
