"""Users' own datasets from local files (fedfit.data.files): formats, labels, clients, the
held-out split, and one test per kind of bad input checking that the message names it."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from fedfit.data import DataError, load_configured, load_dataset, load_local, partition
from fedfit.data.config import DataConfig
from fedfit.errors import ConfigError


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def config(path: Path, **overrides: Any) -> DataConfig:
    """A small local-file config: one client, iid, no size floor, unless overridden."""
    values: dict[str, Any] = {
        "path": str(path),
        "num_clients": 1,
        "clients_per_round": 1,
        "partition": "iid",
        "min_examples": 1,
    }
    return DataConfig(**(values | overrides))


TRAIN = [["a good film", "pos"], ["a bad film", "neg"], ["so-so", "neu"], ["great", "pos"]]
TEST = [["awful", "neg"], ["lovely", "pos"]]


# ------------------------------------------------------------------------ formats and labels


def test_csv_with_string_labels_and_test_file(tmp_path: Path) -> None:
    train = write_csv(
        tmp_path / "reviews.csv", ["id", "text", "label"], [[i, *r] for i, r in enumerate(TRAIN)]
    )
    test = write_csv(tmp_path / "held.csv", ["text", "label"], TEST)
    ds = load_local(config(train, test_path=str(test)), seed=0)
    assert ds.name == "reviews"  # the file's stem when [data] name is left alone
    assert ds.task == "classification"
    assert ds.train_texts == ["a good film", "a bad film", "so-so", "great"]
    assert ds.label_names == ("neg", "neu", "pos")  # sorted strings
    assert ds.train_labels == [2, 0, 1, 2]
    assert ds.test_texts == ["awful", "lovely"] and ds.test_labels == [0, 2]
    assert ds.train_groups is None
    assert ds.stats["rows_read"] == 4 and ds.stats["test_rows_read"] == 2
    assert ds.stats["count_pos"] == 3 and ds.stats["count_neg"] == 2
    assert ds.stats["train_examples"] == 4 and ds.stats["test_examples"] == 2


def test_integer_labels_keep_numeric_order(tmp_path: Path) -> None:
    # Every CSV value is a string: "10" must still come after "9".
    rows = [["x", "10"], ["y", "9"], ["z", "2"], ["w", "10"]]
    path = write_csv(tmp_path / "d.csv", ["text", "label"], rows)
    test = write_csv(tmp_path / "t.csv", ["text", "label"], [["v", "9"]])
    ds = load_local(config(path, test_path=str(test)), seed=0)
    assert ds.label_names == ("2", "9", "10")
    assert ds.train_labels == [2, 1, 0, 2] and ds.test_labels == [1]


def test_jsonl_with_int_labels_and_client_ids(tmp_path: Path) -> None:
    records = [
        {"body": "one", "y": 1, "user": 7},
        {"body": "two", "y": 0, "user": "ann"},
        {"body": "three", "y": 1, "user": 7, "extra": [1, 2]},
        {"body": "four", "y": 0, "user": "ann"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    test = write_jsonl(tmp_path / "t.jsonl", [{"body": "five", "y": 1}])
    data = config(
        path,
        test_path=str(test),
        text_column="body",
        label_column="y",
        client_column="user",
        partition="natural",
        num_clients=2,
        min_examples=2,
    )
    ds = load_local(data, seed=0)
    assert ds.train_texts == ["one", "two", "three", "four"]
    assert ds.train_labels == [1, 0, 1, 0] and ds.label_names == ("0", "1")
    assert ds.train_groups == ["7", "ann", "7", "ann"]
    assert ds.stats["clients"] == 2 and ds.stats["small_clients_skipped"] == 0
    # The groups feed the natural partition as the built-in shakespeare's do.
    parts = partition(ds.train_labels, ds.train_groups, 2, "natural", min_examples=2)
    assert [p.tolist() for p in parts] == [[0, 2], [1, 3]]  # "7" before "ann": ties by name


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(
        pa.table({"text": ["a", "b", "c"], "label": ["dog", "cat", "dog"], "n": [1, 2, 3]}), path
    )
    test = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["d"], "label": ["cat"]}), test)
    ds = load_local(config(path, test_path=str(test)), seed=0)
    assert ds.train_texts == ["a", "b", "c"] and ds.train_labels == [1, 0, 1]
    assert ds.label_names == ("cat", "dog") and ds.test_labels == [0]


def test_hf_save_to_disk_uses_class_label_names(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    train = datasets.Dataset.from_dict(
        {"text": ["bad", "good", "fine", "meh"], "label": [0, 1, 1, -1]}, features=features
    )
    test = datasets.Dataset.from_dict({"text": ["ok"], "label": [1]}, features=features)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(tmp_path / "imdb")

    # A DatasetDict folder is refused with the split folders to use instead.
    with pytest.raises(DataError, match=r"DatasetDict with splits train, test.*imdb/train"):
        load_local(config(tmp_path / "imdb"), seed=0)
    data = config(
        tmp_path / "imdb" / "train", test_path=str(tmp_path / "imdb" / "test"), bad_rows="skip"
    )
    ds = load_local(data, seed=0)
    assert ds.train_texts == ["bad", "good", "fine"]  # -1 is ClassLabel's "no label"
    assert ds.train_labels == [0, 1, 1] and ds.test_labels == [1]
    assert ds.label_names == ("neg", "pos")
    assert ds.stats["skipped_missing_label"] == 1


def test_lm_mode_needs_no_labels(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"line {i}"} for i in range(10)])
    ds = load_local(config(path, task="lm"), seed=0)
    assert ds.task == "lm" and ds.train_labels is None and ds.test_labels is None
    assert ds.label_names == () and ds.num_classes == 0
    assert len(ds.train_texts) == 9 and len(ds.test_texts) == 1


def test_seeded_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    rows = [[f"text {i}", "ab"[i % 2]] for i in range(50)]
    path = write_csv(tmp_path / "d.csv", ["text", "label"], rows)
    data = config(path, test_fraction=0.2)
    first, again, other = load_local(data, 1), load_local(data, 1), load_local(data, 2)
    assert first.test_texts == again.test_texts and first.train_texts == again.train_texts
    assert first.test_texts != other.test_texts
    assert len(first.test_texts) == 10 and len(first.train_texts) == 40  # round(0.2 * 50)
    assert sorted(first.train_texts + first.test_texts) == sorted(r[0] for r in rows)
    # File order is kept on both sides of the split.
    assert first.train_texts == sorted(first.train_texts, key=lambda t: int(t.split()[1]))
    assert first.label_names == ("a", "b")


def test_load_configured_picks_local_or_builtin(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["text", "label"], TRAIN)
    assert load_configured(config(path), 0).train_texts == load_local(config(path), 0).train_texts
    assert load_configured(DataConfig(), 0) is load_dataset("tweets")


# ------------------------------------------------------------------------------ config rules


def test_config_rules_for_local_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match='set data.partition = "natural"'):
        config(tmp_path / "d.csv", client_column="user")
    with pytest.raises(ConfigError, match="data.partition: 'natural' needs .*client_column"):
        config(tmp_path / "d.csv", partition="natural")
    with pytest.raises(ConfigError, match="data.partition: 'dirichlet' splits by label"):
        config(tmp_path / "d.csv", task="lm", partition="dirichlet")
    with pytest.raises(ConfigError, match="data.text_column: .*data.path is not set"):
        DataConfig(text_column="body")
    with pytest.raises(ConfigError, match="data.label_column: 'text' is also data.text_column"):
        config(tmp_path / "d.csv", label_column="text")
    with pytest.raises(ConfigError, match="data.bad_rows"):
        config(tmp_path / "d.csv", bad_rows="ignore")
    assert config(tmp_path / "d.csv", name="mine").name == "mine"  # an explicit name is kept
    assert config(tmp_path / "d.csv").name == "d"  # else the file's stem
    assert DataConfig().name == "tweets" and DataConfig().path == ""


# ----------------------------------------------------------------------- bad input, one each


def test_missing_file(tmp_path: Path) -> None:
    write_csv(tmp_path / "reviews.csv", ["text", "label"], TRAIN)
    with pytest.raises(DataError, match=r"data.path = .*review.csv.*no such file.*did you mean"):
        load_local(config(tmp_path / "review.csv"), seed=0)
    with pytest.raises(DataError, match="data.test_path = .*no such file"):
        load_local(config(tmp_path / "reviews.csv", test_path="nope.csv"), seed=0)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_misspelled_column_suggests_closest(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"d.{fmt}"
    records = [{"text": t, "label": y} for t, y in TRAIN]
    if fmt == "csv":
        write_csv(path, ["text", "label"], TRAIN)
    elif fmt == "jsonl":
        write_jsonl(path, records)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    with pytest.raises(
        DataError, match=r"data.text_column = 'txt': no such column \(did you mean 'text'\?\)"
    ):
        load_local(config(path, text_column="txt"), seed=0)
    with pytest.raises(DataError, match=r"'lable'.*did you mean 'label'.*columns are: 'text'"):
        load_local(config(path, label_column="lable"), seed=0)
    with pytest.raises(DataError, match=r"data.client_column = 'usr': no such column;"):
        load_local(config(path, client_column="usr", partition="natural"), seed=0)


def test_empty_files(tmp_path: Path) -> None:
    (tmp_path / "zero.csv").write_bytes(b"")
    with pytest.raises(DataError, match=r"zero.csv: empty file"):
        load_local(config(tmp_path / "zero.csv"), seed=0)
    write_csv(tmp_path / "header.csv", ["text", "label"], [])
    with pytest.raises(DataError, match=r"header.csv: empty file: a header row but no rows"):
        load_local(config(tmp_path / "header.csv"), seed=0)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"blank.jsonl: empty file"):
        load_local(config(tmp_path / "blank.jsonl"), seed=0)


def test_empty_text_error_or_counted_skip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [["fine", "a"], ["  ", "b"], ["good", "b"], ["", "a"], ["ok", "a"]]
    path = write_csv(tmp_path / "d.csv", ["text", "label"], rows)
    with pytest.raises(DataError, match=r"2 with empty text in column 'text' \(line 3, line 5\)"):
        load_local(config(path), seed=0)
    ds = load_local(config(path, bad_rows="skip"), seed=0)
    assert ds.stats["skipped_empty_text"] == 2 and ds.stats["rows_read"] == 5
    assert sorted(ds.train_texts + ds.test_texts) == ["fine", "good", "ok"]
    assert "skipped 2 of 5 rows: 2 with empty text" in capsys.readouterr().err


def test_missing_label_error_or_skip(tmp_path: Path) -> None:
    records = [{"text": "x", "label": "a"}, {"text": "y"}, {"text": "z", "label": None}]
    records += [{"text": "w", "label": "b"}, {"text": "v", "label": "b"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(DataError, match=r"2 with no label in column 'label' \(line 2, line 3\)"):
        load_local(config(path), seed=0)
    assert load_local(config(path, bad_rows="skip"), seed=0).stats["skipped_missing_label"] == 2


def test_fewer_than_two_classes(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [[f"t{i}", "pos"] for i in range(5)])
    with pytest.raises(DataError, match=r"column 'label' has fewer than 2 classes.*only 'pos'"):
        load_local(config(path), seed=0)


def test_undecodable_bytes_name_offset_and_line(tmp_path: Path) -> None:
    data = b"text,label\nfine,a\ncaf\xe9 latin-1,b\ngood,b\nok,a\n"
    path = tmp_path / "d.csv"
    path.write_bytes(data)
    offset = data.index(b"\xe9")
    with pytest.raises(
        DataError, match=rf"undecodable bytes \(not UTF-8\).*byte 0xe9 at offset {offset}, line 3"
    ):
        load_local(config(path), seed=0)
    ds = load_local(config(path, bad_rows="skip"), seed=0)
    assert ds.stats["skipped_undecodable"] == 1
    assert sorted(ds.train_texts + ds.test_texts) == ["fine", "good", "ok"]
    # JSONL: the bad line is dropped, the rest parse.
    jsonl = tmp_path / "d.jsonl"
    good = b'{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n'
    data = b'{"text": "a", "label": 1}\n{"text": "\xff", "label": 0}\n' * 2 + good
    jsonl.write_bytes(data)
    offset = data.index(b"\xff")  # 36
    with pytest.raises(DataError, match=rf"not UTF-8.*byte 0xff at offset {offset}, line 2"):
        load_local(config(jsonl), seed=0)
    assert load_local(config(jsonl, bad_rows="skip"), seed=0).stats["skipped_undecodable"] == 2


def test_invalid_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"text": "a", "label": 1}\n{"text": "b", \n[1, 2]\n{"text": "c", "label": 0}\n'
    )
    with pytest.raises(DataError, match=r"2 with invalid JSON .*\(line 2, line 3\)"):
        load_local(config(path), seed=0)
    (tmp_path / "array.json").write_text('[{"text": "a"}]')
    with pytest.raises(DataError, match="holds a JSON array; fedfit reads JSON Lines"):
        load_local(config(tmp_path / "array.json"), seed=0)


def test_text_that_is_not_a_string(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": 5, "label": 1}])
    with pytest.raises(DataError, match=r"d.jsonl line 2: column 'text' holds 5 \(int\), not text"):
        load_local(config(path), seed=0)


def test_unknown_extension_and_format_mismatch(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("text\nx\n")
    with pytest.raises(DataError, match=r"cannot tell the format from the extension '.txt'"):
        load_local(config(tmp_path / "d.txt"), seed=0)
    with pytest.raises(DataError, match=r"d.txt: 1 usable row\(s\): too few to split"):
        load_local(config(tmp_path / "d.txt", format="csv", task="lm"), seed=0)
    (tmp_path / "e.txt").write_text("text\nx\ny\n")
    ds = load_local(config(tmp_path / "e.txt", format="csv", task="lm"), seed=0)
    assert sorted(ds.train_texts + ds.test_texts) == ["x", "y"]


def test_test_file_labels_must_occur_in_training(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", ["text", "label"], TRAIN)
    test = write_csv(tmp_path / "test.csv", ["text", "label"], [["x", "pos"], ["y", "postive"]])
    with pytest.raises(DataError, match=r"test.csv: 1 held-out rows have labels .*'postive'"):
        load_local(config(train, test_path=str(test)), seed=0)


def _client_rows(sizes: dict[str, int]) -> list[list[Any]]:
    return [[f"{user} {i}", "ab"[i % 2], user] for user, n in sizes.items() for i in range(n)]


def test_small_clients_error_or_counted_skip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = write_csv(
        tmp_path / "train.csv",
        ["text", "label", "user"],
        _client_rows({"ann": 5, "bob": 4, "cy": 2, "di": 1}),
    )
    test = write_csv(tmp_path / "test.csv", ["text", "label"], [["x", "a"], ["y", "b"]])
    data = config(
        train,
        test_path=str(test),
        client_column="user",
        partition="natural",
        num_clients=2,
        min_examples=3,
    )
    with pytest.raises(
        DataError,
        match=r"2 of 4 clients in column 'user' have fewer than data.min_examples = 3 "
        r"training rows \(smallest: 'di' with 1\)",
    ):
        load_local(data, seed=0)
    ds = load_local(DataConfig(**(vars(data) | {"bad_rows": "skip"})), seed=0)
    assert ds.train_groups == ["ann"] * 5 + ["bob"] * 4
    assert ds.train_labels is not None and len(ds.train_labels) == 9
    assert ds.stats["small_clients_skipped"] == 2 and ds.stats["skipped_small_client_rows"] == 3
    assert (
        "skipped 3 rows: the 2 of 4 clients in column 'user' with fewer" in capsys.readouterr().err
    )
    # Fewer usable clients than data.num_clients: a clear error either way.
    too_many = DataConfig(**(vars(data) | {"bad_rows": "skip", "num_clients": 3}))
    with pytest.raises(
        DataError, match=r"gives 2 clients with >= data.min_examples = 3 .*data.num_clients = 3"
    ):
        load_local(too_many, seed=0)


def test_too_few_rows_for_the_clients(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["text", "label"], TRAIN * 5)
    with pytest.raises(DataError, match=r"18 training rows cannot give data.num_clients = 4"):
        load_local(config(path, num_clients=4, min_examples=5), seed=0)


def test_max_examples_keeps_a_seeded_subset_of_each_client(tmp_path: Path) -> None:
    from fedfit.config import load_config
    from fedfit.engine.setup import partition_clients

    rows = [[f"text {i}", ["a", "b"][i % 2]] for i in range(300)]
    path = write_csv(tmp_path / "d.csv", ["text", "label"], rows)
    base = [f"data.path={path}", "data.num_clients=4", "data.clients_per_round=2"]
    base += ["data.partition=iid", "data.min_examples=1"]
    full = partition_clients(load_config(None, base), load_configured(config(path), 0))
    capped_config = load_config(None, [*base, "data.max_examples=20"])
    capped = partition_clients(capped_config, load_configured(config(path), 0))
    again = partition_clients(capped_config, load_configured(config(path), 0))
    assert [len(p) for p in full] == [68, 68, 67, 67]  # 270 training rows (10% held out)
    assert [len(p) for p in capped] == [20] * 4
    for whole, part, same in zip(full, capped, again, strict=True):
        assert set(part) <= set(whole) and list(part) == sorted(part)
        assert list(part) == list(same)  # seeded
    with pytest.raises(ConfigError, match="data.max_examples"):
        load_config(None, [*base, "data.max_examples=-1"])
