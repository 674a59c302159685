"""The ``[data]`` config section: which dataset, how it splits into clients, a local file.

``DataConfig`` is validated when it is made (``__post_init__``); every error is a
``ConfigError`` naming the ``data.`` key. fedfit.config assembles it with the other sections.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from fedfit.data.files import BAD_ROWS, FORMATS, TASKS
from fedfit.errors import check, check_choice

# Fields of DataConfig that describe a local file; setting one without data.path is a mistake
# (the built-in dataset would silently be used instead), so validation rejects it.
_LOCAL_ONLY = (
    "format",
    "task",
    "text_column",
    "label_column",
    "client_column",
    "test_path",
    "test_fraction",
    "bad_rows",
)
_DEFAULT_DATASET = "tweets"


@dataclass(frozen=True)
class DataConfig:
    name: str = field(
        default=_DEFAULT_DATASET,
        metadata={"help": "built-in dataset (fedfit data); with path set: display name"},
    )
    num_clients: int = field(default=100, metadata={"help": "clients in the population"})
    clients_per_round: int = field(default=10, metadata={"help": "clients sampled per round"})
    partition: str = field(
        default="dirichlet", metadata={"help": "iid | dirichlet | inner_dirichlet | natural"}
    )
    alpha: float = field(default=0.5, metadata={"help": "Dirichlet concentration"})
    min_examples: int = field(default=10, metadata={"help": "minimum examples per client"})
    max_examples: int = field(
        default=0,
        metadata={"help": "keep at most this many examples per client (seeded); 0 = all"},
    )
    eval_examples: int = field(
        default=0, metadata={"help": "held-out examples to evaluate on; 0 = all"}
    )
    labels: tuple[str, ...] = field(
        default=(),
        metadata={"help": "keep only these classes, in this order (e.g. binary); () = all"},
    )
    prompt: str = field(
        default="",
        metadata={
            "help": "causal LMs: classify by the next token after this template holding "
            "{text}; '' = a classification head"
        },
    )
    label_words: tuple[str, ...] = field(
        default=(),
        metadata={"help": "with data.prompt: one word per class, whose token is its logit"},
    )
    # A user's own dataset (fedfit.data.files); all of these are ignored-and-rejected when
    # path is empty.
    path: str = field(
        default="", metadata={"help": "local CSV / JSONL / Parquet file or save_to_disk folder"}
    )
    format: str = field(
        default="auto", metadata={"help": "auto (by extension) | csv | jsonl | parquet | hf_disk"}
    )
    task: str = field(default="classification", metadata={"help": "classification | lm"})
    text_column: str = field(default="text", metadata={"help": "column holding the text"})
    label_column: str = field(
        default="label", metadata={"help": "column holding the class (string or integer)"}
    )
    client_column: str = field(
        default="", metadata={"help": "client-id column: one client per id; '' = none"}
    )
    test_path: str = field(
        default="", metadata={"help": "held-out file; '' = split off test_fraction"}
    )
    test_fraction: float = field(
        default=0.1, metadata={"help": "held-out share split off with the run seed"}
    )
    bad_rows: str = field(
        default="error",
        metadata={"help": "bad rows and clients under min_examples: error | skip (counted)"},
    )

    def __post_init__(self) -> None:
        check(self.num_clients >= 1, "data.num_clients", "must be >= 1")
        check(
            1 <= self.clients_per_round <= self.num_clients,
            "data.clients_per_round",
            f"must be between 1 and data.num_clients ({self.num_clients})",
        )
        check_choice(
            self.partition, "data.partition", ("iid", "dirichlet", "inner_dirichlet", "natural")
        )
        check(self.alpha > 0, "data.alpha", "must be > 0")
        check(self.min_examples >= 1, "data.min_examples", "must be >= 1")
        check(self.max_examples >= 0, "data.max_examples", "must be >= 0 (0 = all)")
        check(self.eval_examples >= 0, "data.eval_examples", "must be >= 0")
        check(
            len(set(self.labels)) == len(self.labels),
            "data.labels",
            f"names a class twice: {list(self.labels)}",
        )
        check(self.labels == () or len(self.labels) >= 2, "data.labels", "needs >= 2 classes")
        if self.prompt:
            check(
                "{text}" in self.prompt,
                "data.prompt",
                f"{self.prompt!r} has no {{text}} placeholder for the example",
            )
            check(bool(self.label_words), "data.label_words", "data.prompt needs one per class")
        else:
            check(not self.label_words, "data.label_words", "needs data.prompt")
        check(
            len(set(self.label_words)) == len(self.label_words),
            "data.label_words",
            f"names a word twice: {list(self.label_words)}",
        )
        if not self.path:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for key in _LOCAL_ONLY:
                check(
                    getattr(self, key) == defaults[key],
                    f"data.{key}",
                    "describes a local dataset file, but data.path is not set",
                )
            return
        self._check_local()
        if self.name == _DEFAULT_DATASET:
            # A local file left unnamed is shown by its file name, never as the built-in one.
            object.__setattr__(self, "name", Path(self.path).stem or self.path)

    def _check_local(self) -> None:
        check_choice(self.format, "data.format", FORMATS)
        check_choice(self.task, "data.task", TASKS)
        check_choice(self.bad_rows, "data.bad_rows", BAD_ROWS)
        check(0 < self.test_fraction < 1, "data.test_fraction", "must be in (0, 1)")
        check(bool(self.text_column), "data.text_column", "must name a column")
        columns = [("data.text_column", self.text_column)]
        if self.task == "classification":
            check(bool(self.label_column), "data.label_column", "must name a column")
            columns.append(("data.label_column", self.label_column))
        if self.client_column:
            columns.append(("data.client_column", self.client_column))
        for i, (key, column) in enumerate(columns):
            for other_key, other in columns[:i]:
                check(column != other, key, f"{column!r} is also {other_key}")
        if self.client_column:
            # One client per id IS the natural partition; mixing it with iid/dirichlet would
            # silently ignore the column, so the user has to say it.
            check(
                self.partition == "natural",
                "data.partition",
                f"data.client_column = {self.client_column!r} gives one client per id: "
                f'set data.partition = "natural" (it is {self.partition!r})',
            )
        else:
            check(
                self.partition != "natural",
                "data.partition",
                "'natural' needs client ids from a local file: set data.client_column",
            )
        if self.task == "lm":
            check(
                self.partition not in ("dirichlet", "inner_dirichlet"),
                "data.partition",
                f"{self.partition!r} splits by label and data.task = 'lm' has no labels: "
                "use 'iid', or 'natural' with data.client_column",
            )
