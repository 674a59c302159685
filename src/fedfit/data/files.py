"""Users' own text datasets from local files: CSV, JSONL, Parquet and ``save_to_disk`` folders.

``[data] path = "reviews.csv"`` makes a run read that file instead of a built-in dataset
(:func:`load_configured` is the one entry point for both). The result is the same frozen
:class:`~fedfit.data.base.TextDataset` the built-ins return, so partitioning and
tokenisation do not know where the texts came from.

- Formats, by extension unless ``data.format`` says: ``.csv`` / ``.tsv`` (header row,
  standard-library ``csv``), ``.jsonl`` / ``.ndjson`` / ``.json`` (JSON Lines: one object
  per line; a JSON array is refused with that advice), ``.parquet`` / ``.pq`` (pyarrow), a
  folder written by ``datasets.Dataset.save_to_disk`` (``hf_disk``; a ``DatasetDict``
  folder is refused with the split folders to point at instead). CSV and JSONL must be
  UTF-8 (a BOM is allowed); a binary file (gzip, zip, Parquet, an image, NUL bytes, UTF-16)
  or a CSV whose header row is not UTF-8 is refused as "not a text CSV / JSON Lines file".
- Columns: ``text_column``; ``label_column`` for classification; ``client_column`` for
  one client per distinct id (the natural partition). Label and client values are
  stripped of surrounding spaces; texts are kept byte for byte (a text of only whitespace
  counts as empty). No deduplication.
- Labels: integers (or strings that all read as integers, as every CSV value is a string)
  keep their numeric order; otherwise the sorted strings. ``label_names`` are those values
  as strings (the ``ClassLabel`` names for an ``hf_disk`` label feature; -1 there is
  "no label"). Class ids are positions in that order. A label or client id that is empty,
  a float NaN, or one of the strings ``NaN``, ``-NaN``, ``null``, ``<NA>``, ``N/A``,
  ``#N/A`` (any case: pandas' and SQL's ways of writing "no value") is missing, never a
  class or a client of its own: its row is a bad row (below; with ``bad_rows = "skip"``
  dropped, and the count logged). ``None`` and ``NA`` stay values: they can be real class
  names.
- Held-out set: ``test_path`` when given (its labels must all occur in training: a typo
  there would otherwise become a class of its own); else ``round(test_fraction * n)`` rows
  (at least 1) chosen uniformly with a generator seeded by the run seed (not stratified;
  same seed, same split). The label set is then taken over all rows, so that which classes
  exist never depends on the seed.
- Bad rows (undecodable bytes, invalid JSON, empty text, no label, no client id) and,
  with a client column, clients with fewer than ``min_examples`` training rows are errors
  when ``bad_rows = "error"`` (one message listing every problem with the first line
  numbers), or dropped, counted in ``stats`` and logged to stderr when ``"skip"``. Every
  check runs while loading, so it fails before any model is loaded.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import json
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedfit.data.base import TextDataset, load_dataset
from fedfit.errors import DataError as DataError
from fedfit.log import log

if TYPE_CHECKING:
    from fedfit.data.config import DataConfig

FORMATS = ("auto", "csv", "jsonl", "parquet", "hf_disk")
TASKS = ("classification", "lm")
BAD_ROWS = ("error", "skip")
# Why a row can be unusable, in the order a row's first problem is picked.
REASONS = ("undecodable", "invalid_json", "empty_text", "missing_label", "missing_client")
_SUFFIXES = {
    ".csv": "csv",
    ".tsv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
# Bytes that are not UTF-8 survive decoding with "surrogateescape" as U+DC80..U+DCFF: that is
# how a row holding them is found after parsing.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
# An integer label; at most 18 digits, so int() never meets Python's 4300-digit limit and a
# longer digit string is a string label.
_INTEGER = re.compile(r"[+-]?\d{1,18}")
# A seed stream of its own, so the held-out split is not the partitioner's permutation.
_SPLIT_STREAM = 0x7E57
_SHOWN_PLACES = 5
# How binary files a user may point data.path at by mistake begin.
_MAGIC = (
    (b"\x1f\x8b", "gzip-compressed: decompress it first"),
    (b"PK\x03\x04", "a zip archive, or an .xlsx workbook: extract it or export it as CSV"),
    *((b"BZh%d1AY&SY" % level, "bzip2-compressed: decompress it first") for level in range(1, 10)),
    (b"\xfd7zXZ\x00", "xz-compressed: decompress it first"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed: decompress it first"),
    (b"PAR1", 'a Parquet file: name it .parquet or set data.format = "parquet"'),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"%PDF-", "a PDF document"),
)
# Label and client-id strings that mean "no value" (pandas' NaN and None written out as
# text, SQL's NULL): a missing value, never a class or a client of its own. "none" and
# "na" are not among them: they can be real class names.
_MISSING = frozenset({"nan", "-nan", "null", "<na>", "n/a", "#n/a"})


def _log(message: str) -> None:
    log(f"fedfit data: {message}")


@dataclass(frozen=True)
class RawTable:
    """The wanted columns of a file, one value per data row, before any cleaning.

    ``places`` says where each row is for messages ("line 7", "row 7"); ``broken`` marks
    rows already unusable while reading (``"undecodable"``, ``"invalid_json"``);
    ``bad_bytes`` describes the first byte that is not UTF-8 ("" when there is none).
    """

    path: Path
    values: dict[str, list[Any]]
    places: list[str]
    broken: dict[int, str] = field(default_factory=dict)
    bad_bytes: str = ""
    class_names: tuple[str, ...] | None = None  # ClassLabel names of an hf_disk label column

    def __len__(self) -> int:
        return len(self.places)


@dataclass(frozen=True)
class Rows:
    """Usable rows: texts, raw label keys (int or str), client ids; and what was dropped."""

    texts: list[str]
    labels: list[int | str] | None
    groups: list[str] | None
    places: list[str]
    skipped: dict[str, int]


# ----------------------------------------------------------------------------- locating files


def existing_path(raw: str, key: str) -> Path:
    """``raw`` as a Path that exists, or a DataError naming the key and close file names."""
    path = Path(raw).expanduser()
    if path.exists():
        return path
    hint = ""
    parent = path.parent if str(path.parent) else Path(".")
    if parent.is_dir():
        close = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=1)
        if close:
            hint = f" (did you mean {str(parent / close[0])!r}?)"
    raise DataError(f"{key} = {raw!r}: no such file or folder ({path.resolve()}){hint}")


def detect_format(path: Path, fmt: str) -> str:
    """The reader for ``path``: ``fmt`` itself, or for ``"auto"`` its extension (folder: hf_disk)."""
    if fmt == "auto":
        if path.is_dir():
            return "hf_disk"
        suffix = path.suffix.lower()
        if suffix not in _SUFFIXES:
            raise DataError(
                f"{path}: cannot tell the format from the extension {suffix!r}; name the file "
                f"{', '.join(sorted(_SUFFIXES))} or set data.format (csv | jsonl | parquet | "
                "hf_disk)"
            )
        fmt = _SUFFIXES[suffix]
    if fmt == "hf_disk" and not path.is_dir():
        raise DataError(f"{path}: data.format 'hf_disk' needs a folder written by save_to_disk")
    if fmt != "hf_disk" and path.is_dir():
        raise DataError(f"{path}: is a folder; a {fmt} dataset is a single file")
    return fmt


def _require_columns(path: Path, available: Sequence[str], wanted: dict[str, str]) -> None:
    """Every wanted column (config key -> column) is in ``available``, or a DataError that
    suggests the closest name and lists the columns there are."""
    for key, column in wanted.items():
        if column in available:
            continue
        close = difflib.get_close_matches(column, list(available), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        listed = ", ".join(repr(c) for c in available) or "none"
        raise DataError(
            f"{path}: {key} = {column!r}: no such column{hint}; the columns are: {listed}"
        )


# ------------------------------------------------------------------------------------ readers


def _refuse_binary(path: Path, data: bytes, fmt: str) -> None:
    """A DataError when ``data`` is plainly not a text file: it starts like a known binary
    format (an archive, an image, a Parquet file), as UTF-16, or holds a NUL byte in its
    first 8 KiB (no text CSV or JSONL has one). Undecodable bytes further in stay a
    per-row problem (``bad_rows``)."""
    head = data[:8192]
    kind = next((name for magic, name in _MAGIC if head.startswith(magic)), None)
    if kind is None and head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        kind = "UTF-16 text; save it as UTF-8"
    if kind is None and b"\0" in head:
        kind = "a binary file: it holds NUL bytes"
    if kind is not None:
        raise DataError(f"{path}: not a text {fmt} file (it is {kind})")


def _decode(path: Path, fmt: str) -> tuple[str, str]:
    """The file's text and a description of its first non-UTF-8 byte ("" if none).

    A binary file is refused first (:func:`_refuse_binary`). Bad bytes are kept as escapes
    (``surrogateescape``) so that parsing goes on and the rows holding them can be found
    and, with ``bad_rows = "skip"``, dropped one by one.
    """
    data = path.read_bytes()
    _refuse_binary(path, data, fmt)
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8"), ""
    except UnicodeDecodeError as err:
        offset = bom + err.start
        line = data.count(b"\n", 0, offset) + 1
        where = f"byte 0x{data[offset]:02x} at offset {offset}, line {line}"
        return data[bom:].decode("utf-8", errors="surrogateescape"), where


@contextmanager
def _large_csv_fields() -> Iterator[None]:
    # csv refuses fields over 128 KiB by default; an LM document can be longer.
    old = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)
    try:
        yield
    finally:
        csv.field_size_limit(old)


def read_csv(path: Path, wanted: dict[str, str]) -> RawTable:
    """A CSV (TSV for ``.tsv``) with a header row; missing trailing fields read as None."""
    text, bad_bytes = _decode(path, "CSV")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    values: dict[str, list[Any]] = {column: [] for column in wanted.values()}
    places: list[str] = []
    broken: dict[int, str] = {}
    with _large_csv_fields():
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty file: no header row and no rows")
            header = [name.strip() for name in header]
            if bad_bytes and any(_ESCAPED_BYTE.search(name) for name in header):
                raise DataError(
                    f"{path}: not a text CSV file: its header row is not UTF-8 text (first: "
                    f"{bad_bytes}); save the file as UTF-8"
                )
            _require_columns(path, header, wanted)
            positions = {column: header.index(column) for column in values}
            start = reader.line_num + 1
            for row in reader:
                # A record may span lines (quoted newlines): name the line it starts on.
                line, start = start, reader.line_num + 1
                if not row:  # a blank line is no row
                    continue
                if bad_bytes and any(_ESCAPED_BYTE.search(cell) for cell in row):
                    broken[len(places)] = "undecodable"
                places.append(f"line {line}")
                for column, pos in positions.items():
                    values[column].append(row[pos] if pos < len(row) else None)
        except csv.Error as err:
            raise DataError(f"{path} line {reader.line_num}: not valid CSV: {err}") from err
    if not places:
        raise DataError(f"{path}: empty file: a header row but no rows")
    return RawTable(path, values, places, broken, bad_bytes)


def read_jsonl(path: Path, wanted: dict[str, str]) -> RawTable:
    """JSON Lines: one object per line; blank lines are ignored; a key missing reads as None."""
    text, bad_bytes = _decode(path, "JSON Lines")
    if text.lstrip().startswith("["):
        raise DataError(
            f"{path}: holds a JSON array; fedfit reads JSON Lines (one object per line), "
            "e.g. written by pandas' to_json(orient='records', lines=True)"
        )
    records: list[dict[str, Any] | None] = []
    places: list[str] = []
    broken: dict[int, str] = {}
    columns: dict[str, None] = {}  # every key seen, in order of first appearance
    # split("\n"), not splitlines(): U+2028 and friends may stand unescaped inside a string.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        record = None
        if bad_bytes and _ESCAPED_BYTE.search(line):
            broken[len(places)] = "undecodable"
        else:
            try:
                parsed = json.loads(line)
            except (ValueError, RecursionError):
                # JSONDecodeError, an integer past Python's 4300-digit limit, deep nesting
                parsed = None
            if isinstance(parsed, dict):
                record = parsed
                columns.update(dict.fromkeys(parsed))
            else:
                broken[len(places)] = "invalid_json"
        records.append(record)
        places.append(f"line {number}")
    if not places:
        raise DataError(f"{path}: empty file: no rows")
    if columns:  # when no line parsed at all, the bad-row report says why
        _require_columns(path, list(columns), wanted)
    values = {
        column: [None if r is None else r.get(column) for r in records]
        for column in wanted.values()
    }
    return RawTable(path, values, places, broken, bad_bytes)


def read_parquet(path: Path, wanted: dict[str, str]) -> RawTable:
    """The wanted columns of a Parquet file (only those are read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file: {err}") from err
    _require_columns(path, schema.names, wanted)
    table = pq.read_table(path, columns=list(dict.fromkeys(wanted.values())))
    if table.num_rows == 0:
        raise DataError(f"{path}: empty file: no rows")
    return RawTable(path, table.to_pydict(), [f"row {i + 1}" for i in range(table.num_rows)])


def read_hf_disk(path: Path, wanted: dict[str, str]) -> RawTable:
    """A folder written by ``datasets.Dataset.save_to_disk`` (one split)."""
    dict_file = path / "dataset_dict.json"
    if dict_file.is_file():
        splits = json.loads(dict_file.read_text()).get("splits", [])
        first = splits[0] if splits else "train"
        raise DataError(
            f"{path}: is a DatasetDict with splits {', '.join(splits)}; point data.path at "
            f"one split's folder (e.g. {str(path / first)!r}) and data.test_path at another"
        )
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            f"{path}: reading save_to_disk folders needs: pip install datasets"
        ) from err
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DataError(f"{path}: not a folder written by datasets' save_to_disk: {err}") from err
    _require_columns(path, ds.column_names, wanted)
    if ds.num_rows == 0:
        raise DataError(f"{path}: empty file: no rows")
    class_names = None
    label_column = wanted.get("data.label_column")
    if label_column and isinstance(ds.features[label_column], datasets.ClassLabel):
        class_names = tuple(ds.features[label_column].names)
    columns = list(dict.fromkeys(wanted.values()))
    values = ds.select_columns(columns).to_dict()
    places = [f"row {i + 1}" for i in range(ds.num_rows)]
    return RawTable(path, values, places, {}, "", class_names)


READERS = {"csv": read_csv, "jsonl": read_jsonl, "parquet": read_parquet, "hf_disk": read_hf_disk}


def read_table(path: Path, fmt: str, wanted: dict[str, str]) -> RawTable:
    """Read the wanted columns (config key -> column name) of ``path`` in format ``fmt``."""
    return READERS[detect_format(path, fmt)](path, wanted)


# ----------------------------------------------------------------------------- cleaning rows


def _text(value: Any, table: RawTable, i: int, column: str) -> str | None:
    """The row's text, or None when it is unusable (then ``_problem`` says why)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str):
        raise DataError(
            f"{table.path} {table.places[i]}: column {column!r} holds {value!r} "
            f"({type(value).__name__}), not text"
        )
    return value


def _label_key(value: Any, table: RawTable, i: int, column: str) -> int | str | None:
    """A label as an int or a stripped string; None when it is missing (None, NaN, "",
    or a string of :data:`_MISSING` such as "NaN" or "null", in any case)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, bool):  # before int: True is an int
        return str(value).lower()
    if isinstance(value, int):
        if table.class_names is not None and value < 0:
            return None  # ClassLabel's -1 means "no label"
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)  # a pandas int column with gaps comes back as floats
    if isinstance(value, str):
        value = value.strip()
        return None if not value or value.lower() in _MISSING else value
    raise DataError(
        f"{table.path} {table.places[i]}: column {column!r} holds {value!r} "
        f"({type(value).__name__}); a label is a string or an integer"
    )


def _client_id(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    value = str(value).strip()
    return None if not value or value.lower() in _MISSING else value


_DESCRIBE = {
    "undecodable": "undecodable bytes (not UTF-8)",
    "invalid_json": "invalid JSON (not one object per line)",
    "empty_text": "empty text in column {text!r}",
    "missing_label": "no label in column {label!r}",
    "missing_client": "no client id in column {client!r}",
}


def _places(where: list[str]) -> str:
    shown = ", ".join(where[:_SHOWN_PLACES])
    return shown + (", ..." if len(where) > _SHOWN_PLACES else "")


def clean_rows(
    table: RawTable,
    text_column: str,
    label_column: str | None,
    client_column: str | None,
    bad_rows: str,
) -> Rows:
    """Drop (``bad_rows = "skip"``, counted and logged) or refuse (``"error"``) unusable rows.

    A row's first problem in :data:`REASONS` order is the one it is counted under.
    """
    texts: list[str] = []
    labels: list[int | str] | None = None if label_column is None else []
    groups: list[str] | None = None if client_column is None else []
    places: list[str] = []
    bad: dict[str, list[str]] = {reason: [] for reason in REASONS}
    for i in range(len(table)):
        reason = table.broken.get(i)
        text = label = group = None
        if reason is None:
            text = _text(table.values[text_column][i], table, i, text_column)
            if text is None:
                reason = "undecodable"
            elif not text.strip():
                reason = "empty_text"
        if reason is None and label_column is not None:
            label = _label_key(table.values[label_column][i], table, i, label_column)
            reason = "missing_label" if label is None else None
        if reason is None and client_column is not None:
            group = _client_id(table.values[client_column][i])
            reason = "missing_client" if group is None else None
        if reason is not None:
            bad[reason].append(table.places[i])
            continue
        assert text is not None
        texts.append(text)
        places.append(table.places[i])
        if labels is not None:
            assert label is not None
            labels.append(label)
        if groups is not None:
            assert group is not None
            groups.append(group)
    names = {"text": text_column, "label": label_column, "client": client_column}
    problems = []
    for reason, where in bad.items():
        if where:
            detail = _places(where)
            if reason == "undecodable" and table.bad_bytes:
                detail += f"; first: {table.bad_bytes}"
            problems.append(f"{len(where)} with {_DESCRIBE[reason].format(**names)} ({detail})")
    total = sum(len(where) for where in bad.values())
    if problems and bad_rows == "error":
        raise DataError(
            f"{table.path}: {total} bad row{'' if total == 1 else 's'} of {len(table)}: "
            f"{'; '.join(problems)}. Fix the "
            'file, or set data.bad_rows = "skip" to drop them (counted and logged)'
        )
    if problems:
        _log(f"{table.path}: skipped {total} of {len(table)} rows: {'; '.join(problems)}")
    if not texts:
        raise DataError(f"{table.path}: no usable rows: all {len(table)} rows were skipped")
    return Rows(texts, labels, groups, places, {r: len(w) for r, w in bad.items()})


# ------------------------------------------------------------------- splits, labels, clients


def held_out_mask(num_rows: int, fraction: float, seed: int) -> np.ndarray:
    """True for the ``round(fraction * num_rows)`` held-out rows (at least 1, never all),
    drawn uniformly with a generator seeded by ``seed``: same seed, same split."""
    if num_rows < 2:
        raise ValueError(f"{num_rows} usable row(s): too few to split off a held-out set")
    num_test = min(max(1, round(fraction * num_rows)), num_rows - 1)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_STREAM]))
    mask = np.zeros(num_rows, dtype=bool)
    mask[rng.permutation(num_rows)[:num_test]] = True
    return mask


def label_order(keys: Sequence[int | str]) -> list[int | str]:
    """The distinct labels in class order: numeric when every label reads as an integer
    (``"10"`` after ``"9"``), else sorted as strings. Returns the normalised keys."""
    distinct = set(keys)
    if all(isinstance(k, int) or _INTEGER.fullmatch(k) for k in distinct):
        return sorted({int(k) for k in distinct})
    return sorted({str(k) for k in distinct})


def _normalise(keys: Sequence[int | str], numeric: bool) -> list[int | str]:
    return [int(k) for k in keys] if numeric else [str(k) for k in keys]


def check_clients(
    path: Path, column: str, groups: Sequence[str], data: DataConfig
) -> tuple[set[str], dict[str, int]]:
    """The clients too small to keep (``bad_rows = "skip"``) and counts, or a DataError.

    A client needs ``data.min_examples`` training rows; ``data.num_clients`` of them must be
    left, as the natural partition takes the ``num_clients`` largest.
    """
    sizes = Counter(groups)
    small = {g: n for g, n in sizes.items() if n < data.min_examples}
    if small:
        smallest = min(small, key=lambda g: (small[g], g))
        detail = (
            f"fewer than data.min_examples = {data.min_examples} training rows "
            f"(smallest: {smallest!r} with {small[smallest]})"
        )
        if data.bad_rows == "error":
            raise DataError(
                f"{path}: {len(small)} of {len(sizes)} clients in column {column!r} have "
                f'{detail}; lower data.min_examples, or set data.bad_rows = "skip" to leave '
                "those clients out"
            )
        _log(
            f"{path}: skipped {sum(small.values())} rows: the {len(small)} of {len(sizes)} "
            f"clients in column {column!r} with {detail}"
        )
    usable = len(sizes) - len(small)
    if usable < data.num_clients:
        fix = f"set data.num_clients <= {usable} or " if usable else ""
        raise DataError(
            f"{path}: column {column!r} gives {usable} clients with >= data.min_examples = "
            f"{data.min_examples} training rows ({len(small)} smaller left out), fewer than "
            f"data.num_clients = {data.num_clients}; {fix}lower data.min_examples"
        )
    if usable > data.num_clients:
        _log(
            f"{path}: {usable} clients in column {column!r}; the natural partition uses the "
            f"{data.num_clients} largest (data.num_clients)"
        )
    stats = {
        "clients": usable,
        "small_clients_skipped": len(small),
        "skipped_small_client_rows": sum(small.values()),
    }
    return set(small), stats


# -------------------------------------------------------------------------------- the loader


def load_local(data: DataConfig, seed: int) -> TextDataset:
    """Read ``data.path`` (and ``data.test_path``) into a TextDataset (module docstring).

    ``seed`` (the run seed) draws the held-out split when there is no ``test_path``.
    Raises DataError naming the file and the problem for anything unusable.
    """
    classify = data.task == "classification"
    path = test_source = existing_path(data.path, "data.path")
    wanted = {"data.text_column": data.text_column}
    if classify:
        wanted["data.label_column"] = data.label_column
    if data.client_column:
        wanted["data.client_column"] = data.client_column
    label_column = data.label_column if classify else None
    client_column = data.client_column or None
    table = read_table(path, data.format, wanted)
    rows = clean_rows(table, data.text_column, label_column, client_column, data.bad_rows)
    stats = {"rows_read": len(table)} | {f"skipped_{r}": n for r, n in rows.skipped.items()}

    if data.test_path:
        test_source = existing_path(data.test_path, "data.test_path")
        test_wanted = {k: v for k, v in wanted.items() if k != "data.client_column"}
        test_table = read_table(test_source, data.format, test_wanted)
        test_rows = clean_rows(test_table, data.text_column, label_column, None, data.bad_rows)
        stats["test_rows_read"] = len(test_table)
        stats |= {f"test_skipped_{r}": n for r, n in test_rows.skipped.items()}
        train, test = rows, test_rows
    else:
        try:
            mask = held_out_mask(len(rows.texts), data.test_fraction, seed)
        except ValueError as err:
            raise DataError(f"{path}: {err}; give data.test_path") from err
        train, test = _subset(rows, ~mask), _subset(rows, mask)

    label_names: tuple[str, ...] = ()
    train_labels = test_labels = None
    if classify:
        assert train.labels is not None and test.labels is not None
        # A separate test file must not invent classes; a seeded split takes the classes of
        # all rows, so that the label set never depends on the seed.
        order = label_order(train.labels if data.test_path else [*train.labels, *test.labels])
        numeric = isinstance(order[0], int)
        # Counted over the training file's rows before any split, so never seed-dependent.
        assert rows.labels is not None
        if len(set(rows.labels)) < 2:
            only = ", ".join(repr(k) for k in label_order(rows.labels))
            raise DataError(
                f"{path}: column {data.label_column!r} has fewer than 2 classes (only "
                f"{only}); classification needs at least 2"
            )
        index = {key: i for i, key in enumerate(order)}
        train_labels = [index[k] for k in _normalise(train.labels, numeric)]
        test_keys = _normalise(test.labels, numeric)
        unknown = [(k, p) for k, p in zip(test_keys, test.places, strict=True) if k not in index]
        if unknown:
            raise DataError(
                f"{test_source}: {len(unknown)} held-out rows have labels the training file "
                f"lacks ({', '.join(sorted({repr(k) for k, _ in unknown}))}; first at "
                f"{unknown[0][1]}); the classes are {', '.join(map(repr, order))}"
            )
        test_labels = [index[k] for k in test_keys]
        label_names = _class_names(order, table.class_names)

    train_groups = None
    if data.client_column:
        assert train.groups is not None
        small, client_stats = check_clients(path, data.client_column, train.groups, data)
        stats |= client_stats
        if small:
            keep = np.array([g not in small for g in train.groups])
            train = _subset(train, keep)
            if train_labels is not None:
                train_labels = [y for y, k in zip(train_labels, keep, strict=True) if k]
        train_groups = train.groups
    elif len(train.texts) < data.num_clients * data.min_examples:
        raise DataError(
            f"{path}: {len(train.texts)} training rows cannot give data.num_clients = "
            f"{data.num_clients} clients data.min_examples = {data.min_examples} rows each"
        )

    stats["train_examples"] = len(train.texts)
    stats["test_examples"] = len(test.texts)
    if classify:
        assert train_labels is not None and test_labels is not None
        counts = Counter(train_labels + test_labels)
        for i, name in enumerate(label_names):
            stats[f"count_{name}"] = counts[i]
        trained = set(train_labels)
        missing = [n for i, n in enumerate(label_names) if i not in trained]
        shown = ", ".join(f"{n} {counts[i]}" for i, n in enumerate(label_names))
        _log(
            f"{path}: {len(train.texts)} train / {len(test.texts)} held-out rows, "
            f"{len(label_names)} classes: {shown}"
            + (f" (no training rows: {', '.join(missing)})" if missing else "")
        )
    else:
        _log(f"{path}: {len(train.texts)} train / {len(test.texts)} held-out texts")
    return TextDataset(
        name=data.name,
        task=data.task,
        train_texts=train.texts,
        train_labels=train_labels,
        train_groups=train_groups,
        test_texts=test.texts,
        test_labels=test_labels,
        label_names=label_names,
        stats=stats,
    )


def _subset(rows: Rows, keep: np.ndarray) -> Rows:
    """The rows where ``keep`` is True, in file order."""
    idx = np.flatnonzero(keep)
    return Rows(
        [rows.texts[i] for i in idx],
        None if rows.labels is None else [rows.labels[i] for i in idx],
        None if rows.groups is None else [rows.groups[i] for i in idx],
        [rows.places[i] for i in idx],
        rows.skipped,
    )


def _class_names(order: list[int | str], class_names: tuple[str, ...] | None) -> tuple[str, ...]:
    # An hf_disk ClassLabel column names its integer classes; elsewhere the value is the name.
    if class_names is not None and all(
        isinstance(k, int) and 0 <= k < len(class_names) for k in order
    ):
        return tuple(class_names[int(k)] for k in order)
    return tuple(str(k) for k in order)


def load_configured(data: DataConfig, seed: int) -> TextDataset:
    """The run's dataset: the local file ``data.path`` when set, else the built-in
    ``data.name`` (``seed`` only draws a local file's held-out split); with ``data.labels``
    only those classes, renumbered in that order."""
    dataset = load_local(data, seed) if data.path else load_dataset(data.name)
    return select_labels(dataset, data.labels) if data.labels else dataset


def select_labels(dataset: TextDataset, names: Sequence[str]) -> TextDataset:
    """Only the examples of classes ``names`` (e.g. a binary negative/positive task), with
    class ``names[k]`` renumbered k; ``stats`` records what was dropped."""
    if dataset.task != "classification":
        raise DataError(f"data.labels: {dataset.name!r} is a {dataset.task!r} dataset, no classes")
    unknown = [n for n in names if n not in dataset.label_names]
    if unknown:
        raise DataError(
            f"data.labels: {unknown[0]!r} is not a class of {dataset.name!r}; its classes are "
            f"{', '.join(map(repr, dataset.label_names))}"
        )
    new_index = {dataset.label_names.index(n): k for k, n in enumerate(names)}
    assert dataset.train_labels is not None and dataset.test_labels is not None

    def keep(labels: list[int]) -> list[int]:
        return [i for i, y in enumerate(labels) if y in new_index]

    train, test = keep(dataset.train_labels), keep(dataset.test_labels)
    stats = dict(dataset.stats)
    stats["dropped_by_labels_train"] = len(dataset.train_labels) - len(train)
    stats["dropped_by_labels_test"] = len(dataset.test_labels) - len(test)
    groups = dataset.train_groups
    return replace(
        dataset,
        train_texts=[dataset.train_texts[i] for i in train],
        train_labels=[new_index[dataset.train_labels[i]] for i in train],
        train_groups=None if groups is None else [groups[i] for i in train],
        test_texts=[dataset.test_texts[i] for i in test],
        test_labels=[new_index[dataset.test_labels[i]] for i in test],
        label_names=tuple(names),
        stats=stats,
    )
