"""Every failure a user can cause is a named error: one line on stderr naming the key or the
path and what to do, exit code 2 (1 for a run that had to stop), never a traceback. Each test
runs the real CLI entry (``fedfit.cli.main``) on tiny-bert, but the huge-text one, which
times the loader and the tokenizer themselves."""

from __future__ import annotations

import csv
import errno
import gzip
import json
import os
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from fedfit.cli import main
from fedfit.engine.runfolder import ROUNDS, RunFolder, dumps
from tests.helpers import TINY_RUN, read_rows

# A local CSV run on tiny-bert in seconds: 4 clients of >= 5 rows, one round.
LOCAL_RUN = [
    "model.name=tiny-bert",
    "model.max_length=32",
    "data.partition=iid",
    "data.num_clients=4",
    "data.clients_per_round=2",
    "data.min_examples=5",
    "run.rounds=1",
    "train.local_steps=1",
    "train.batch_size=4",
]


def fedfit(
    capsys: pytest.CaptureFixture[str], *args: str, sets: Sequence[str] = ()
) -> tuple[int, str]:
    """``fedfit ARGS --set S ...``: its exit code and its stderr."""
    code = main([*args, *(f"--set={s}" for s in sets)])
    return code, capsys.readouterr().err


def error_line(err: str, label: str = "error") -> str:
    """The one ``label: ...`` line of a failed command (and no traceback beside it)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"{label}:")]
    assert len(lines) == 1, err
    return lines[0]


def write_reviews(path: Path, labels: list[str], texts: list[str] | None = None) -> Path:
    texts = texts or [
        f"the film was {'great' if y == 'pos' else 'dull'} {i}" for i, y in enumerate(labels)
    ]
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("text", "label"), *zip(texts, labels, strict=True)])
    return path


# ----------------------------------------------------------------- a. the output folder


def refuse_writes_in(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``folder`` read-only (mode 0555). Root ignores permission bits, so for root the two
    calls that create files and folders refuse, as the kernel would for a user, to create
    anything inside ``folder``."""
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() != 0:
        return
    real_mkdir, real_open = os.mkdir, os.open

    def refuse(path: Any) -> None:
        target = Path(os.fsdecode(path)).absolute()
        if folder in target.parents:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

    def mkdir(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        refuse(path)
        real_mkdir(path, mode, dir_fd=dir_fd)

    def open_(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            refuse(path)
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)


def test_read_only_output_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "readonly"
    refuse_writes_in(folder, monkeypatch)
    code, err = fedfit(capsys, "run", sets=[*TINY_RUN, f"run.output_dir={folder}"])
    assert code == 2
    line = error_line(err)
    assert line == (
        f"error: run.output_dir: cannot write the run folder {folder / 'default'} "
        "(Permission denied [EACCES]); make it writable, or write elsewhere with "
        "--set run.output_dir=PATH"
    )


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_disk_full_mid_run_keeps_the_rounds_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last round's row meets a full disk (/dev/full: the write fails with ENOSPC and,
    like any write to an open file, no file name): exit 1, the run folder named, rounds 0-1
    and their checkpoint kept, and the printed --resume finishes the run."""
    append = RunFolder.append

    def append_to_full_disk(self: RunFolder, name: str, row: dict[str, Any]) -> None:
        if name == ROUNDS and row["round"] == 2:
            with open("/dev/full", "a") as f:
                f.write(dumps(row) + "\n")
        append(self, name, row)

    monkeypatch.setattr(RunFolder, "append", append_to_full_disk)
    data = write_reviews(tmp_path / "reviews.csv", ["pos", "neg"] * 40)
    sets = [*LOCAL_RUN, "run.rounds=2", f"data.path={data}", f"run.output_dir={tmp_path}"]
    code, err = fedfit(capsys, "run", sets=sets)
    run_dir = tmp_path / "default"
    assert code == 1
    assert error_line(err) == (
        f"error: {run_dir}: No space left on device [ENOSPC]; free some space, or move "
        "run.output_dir (or fedfit's cache, $FEDFIT_CACHE) to another disk; the rounds "
        f"finished so far are kept in {run_dir}: continue with fedfit run --resume {run_dir}"
    )
    assert [r["round"] for r in read_rows(run_dir / ROUNDS)] == [0, 1]
    assert RunFolder(run_dir).load_checkpoint()[0].round == 1

    monkeypatch.setattr(RunFolder, "append", append)  # space freed
    assert main(["run", "--resume", str(run_dir)]) == 0
    assert [r["round"] for r in read_rows(run_dir / ROUNDS)] == [0, 1, 2]


def test_unreadable_data_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # any OSError that names its file: the file, the errno, what to check
    data = write_reviews(tmp_path / "reviews.csv", ["pos", "neg"] * 40)
    read_bytes = Path.read_bytes

    def denied(self: Path) -> bytes:
        if self == data:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    sets = [*LOCAL_RUN, f"data.path={data}", f"run.output_dir={tmp_path}"]
    code, err = fedfit(capsys, "run", sets=sets)
    assert code == 2
    assert error_line(err) == (
        f"error: {data}: Permission denied [EACCES]; check that path's permissions (runs go "
        "elsewhere with --set run.output_dir=PATH)"
    )


# ----------------------------------------------------------------- b. model.max_length


def test_max_length_above_the_position_embeddings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_data(*args: object) -> None:
        raise AssertionError("data loaded before model.max_length was checked")

    monkeypatch.setattr("fedfit.engine.setup.load_configured", no_data)
    sets = [*TINY_RUN, f"run.output_dir={tmp_path}", "model.max_length=512"]
    code, err = fedfit(capsys, "run", sets=sets)
    assert code == 2
    assert error_line(err) == (
        "error: model.max_length: 512 is more than the 128 positions of model 'tiny-bert' "
        "(max_position_embeddings in its config); set model.max_length <= 128"
    )
    # a local checkpoint folder: its config.json says (read before anything else of it)
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "bert", "max_position_embeddings": 64})
    )
    code, err = fedfit(
        capsys, "run", sets=[*sets[:-1], f"model.name={folder}", "model.max_length=65"]
    )
    assert code == 2
    assert "model.max_length: 65 is more than the 64 positions of model" in error_line(err)


# ----------------------------------------------------------------- c. binary data files

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01"


@pytest.mark.parametrize(
    ("name", "content", "kind"),
    [
        (
            "reviews.csv",
            gzip.compress(b"text,label\nfine,pos\n"),
            "gzip-compressed: decompress it first",
        ),
        ("reviews.csv", PNG, "a PNG image"),
        ("reviews.csv", b"text,label\n\x00\x01\x02,pos\n", "a binary file: it holds NUL bytes"),
        ("reviews.csv", "text,label\nfine,pos\n".encode("utf-16"), "UTF-16 text; save it as UTF-8"),
    ],
    ids=["gzip", "png", "nul", "utf16"],
)
def test_binary_file_given_as_csv(
    name: str, content: bytes, kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    sets = [*LOCAL_RUN, f"run.output_dir={tmp_path}", f"data.path={path}"]
    code, err = fedfit(capsys, "run", sets=sets)
    assert code == 2
    assert error_line(err) == f"error: {path}: not a text CSV file (it is {kind})"


def test_csv_whose_header_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("texte,étiquette\nbien,pos\n".encode("latin-1"))
    code, err = fedfit(
        capsys, "run", sets=[*LOCAL_RUN, f"run.output_dir={tmp_path}", f"data.path={path}"]
    )
    assert code == 2
    assert error_line(err) == (
        f"error: {path}: not a text CSV file: its header row is not UTF-8 text (first: byte "
        "0xe9 at offset 6, line 1); save the file as UTF-8"
    )


# ----------------------------------------------------------------- d. "NaN" labels

MISSING = ["NaN", "nan", "null", "", "  NULL ", "<NA>", "N/A"]


def test_nan_labels_are_missing_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = ["pos", "neg"] * 40 + MISSING
    path = write_reviews(tmp_path / "reviews.csv", labels)
    sets = [*LOCAL_RUN, f"run.output_dir={tmp_path}", f"data.path={path}"]

    code, err = fedfit(capsys, "run", sets=sets)  # data.bad_rows = "error": named rows
    assert code == 2
    assert error_line(err) == (
        f"error: {path}: 7 bad rows of 87: 7 with no label in column 'label' (line 82, line "
        '83, line 84, line 85, line 86, ...). Fix the file, or set data.bad_rows = "skip" to '
        "drop them (counted and logged)"
    )

    code, err = fedfit(capsys, "run", "--overwrite", sets=[*sets, "data.bad_rows=skip"])
    assert code == 0, err
    assert f"fedfit data: {path}: skipped 7 of 87 rows: 7 with no label in column 'label'" in err
    summary = RunFolder(tmp_path / "default").summary()
    assert summary["labels"] == ["neg", "pos"]  # no "NaN" class


# ----------------------------------------------------------------- e. huge texts


def test_a_10mb_row_is_cut_before_the_tokenizer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedfit.data import load_local, tokenize
    from fedfit.data.config import DataConfig
    from fedfit.data.tokens import CHARS_PER_TOKEN
    from fedfit.models import load_model

    monkeypatch.setenv("FEDFIT_CACHE", str(tmp_path / "cache"))
    huge = "the film was great but far too long " * 300_000  # 10.8 MB
    path = write_reviews(
        tmp_path / "reviews.csv", ["pos", "neg", "pos", "neg"], [huge, "dull", "fine", "bad"]
    )
    _, tokenizer = load_model("tiny-bert", "classification")

    t0 = time.perf_counter()
    data = load_local(
        DataConfig(
            path=str(path), num_clients=1, clients_per_round=1, partition="iid", min_examples=1
        ),
        0,
    )
    texts = [*data.train_texts, *data.test_texts]
    assert huge in texts
    ids = tokenize(texts, tokenizer, max_length=32)
    assert time.perf_counter() - t0 < 5.0  # the whole text through the tokenizer takes longer

    by_hand = tokenizer(huge[: CHARS_PER_TOKEN * 32], truncation=True, max_length=32)["input_ids"]
    assert ids[texts.index(huge)].tolist() == by_hand
    assert len(by_hand) == 32 and by_hand[-1] == tokenizer.sep_token_id


# ----------------------------------------------------------------- f. unexpected errors


def test_internal_error_is_one_line_and_a_traceback_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    class Broken:
        def run(self, job: object) -> None:
            raise RuntimeError("the executor broke")

    monkeypatch.setattr("fedfit.engine.experiment.make_executor", lambda *a, **k: Broken())
    code, err = fedfit(capsys, "run", sets=[*TINY_RUN, f"run.output_dir={tmp_path}"])
    assert code == 1
    where = tmp_path / "default" / "traceback.txt"  # the run folder was made: it goes there
    assert error_line(err, "internal error") == (
        f"internal error: RuntimeError: the executor broke (full traceback in {where}; "
        "please report it)"
    )
    assert "Traceback" in where.read_text() and "the executor broke" in where.read_text()

    # no run folder (another command): a temporary file
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def broken_report(run: str) -> None:
        raise KeyError("final")

    monkeypatch.setattr("fedfit.report.print_report", broken_report)
    code, err = fedfit(capsys, "report", str(tmp_path / "default"))
    assert code == 1
    line = error_line(err, "internal error")
    match = re.fullmatch(
        r"internal error: KeyError: 'final' \(full traceback in (\S+); please report it\)", line
    )
    assert match, line
    assert Path(match.group(1)).parent == tmp_path
    assert "KeyError: 'final'" in Path(match.group(1)).read_text()


def test_missing_package_is_a_named_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedfit.errors import DatasetNotAvailable

    def missing(*args: object) -> None:
        raise DatasetNotAvailable("dataset 'tweets' needs: pip install tweet-eval-data")

    monkeypatch.setattr("fedfit.engine.setup.load_configured", missing)
    code, err = fedfit(capsys, "run", sets=[*TINY_RUN, f"run.output_dir={tmp_path}"])
    assert code == 2
    assert error_line(err) == "error: dataset 'tweets' needs: pip install tweet-eval-data"


def test_message_is_printed_as_is_not_as_markup(capsys: pytest.CaptureFixture[str]) -> None:
    # rich would read "[/]" as a closing tag (and fail) and drop "[bold]"
    code, err = fedfit(capsys, "run", sets=["train.lr=[/]", "run.name=x"])
    assert code == 2
    assert error_line(err) == "error: train.lr: expected a number, got '[/]'"
    code, err = fedfit(capsys, "run", sets=["train.optimizer=[bold]"])
    assert code == 2
    assert "'[bold]' is not one of 'sgd', 'adamw', 'adafactor'" in error_line(err)
