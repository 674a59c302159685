"""Fuzzing (hypothesis): bad configs and corrupted data files give named errors, never a
traceback.

Configs are drawn from the fields of fedfit.config's sections and of every registered
method's options dataclass (so a new key is fuzzed with no change here): an unknown key or a
value of the wrong type is a ``ConfigError`` naming the key, and through ``fedfit run`` exit
code 2 with one ``error:`` line; any value of the right type (out of range, NaN, huge) gives a
Config or a ``ConfigError``, nothing else. Data files (random bytes, truncated or corrupted
CSV / JSONL / Parquet, wrong columns) load or raise ``DataError``; through the CLI, exit 2.

Example counts are small (the file runs in well under a minute; ``FEDFIT_FUZZ_EXAMPLES=2000``
searches longer) and nothing is stored (``database=None``): a failure prints the falsifying
example to paste into ``@example``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedfit.algorithms import ALGORITHMS
from fedfit.cli import main
from fedfit.config import SECTIONS, Config, ConfigError, from_dict, load_config
from fedfit.data import DataError, TextDataset, load_local
from fedfit.data.config import DataConfig

FUZZ = settings(
    max_examples=int(os.environ.get("FEDFIT_FUZZ_EXAMPLES", "40")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def fields_of(cls: type) -> dict[str, Any]:
    """A config dataclass's field names and their type annotations."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


SECTION_FIELDS = {name: fields_of(cls) for name, cls in SECTIONS.items()}
METHOD_FIELDS = {name: fields_of(entry.options) for name, entry in ALGORITHMS.items()}
# Text TOML can carry (no surrogates or astral characters: json.dumps would write them as
# surrogate escapes, which TOML has not).
TEXT = st.text(st.characters(max_codepoint=0xFFFF, codec="utf-8"), max_size=12)
NAME = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True)


def values_of(annotation: Any) -> st.SearchStrategy[Any]:
    """Values of the field's own type, in range or not: edges, huge, NaN, infinities."""
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.sampled_from([0, 1, -1, 2, 3, 10**6]) | st.integers(-(2**63), 2**63 - 1)
    if annotation is float:
        return (
            st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 1e-12, 1e12])
            | st.floats(allow_nan=True, allow_infinity=True)
            | st.integers(-10, 10)
        )
    if annotation is str:
        return TEXT
    if typing.get_origin(annotation) is tuple:
        return st.lists(values_of(typing.get_args(annotation)[0]), max_size=3)
    raise AssertionError(f"no strategy for {annotation!r}: add one")


def wrong_values(annotation: Any) -> st.SearchStrategy[Any]:
    """Values no field of this type accepts (an int is a float, nothing else converts)."""
    lists = st.lists(st.integers(), min_size=1, max_size=2)
    if annotation is bool:
        return st.integers() | TEXT | st.floats()
    if annotation is int:
        return st.floats() | st.booleans() | TEXT | lists
    if annotation is float:
        return st.booleans() | TEXT | lists
    if annotation is str:
        return st.integers() | st.floats() | st.booleans() | lists
    if typing.get_origin(annotation) is tuple:
        inner = typing.get_args(annotation)[0]
        return st.integers() | st.booleans() | st.lists(wrong_values(inner), min_size=1, max_size=2)
    raise AssertionError(f"no strategy for {annotation!r}: add one")


@st.composite
def unknown_key(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """A raw config with one key its section does not have, and that key's name."""
    section = draw(st.sampled_from([*SECTION_FIELDS, "method"]))
    if section == "method":
        method = draw(st.sampled_from(sorted(METHOD_FIELDS)))
        key = draw(NAME.filter(lambda k: k not in METHOD_FIELDS[method] and k != "name"))
        return {"method": {"name": method, key: draw(st.integers())}}, f"method.{key}"
    key = draw(NAME.filter(lambda k: k not in SECTION_FIELDS[section]))
    return {section: {key: draw(st.integers())}}, f"{section}.{key}"


@st.composite
def wrong_type(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """A raw config with one value of the wrong type, and its key."""
    section = draw(st.sampled_from([*SECTION_FIELDS, "method"]))
    if section == "method":
        method = draw(st.sampled_from(sorted(m for m, f in METHOD_FIELDS.items() if f)))
        key = draw(st.sampled_from(sorted(METHOD_FIELDS[method])))
        value = draw(wrong_values(METHOD_FIELDS[method][key]))
        return {"method": {"name": method, key: value}}, f"method.{key}"
    key = draw(st.sampled_from(sorted(SECTION_FIELDS[section])))
    return {section: {key: draw(wrong_values(SECTION_FIELDS[section][key]))}}, f"{section}.{key}"


@st.composite
def any_config(draw: st.DrawFn) -> dict[str, Any]:
    """A raw config setting a few keys of a few sections (and maybe a method) to values of
    their own type."""
    raw: dict[str, Any] = {}
    for section in draw(st.lists(st.sampled_from(sorted(SECTION_FIELDS)), max_size=3, unique=True)):
        fields = SECTION_FIELDS[section]
        keys = draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=3, unique=True))
        raw[section] = {k: draw(values_of(fields[k])) for k in keys}
    if draw(st.booleans()):
        method = draw(st.sampled_from(sorted(METHOD_FIELDS)))
        fields = METHOD_FIELDS[method]
        keys = (
            draw(st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True))
            if fields
            else []
        )
        raw["method"] = {"name": method, **{k: draw(values_of(fields[k])) for k in keys}}
    return raw


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # ASCII JSON escapes are TOML basic-string escapes
    return "[" + ", ".join(toml_value(v) for v in value) + "]"


def write_toml(path: Path, raw: dict[str, Any]) -> Path:
    lines = []
    for section, values in raw.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(v)}" for key, v in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def refused_by_cli(capsys: pytest.CaptureFixture[str], path: Path) -> str:
    """``fedfit run PATH`` for a config file ``load_config`` refuses (checked first, so no
    run can start): exit 2 and its one error line."""
    with pytest.raises(ConfigError):
        load_config(path)
    return cli_error(capsys, ["run", str(path)])


def cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``fedfit ARGV``: it must exit 2 with one ``error:`` line, which is returned."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1, (code, err)
    return lines[0]


# ------------------------------------------------------------------------------- configs


@FUZZ
@given(case=unknown_key())
def test_unknown_key_is_a_config_error(
    case: tuple[dict[str, Any], str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw, key = case
    with pytest.raises(ConfigError, match=f"^{key}: unknown key"):
        from_dict(raw)
    line = refused_by_cli(capsys, write_toml(tmp_path / "bad.toml", raw))
    assert line.startswith(f"error: {key}: unknown key"), line


@FUZZ
@given(case=wrong_type())
def test_wrong_type_is_a_config_error(
    case: tuple[dict[str, Any], str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw, key = case
    with pytest.raises(ConfigError) as error:
        from_dict(raw)
    assert str(error.value).startswith(key), (raw, str(error.value))
    line = refused_by_cli(capsys, write_toml(tmp_path / "bad.toml", raw))
    assert line.startswith(f"error: {key}"), line


@FUZZ
@given(raw=any_config())
def test_any_value_is_a_config_or_a_config_error(
    raw: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        config = from_dict(raw)
    except ConfigError:
        # one that is refused is refused by the CLI as well, with exit code 2
        refused_by_cli(capsys, write_toml(tmp_path / "bad.toml", raw))
        return
    assert isinstance(config, Config)


@FUZZ
@given(
    sets=st.lists(
        st.tuples(
            st.sampled_from(sorted(f"{s}.{k}" for s, fs in SECTION_FIELDS.items() for k in fs)),
            st.text(st.characters(codec="utf-8"), max_size=10),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_any_set_override_is_a_config_or_a_config_error(sets: list[tuple[str, str]]) -> None:
    # --set KEY=TEXT: the text is read as TOML (lists, dates, tables...) or taken as a string
    try:
        config = load_config(None, [f"{key}={text}" for key, text in sets])
    except ConfigError:
        return
    assert isinstance(config, Config)


@FUZZ
@given(data=st.binary(max_size=200))
@example(data=b"\x80[run]\n")
def test_garbage_config_file_is_a_config_error(data: bytes, tmp_path: Path) -> None:
    path = tmp_path / "garbage.toml"
    path.write_bytes(data)
    try:
        load_config(path)  # empty or valid TOML: a Config
    except ConfigError:
        pass  # anything else escapes and fails the test


@FUZZ
@given(name=TEXT)
@example(name="..")
@example(name=".")
@example(name="run\x00")
def test_run_name_is_a_plain_folder_name(name: str) -> None:
    try:
        config = load_config(None, [f"run.name={json.dumps(name)}"])
    except ConfigError:
        return
    run_dir = Path("runs") / config.run.name
    assert run_dir.parent == Path("runs") and name not in (".", "..") and "\0" not in name


# ---------------------------------------------------------------------------- data files

SUFFIXES = [".csv", ".tsv", ".jsonl", ".parquet"]
WORDS = st.text('ab é,"\n\r\t;', min_size=0, max_size=8)
LABELS = st.sampled_from(["pos", "neg", "NaN", "", " 1", "2", "null", "9" * 5000])


def load(path: Path, bad_rows: str) -> TextDataset:
    """``path`` as a one-client local dataset (no size floor), the run seed 0."""
    data = DataConfig(
        path=str(path),
        num_clients=1,
        clients_per_round=1,
        partition="iid",
        min_examples=1,
        bad_rows=bad_rows,
    )
    return load_local(data, seed=0)


LOCAL_RUN = [
    "model.name=tiny-bert",
    "model.max_length=16",
    "data.partition=iid",
    "data.num_clients=1",
    "data.clients_per_round=1",
    "data.min_examples=1",
    "run.rounds=1",
]


def loads_or_data_error(
    path: Path, bad_rows: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``path`` loads, or raises DataError, and then ``fedfit run`` on it exits 2 naming it."""
    try:
        load(path, bad_rows)
    except DataError as err:
        sets = [*LOCAL_RUN, f"data.path={path}", f"data.bad_rows={bad_rows}"]
        sets.append(f"run.output_dir={tmp_path / 'runs'}")
        line = cli_error(capsys, ["run", "--overwrite", *(f"--set={s}" for s in sets)])
        assert str(path) in line and str(err) in line, (line, str(err))


def table_bytes(rows: list[tuple[str, str]], suffix: str, header: tuple[str, str]) -> bytes:
    """``rows`` (text, label) written as a file of the given format."""
    if suffix == ".jsonl":
        return "".join(json.dumps(dict(zip(header, r, strict=True))) + "\n" for r in rows).encode()
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {name: [r[i] for r in rows] for i, name in enumerate(header)}
        sink = io.BytesIO()
        pq.write_table(pa.table(columns), sink)
        return sink.getvalue()
    out = io.StringIO(newline="")
    csv.writer(out, delimiter="\t" if suffix == ".tsv" else ",").writerows([header, *rows])
    return out.getvalue().encode()


@FUZZ
@given(
    data=st.binary(max_size=3000),
    suffix=st.sampled_from(SUFFIXES),
    bad_rows=st.sampled_from(["error", "skip"]),
)
@example(data=b"text,label\n", suffix=".csv", bad_rows="error")
@example(data=b"\xff\xfet\x00", suffix=".csv", bad_rows="skip")
# found by this test: each of these escaped as a ValueError or a RecursionError
@example(data=b"text,label\na," + b"9" * 5000 + b"\nb,1\n", suffix=".csv", bad_rows="skip")
@example(data=b'{"text": "a", "label": ' + b"1" * 5000 + b"}\n", suffix=".jsonl", bad_rows="skip")
@example(
    data=b'{"text": "a", "label": ' + b"[" * 10**5 + b"]" * 10**5 + b"}\n",
    suffix=".jsonl",
    bad_rows="skip",
)
def test_random_bytes_load_or_are_a_data_error(
    data: bytes, suffix: str, bad_rows: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / f"random{suffix}"
    path.write_bytes(data)
    loads_or_data_error(path, bad_rows, tmp_path, capsys)


@FUZZ
@given(
    rows=st.lists(st.tuples(WORDS, LABELS), min_size=1, max_size=12),
    suffix=st.sampled_from(SUFFIXES),
    cut=st.floats(0, 1),
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=3),
    bad_rows=st.sampled_from(["error", "skip"]),
)
def test_truncated_or_corrupted_files_load_or_are_a_data_error(
    rows: list[tuple[str, str]],
    suffix: str,
    cut: float,
    flips: list[tuple[float, int]],
    bad_rows: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = bytearray(table_bytes(rows, suffix, ("text", "label")))
    data = data[: round(cut * len(data))]
    for where, byte in flips:  # a few bytes overwritten
        if data:
            data[min(int(where * len(data)), len(data) - 1)] = byte
    path = tmp_path / f"damaged{suffix}"
    path.write_bytes(bytes(data))
    loads_or_data_error(path, bad_rows, tmp_path, capsys)


@FUZZ
@given(
    header=st.tuples(NAME, NAME).filter(lambda h: "text" not in h or "label" not in h),
    suffix=st.sampled_from(SUFFIXES),
)
def test_wrong_columns_are_a_data_error(
    header: tuple[str, str], suffix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if header[0] == header[1]:
        header = (header[0], header[1] + "_2")
    path = tmp_path / f"columns{suffix}"
    path.write_bytes(table_bytes([("a good film", "pos"), ("a bad film", "neg")], suffix, header))
    with pytest.raises(DataError, match="no such column"):
        load(path, "error")
    loads_or_data_error(path, "error", tmp_path, capsys)
