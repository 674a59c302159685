"""Run configuration: frozen dataclasses, TOML loading, ``--set key=value`` overrides.

A config file has one table per section dataclass, each living with the module that owns it
([run] in fedfit.engine.run_config, [model] in fedfit.models.config, [data] in
fedfit.data.config, [server] in fedfit.server_opt, [devices] in fedfit.devices, [compress] in
fedfit.quantize, [privacy] in fedfit.privacy, [attack] in fedfit.attack); [train] (read by every method's client step) and [method] (a method's own
options, checked against its registered dataclass) are defined here, and this module
assembles them all into ``Config``. ``[method]`` holds ``name`` plus
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

from fedfit.attack import AttackConfig as AttackConfig
from fedfit.data.config import DataConfig as DataConfig
from fedfit.devices import DevicesConfig as DevicesConfig
from fedfit.engine.run_config import RunConfig as RunConfig
from fedfit.errors import ConfigError as ConfigError
from fedfit.errors import check, check_choice
from fedfit.log import log
from fedfit.models.config import ModelConfig as ModelConfig
from fedfit.privacy import PrivacyConfig as PrivacyConfig
from fedfit.quantize import CompressConfig as CompressConfig
from fedfit.server_opt import ServerConfig as ServerConfig

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
    bucket_by_length: bool = field(
        default=False,
        metadata={
            "help": "minibatches of similar-length examples (seeded; less padding, other "
            "batch composition)"
        },
    )

    def __post_init__(self) -> None:
        check(self.local_steps >= 0, "train.local_steps", "must be >= 0")
        check(self.local_epochs > 0, "train.local_epochs", "must be > 0")
        check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        check_choice(self.optimizer, "train.optimizer", CLIENT_OPTIMIZERS)
        check(self.lr > 0, "train.lr", "must be > 0")
        check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        check(0 <= self.momentum < 1, "train.momentum", "must be in [0, 1)")
        check(self.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")


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
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)


SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "server": ServerConfig,
    "devices": DevicesConfig,
    "compress": CompressConfig,
    "privacy": PrivacyConfig,
    "attack": AttackConfig,
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
    if isinstance(value, SetValue):
        if annotation is str:
            return value.string
        value = value.parsed
    if hint in (tuple, list):
        check(isinstance(value, list | tuple), key, f"expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(f"{key}[]", v, inner) for v in value)
    if annotation is float:
        check(
            isinstance(value, int | float) and not isinstance(value, bool),
            key,
            f"expected a number, got {value!r}",
        )
        check(math.isfinite(value), key, f"must be a finite number, got {value!r}")
        return float(value)
    if annotation is int:
        check(
            isinstance(value, int) and not isinstance(value, bool),
            key,
            f"expected an integer, got {value!r}",
        )
        return value
    if annotation is bool:
        check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if annotation is str:
        check(isinstance(value, str), key, f"expected a string, got {value!r}")
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


@dataclass(frozen=True)
class SetValue:
    """A ``--set`` value before it meets its key: the text as typed and its TOML reading.
    A string key takes the text (``--set run.name=inf`` names the run "inf"), any other key
    the parsed value."""

    text: str
    parsed: Any

    @property
    def string(self) -> str:
        """The value for a string key: a quoted TOML string unquoted, anything else as
        typed."""
        return self.parsed if isinstance(self.parsed, str) else self.text


def parse_value(text: str) -> Any:
    """A ``--set`` value: parsed as a TOML value (numbers, booleans, lists), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings onto a raw TOML dict (a new dict is returned)."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    parsed = []
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
        parsed.append((section, name, SetValue(text.strip(), parse_value(text.strip()))))
    file_method = merged.get("method", {})
    new_name = next((v.string for s, n, v in parsed if (s, n) == ("method", "name")), None)
    if isinstance(file_method, dict) and new_name not in (None, file_method.get("name", "lora")):
        # another method: the file's [method] options were the old method's
        dropped = sorted(k for k in file_method if k != "name")
        if dropped:
            log(f"--set method.name={new_name}: the config file's [method] options "
                f"({', '.join(dropped)}) were {file_method.get('name', 'lora')}'s; dropped")  # fmt: skip
        merged["method"] = {}
    for section, name, value in parsed:
        merged.setdefault(section, {})[name] = value
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
    name = name.string if isinstance(name, SetValue) else name
    check(isinstance(name, str), "method.name", f"expected a string, got {name!r}")
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
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not a UTF-8 text file ({err})") from err
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
