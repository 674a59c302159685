"""Run configuration: frozen dataclasses, TOML loading, ``--set key=value`` overrides.

A config file has one table per dataclass below ([run], [model], [data], [train], [server],
[method], [devices] from fedfit.devices, and [compress]). ``[method]`` holds ``name`` plus
that method's own options, which are validated against the method's options dataclass (see
``fedfit methods``). Every key is checked before any work starts: an unknown key or a bad
value raises ``ConfigError`` naming the key and what is allowed. The resolved config
(defaults filled in) is written into every run folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedfit.devices import DevicesConfig


class ConfigError(ValueError):
    """A config key or value is not allowed; the message names the key."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _choice(value: str, key: str, allowed: typing.Iterable[str]) -> None:
    allowed = list(allowed)
    _check(value in allowed, key, f"{value!r} is not one of {', '.join(map(repr, allowed))}")


@dataclass(frozen=True)
class RunConfig:
    name: str = field(default="default", metadata={"help": "run folder name under output_dir"})
    seed: int = field(default=0, metadata={"help": "seeds sampling, partitions, client steps"})
    rounds: int = field(default=20, metadata={"help": "federated rounds"})
    eval_every: int = field(default=5, metadata={"help": "evaluate every k rounds (and last)"})
    output_dir: str = field(default="runs", metadata={"help": "where run folders go"})
    threads: int = field(
        default=0,
        metadata={"help": "torch CPU threads (per Ray worker too); 0 = torch default (Ray: 1)"},
    )
    executor: str = field(
        default="local",
        metadata={
            "help": "local (in process) | ray (clients spread over Ray actors) | flower "
            "(Flower's simulation runtime)"
        },
    )
    workers: int = field(
        default=2, metadata={"help": "Ray actors (executor = ray) or Flower simulation actors"}
    )
    ray_address: str = field(
        default="",
        metadata={"help": "existing Ray cluster host:port; '' = start a local Ray instance"},
    )

    def __post_init__(self) -> None:
        _check(self.rounds >= 1, "run.rounds", "must be >= 1")
        _check(self.eval_every >= 1, "run.eval_every", "must be >= 1")
        _check(self.threads >= 0, "run.threads", "must be >= 0")
        _check(bool(self.name) and "/" not in self.name, "run.name", "must be a plain folder name")
        _choice(self.executor, "run.executor", ("local", "ray", "flower"))
        _check(self.workers >= 1, "run.workers", "must be >= 1")
        if self.ray_address:
            _check(self.executor == "ray", "run.ray_address", 'needs run.executor = "ray"')
            host, _, port = self.ray_address.removeprefix("ray://").rpartition(":")
            _check(
                bool(host) and port.isdigit(),
                "run.ray_address",
                f"{self.ray_address!r} is not host:port (e.g. 127.0.0.1:6379)",
            )


HEAD_INITS = ("random", "ncm")


@dataclass(frozen=True)
class ModelConfig:
    name: str = field(default="minilm-l6", metadata={"help": "zoo name (fedfit models)"})
    max_length: int = field(default=64, metadata={"help": "tokens per example (truncation)"})
    head_init: str = field(
        default="random",
        metadata={
            "help": "classifier head start: random | ncm (federated nearest-class-mean, "
            "a measured round 0; FedNCM, Legate et al. 2023)"
        },
    )
    head_init_scale: float = field(
        default=10.0,
        metadata={"help": "ncm: logit scale s of the head s * mean_c / (|mean_c| * mean |x|)"},
    )
    head_init_clients: int = field(
        default=0,
        metadata={"help": "ncm: clients that send class sums in round 0; 0 = every eligible one"},
    )

    def __post_init__(self) -> None:
        _check(self.max_length >= 2, "model.max_length", "must be >= 2")
        _choice(self.head_init, "model.head_init", HEAD_INITS)
        _check(
            math.isfinite(self.head_init_scale) and self.head_init_scale > 0,
            "model.head_init_scale",
            "must be a finite number > 0",
        )
        _check(self.head_init_clients >= 0, "model.head_init_clients", "must be >= 0 (0 = all)")


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
    # A user's own dataset (fedfit.data.local); all of these are ignored-and-rejected when
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
        _check(self.num_clients >= 1, "data.num_clients", "must be >= 1")
        _check(
            1 <= self.clients_per_round <= self.num_clients,
            "data.clients_per_round",
            f"must be between 1 and data.num_clients ({self.num_clients})",
        )
        _choice(
            self.partition, "data.partition", ("iid", "dirichlet", "inner_dirichlet", "natural")
        )
        _check(self.alpha > 0, "data.alpha", "must be > 0")
        _check(self.min_examples >= 1, "data.min_examples", "must be >= 1")
        _check(self.max_examples >= 0, "data.max_examples", "must be >= 0 (0 = all)")
        _check(self.eval_examples >= 0, "data.eval_examples", "must be >= 0")
        _check(
            len(set(self.labels)) == len(self.labels),
            "data.labels",
            f"names a class twice: {list(self.labels)}",
        )
        _check(self.labels == () or len(self.labels) >= 2, "data.labels", "needs >= 2 classes")
        if self.prompt:
            _check(
                "{text}" in self.prompt,
                "data.prompt",
                f"{self.prompt!r} has no {{text}} placeholder for the example",
            )
            _check(bool(self.label_words), "data.label_words", "data.prompt needs one per class")
        else:
            _check(not self.label_words, "data.label_words", "needs data.prompt")
        _check(
            len(set(self.label_words)) == len(self.label_words),
            "data.label_words",
            f"names a word twice: {list(self.label_words)}",
        )
        if not self.path:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for key in _LOCAL_ONLY:
                _check(
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
        from fedfit.data.local import BAD_ROWS, FORMATS, TASKS

        _choice(self.format, "data.format", FORMATS)
        _choice(self.task, "data.task", TASKS)
        _choice(self.bad_rows, "data.bad_rows", BAD_ROWS)
        _check(0 < self.test_fraction < 1, "data.test_fraction", "must be in (0, 1)")
        _check(bool(self.text_column), "data.text_column", "must name a column")
        columns = [("data.text_column", self.text_column)]
        if self.task == "classification":
            _check(bool(self.label_column), "data.label_column", "must name a column")
            columns.append(("data.label_column", self.label_column))
        if self.client_column:
            columns.append(("data.client_column", self.client_column))
        for i, (key, column) in enumerate(columns):
            for other_key, other in columns[:i]:
                _check(column != other, key, f"{column!r} is also {other_key}")
        if self.client_column:
            # One client per id IS the natural partition; mixing it with iid/dirichlet would
            # silently ignore the column, so the user has to say it.
            _check(
                self.partition == "natural",
                "data.partition",
                f"data.client_column = {self.client_column!r} gives one client per id: "
                f'set data.partition = "natural" (it is {self.partition!r})',
            )
        else:
            _check(
                self.partition != "natural",
                "data.partition",
                "'natural' needs client ids from a local file: set data.client_column",
            )
        if self.task == "lm":
            _check(
                self.partition not in ("dirichlet", "inner_dirichlet"),
                "data.partition",
                f"{self.partition!r} splits by label and data.task = 'lm' has no labels: "
                "use 'iid', or 'natural' with data.client_column",
            )


# sgd (torch, optional momentum), adamw (torch), adafactor (transformers' implementation with
# an explicit lr: factored second moment, no first moment; Shazeer & Stern 2018).
CLIENT_OPTIMIZERS = ("sgd", "adamw", "adafactor")


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = field(default=10, metadata={"help": "local steps per round; 0 = epochs"})
    local_epochs: float = field(default=1.0, metadata={"help": "used when local_steps = 0"})
    batch_size: int = field(default=16, metadata={"help": "client minibatch size"})
    optimizer: str = field(
        default="adamw", metadata={"help": "client optimiser: sgd | adamw | adafactor"}
    )
    lr: float = field(default=5e-4, metadata={"help": "client learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "client weight decay"})
    momentum: float = field(default=0.0, metadata={"help": "SGD momentum"})
    eval_batch_size: int = field(default=64, metadata={"help": "evaluation batch size"})

    def __post_init__(self) -> None:
        _check(self.local_steps >= 0, "train.local_steps", "must be >= 0")
        _check(self.local_epochs > 0, "train.local_epochs", "must be > 0")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _choice(self.optimizer, "train.optimizer", CLIENT_OPTIMIZERS)
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(0 <= self.momentum < 1, "train.momentum", "must be in [0, 1)")
        _check(self.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")


@dataclass(frozen=True)
class ServerConfig:
    optimizer: str = field(
        default="fedavg", metadata={"help": "fedavg | fedadam | fedyogi | fedadagrad"}
    )
    lr: float = field(default=1.0, metadata={"help": "server learning rate (eta)"})
    beta1: float = field(default=0.9, metadata={"help": "first-moment decay (adaptive)"})
    beta2: float = field(default=0.99, metadata={"help": "second-moment decay (adam/yogi)"})
    tau: float = field(default=1e-3, metadata={"help": "adaptivity (epsilon) of FedOpt"})

    def __post_init__(self) -> None:
        from fedfit.server_opt import SERVER_OPTIMIZERS

        _choice(self.optimizer, "server.optimizer", SERVER_OPTIMIZERS)
        _check(self.lr > 0, "server.lr", "must be > 0")
        _check(0 <= self.beta1 < 1, "server.beta1", "must be in [0, 1)")
        _check(0 <= self.beta2 < 1, "server.beta2", "must be in [0, 1)")
        _check(self.tau > 0, "server.tau", "must be > 0")


@dataclass(frozen=True)
class CompressConfig:
    """Lossy compression of what crosses the network (engine/channel.py): unbiased stochastic
    uniform quantisation to b bits (fedfit.quantize). 32 = float32, no quantisation."""

    upload_bits: int = field(
        default=32, metadata={"help": "bits per number of the upload (1..8, or 32 = off)"}
    )
    download_bits: int = field(
        default=32, metadata={"help": "bits per number of the download (1..8, or 32 = off)"}
    )
    block: int = field(
        default=0, metadata={"help": "numbers sharing one scale; 0 = one scale per tensor"}
    )

    def __post_init__(self) -> None:
        for key in ("upload_bits", "download_bits"):
            bits = getattr(self, key)
            _check(1 <= bits <= 8 or bits == 32, f"compress.{key}", "must be 1..8, or 32 (off)")
        _check(self.block >= 0, "compress.block", "must be >= 0 (0 = per tensor)")


@dataclass(frozen=True)
class MethodConfig:
    """The method's registered name and its own options dataclass."""

    name: str
    options: Any


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    method: MethodConfig = field(default_factory=lambda: _method("lora", {}))
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)


SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "server": ServerConfig,
    "devices": DevicesConfig,
    "compress": CompressConfig,
}


def _unknown(key: str, allowed: typing.Iterable[str]) -> ConfigError:
    allowed = sorted(allowed)
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{key}: unknown key{hint}; allowed: {', '.join(allowed)}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a dataclass field type; ints are accepted where floats are."""
    hint = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if hint in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a {annotation}")
    if hint in (tuple, list):
        _check(isinstance(value, list | tuple), key, f"expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(f"{key}[]", v, inner) for v in value)
    if annotation is float:
        _check(
            isinstance(value, int | float) and not isinstance(value, bool),
            key,
            f"expected a number, got {value!r}",
        )
        return float(value)
    if annotation is int:
        _check(
            isinstance(value, int) and not isinstance(value, bool),
            key,
            f"expected an integer, got {value!r}",
        )
        return value
    if annotation is bool:
        _check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if annotation is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    return value


def build_dataclass(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Make ``cls(**values)`` after checking every key and value type; errors name the key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown(f"{prefix}.{key}", fields)
        kwargs[key] = _coerce(f"{prefix}.{key}", value, hints[key])
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix}: {err}") from err


def _method(name: str, values: dict[str, Any]) -> MethodConfig:
    from fedfit.algorithms import registry

    if name not in registry.ALGORITHMS:
        raise ConfigError(
            f"method.name: unknown method {name!r}; allowed: {', '.join(sorted(registry.ALGORITHMS))}"
        )
    options_cls = registry.ALGORITHMS[name].options
    return MethodConfig(name=name, options=build_dataclass(options_cls, values, "method"))


def parse_value(text: str) -> Any:
    """A ``--set`` value: parsed as a TOML value (numbers, booleans, lists), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings onto a raw TOML dict (a new dict is returned)."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if "." not in key:
            raise ConfigError(f"--set {key}: expected section.key (e.g. train.lr=1e-3)")
        section, name = key.split(".", 1)
        if section not in SECTIONS and section != "method":
            raise _unknown(section, [*SECTIONS, "method"])
        merged.setdefault(section, {})[name] = parse_value(text.strip())
    return merged


def from_dict(raw: dict[str, Any]) -> Config:
    """Validate a raw dict (as read from TOML) into a Config; every problem names its key."""
    for section in raw:
        if section not in SECTIONS and section != "method":
            raise _unknown(section, [*SECTIONS, "method"])
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: expected a table [{section}]")
    parts = {name: build_dataclass(cls, raw.get(name, {}), name) for name, cls in SECTIONS.items()}
    method_values = dict(raw.get("method", {}))
    name = method_values.pop("name", "lora")
    _check(isinstance(name, str), "method.name", f"expected a string, got {name!r}")
    return Config(**parts, method=_method(name, method_values))


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a TOML config (or the defaults when ``path`` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from err
    return from_dict(apply_overrides(raw, overrides))


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """The resolved config as nested plain values, ready for TOML."""
    out = {name: dataclasses.asdict(getattr(config, name)) for name in SECTIONS}
    out["method"] = {"name": config.method.name, **dataclasses.asdict(config.method.options)}
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # JSON's string escapes (quotes, backslashes, newlines, control characters as \uXXXX)
        # are all TOML basic-string escapes, so a prompt with a newline round-trips.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def to_toml(config: Config) -> str:
    """The resolved config as TOML text; ``load_config`` of it gives back an equal Config."""
    lines = []
    for section, values in to_dict(config).items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    return "\n".join(lines)


def from_toml(text: str) -> Config:
    """The Config of TOML text (inverse of ``to_toml``), e.g. one carried in a message."""
    return from_dict(tomllib.loads(text))
