"""Typed run configuration: dataclass schemas, YAML files and ``key=value`` overrides.

Every stage describes its settings as a (possibly nested) dataclass whose defaults are the recipe
it implements. :func:`load_config` layers a YAML file and command-line overrides on top of the
defaults; nested fields are addressed with dots (``optim.lr=1e-3``). An unknown key or a value of
the wrong type is a :class:`~selfsup.errors.UsageError` naming the key (and the closest valid one).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from selfsup.errors import UsageError

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, valid: list[str], where: str) -> UsageError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" (did you mean '{where}{close[0]}'?)" if close else f"; valid keys: {', '.join(sorted(valid))}"
    return UsageError(f"unknown config key '{where}{key}'{hint}")


# --- one type dispatcher for YAML values and command-line text ----------------------------------
#
# A value reaches a field either from the YAML file (already typed by YAML 1.1) or from the command
# line (text). Both go through the same converter, chosen by the field's type, so a value means the
# same wherever it is given. The one rule for text: a string is read by the field's type, because
# YAML 1.1 (PyYAML) reads ``1e-3`` as a string and ``no``/``off`` as false; a ``str`` or Literal
# field keeps what was typed, a bool field takes true/false/yes/no/on/off/1/0, a number field
# parses a number, an optional field takes null/none/~ as None.

_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}
_NULL = {"null", "none", "~"}


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """``value`` (from YAML or the command line) as the field typed ``annotation`` takes it."""
    if dataclasses.is_dataclass(annotation):
        return _group(value, annotation, key)
    convert = _BY_TYPE.get(annotation) or _BY_ORIGIN.get(typing.get_origin(annotation), _untyped)
    return convert(value, annotation, key)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _bool(value: Any, annotation: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if isinstance(value, int) and value in (0, 1):  # ``amp: 1`` as ``amp=1``
        return bool(value)
    raise UsageError(f"config key '{key}' expects true or false, got {value!r}")


def _number(value: Any, annotation: Any, key: str) -> int | float:
    kind = "an integer" if annotation is int else "a number"
    if isinstance(value, str):
        try:
            return annotation(value.strip())
        except ValueError:
            raise UsageError(f"config key '{key}' expects {kind}, got {value!r}") from None
    if _is_number(value) and (annotation is float or isinstance(value, int)):
        return annotation(value)
    raise UsageError(f"config key '{key}' expects {kind}, got {value!r}")


def _str(value: Any, annotation: Any, key: str) -> str:
    if isinstance(value, str):
        return value
    if _is_number(value):
        return str(value)  # e.g. a dataset called "101" that YAML read as a number
    raise UsageError(f"config key '{key}' expects a string, got {value!r}{_yaml11_hint(value)}")


def _literal(value: Any, annotation: Any, key: str) -> Any:
    options = typing.get_args(annotation)
    for option in options:
        if value == option if not isinstance(value, str) else _spells(value, option, key):
            return option
    raise UsageError(
        f"config key '{key}' must be one of {', '.join(map(repr, options))}, got {value!r}{_yaml11_hint(value)}"
    )


def _spells(text: str, option: Any, key: str) -> bool:
    """Whether ``text`` names ``option``: its spelling, or read by its type (``"16"`` for 16)."""
    if isinstance(option, str):
        return text == option
    try:
        return _convert(text, type(option), key) == option
    except UsageError:
        return False


def _union(value: Any, annotation: Any, key: str) -> Any:
    options = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(options) < len(typing.get_args(annotation)) and _is_null(value):
        return None
    errors = []
    for option in options:  # e.g. int | str: the first that takes the value
        try:
            return _convert(value, option, key)
        except UsageError as err:
            errors.append(err)
    if len(errors) == 1:
        raise errors[0]
    raise UsageError(f"config key '{key}' got {value!r}: " + "; ".join(map(str, errors)))


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _NULL)


def _sequence(value: Any, annotation: Any, key: str) -> list | tuple:
    if isinstance(value, str):
        value = _items(value, key)
    if not isinstance(value, list | tuple):
        raise UsageError(f"config key '{key}' expects a list, got {value!r}")
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(args) != len(value):
            raise UsageError(f"config key '{key}' expects {len(args)} values, got {len(value)} ({value!r})")
        return tuple(_convert(v, a, key) for v, a in zip(value, args))
    items = [_convert(v, args[0] if args else Any, key) for v in value]
    return tuple(items) if origin is tuple else items


def _items(text: str, key: str) -> list:
    """``"[1, 2]"`` read as YAML, ``"1,2"`` split at the commas."""
    text = text.strip()
    if not text.startswith("["):
        return [v.strip() for v in text.split(",") if v.strip()]
    items = _scalar(text)
    if not isinstance(items, list):
        raise UsageError(f"config key '{key}' expects a list such as [1, 2] or 1,2, got {text!r}")
    return items


def _mapping(value: Any, annotation: Any, key: str) -> dict:
    if isinstance(value, str):
        value = _scalar(value)  # extra={depth: 4}
    if not isinstance(value, dict):
        raise UsageError(f"config key '{key}' expects a mapping, got {value!r}")
    return dict(value)


def _group(value: Any, annotation: Any, key: str) -> Any:
    if not isinstance(value, dict):
        raise UsageError(
            f"config key '{key}' is a group of settings: set its fields ({key}.<field>=... on the command "
            f"line, a mapping in YAML), got {value!r}"
        )
    return _from_dict(annotation, value, prefix=f"{key}.")


def _untyped(value: Any, annotation: Any, key: str) -> Any:
    """No declared type (``Any``): a string is read as a YAML scalar, anything else kept."""
    return _scalar(value) if isinstance(value, str) else value


_BY_TYPE: dict[Any, Any] = {bool: _bool, int: _number, float: _number, str: _str}
_BY_ORIGIN: dict[Any, Any] = {
    typing.Union: _union,
    types.UnionType: _union,
    typing.Literal: _literal,
    list: _sequence,
    tuple: _sequence,
    dict: _mapping,
}


# --- each field's rule, declared beside it ------------------------------------------------------
#
# A number, a list of numbers or a checked string declares the values it accepts where it is
# declared (``lr: float = setting(1e-3, gt=0)``); load_config checks every rule before the config
# (and its cross-field checks in __post_init__) is built, and names the key, the value and what is
# expected in one line. tests/test_bad_values.py walks every stage's config: a numeric field without
# a rule fails it, so a new key cannot be added without one.


@dataclasses.dataclass(frozen=True)
class Rule:
    """The values a field accepts: bounds (``gt``/``ge``/``lt``/``le``), ``choices``, a ``check`` that
    returns what is expected when a value fails (None when it passes). Floats must be finite; the rule
    applies to each item of a list or tuple (``nonempty``: at least one item). None passes where the
    field's type allows it."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple[Any, ...] | None = None
    nonempty: bool = False
    check: Any = None  # Callable[[Any], str | None]

    def expected(self) -> str:
        """What the rule accepts, in words: "at least 1", "strictly between 0 and 1", "in [0, 1)"."""
        if self.choices is not None:
            *head, last = map(str, self.choices)
            return f"{', '.join(head)} or {last}" if head else last
        low, high = _end(self.gt, self.ge), _end(self.lt, self.le)
        if low and high:
            if low[1] and high[1]:
                return f"strictly between {low[0]} and {high[0]}"
            return f"in {'(' if low[1] else '['}{low[0]}, {high[0]}{')' if high[1] else ']'}"
        if low:
            return f"above {low[0]}" if low[1] else f"at least {low[0]}"
        if high:
            return f"below {high[0]}" if high[1] else f"at most {high[0]}"
        return "valid"

    def problem(self, value: Any) -> str | None:
        """What is expected, when ``value`` (one item) breaks the rule; None when it passes."""
        if self.check is not None and (expected := self.check(value)):
            return expected
        if self.choices is not None:
            return None if value in self.choices else self.expected()
        if not _is_number(value):
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return "a finite number" + ("" if self.expected() == "valid" else f" {self.expected()}")
        return None if self._inside(value) else self.expected()

    def _inside(self, value: float) -> bool:
        return (
            (self.gt is None or value > self.gt)
            and (self.ge is None or value >= self.ge)
            and (self.lt is None or value < self.lt)
            and (self.le is None or value <= self.le)
        )


def _end(strict: float | None, loose: float | None) -> tuple[str, bool] | None:
    """A bound as (its value in words, whether it is strict); None where there is none."""
    if strict is not None:
        return f"{strict:g}", True
    return None if loose is None else (f"{loose:g}", False)


def setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **rule: Any) -> Any:
    """A config field with its rule: ``base_lr: float = setting(3e-4, gt=0)``; ``factory`` for lists."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"rule": Rule(**rule)})


def rule_of(field: dataclasses.Field) -> Rule | None:
    return field.metadata.get("rule")


def _check_rules(cls: type, values: dict[str, Any], prefix: str) -> None:
    """Every field of ``cls`` given in ``values`` against its rule; one UsageError line otherwise."""
    for f in dataclasses.fields(cls):
        rule, value = rule_of(f), values.get(f.name)
        if rule is None or value is None:
            continue
        items = value if isinstance(value, list | tuple) else (value,)
        problems = [f"be {p}" for p in map(rule.problem, items) if p]
        if rule.nonempty and not items:
            problems.append("hold at least one value")
        if problems:
            each = "each " if isinstance(value, list | tuple) and items else ""
            null = " (or null)" if _unwrap_optional(_field_types(cls)[f.name])[1] else ""
            raise UsageError(f"{prefix}{f.name} must {each}{problems[0]}{null}, got {value!r}")


def check_rules(config: Any) -> None:
    """Every top-level field of a built config against its rule, as :func:`load_config` checks the
    values it reads: for a config made in code (``__post_init__``). One UsageError line otherwise."""
    _check_rules(type(config), {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}, "")


def _from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key(key, list(hints), prefix)
        kwargs[key] = _convert(value, hints[key], prefix + key)
    _check_rules(cls, kwargs, prefix)  # before __post_init__'s cross-field checks see the values
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _yaml11_hint(value: Any) -> str:
    if isinstance(value, bool):
        return " (a YAML file reads no/off/yes/on as booleans: quote the value, e.g. 'no')"
    return ""


def parse_override(text: str) -> tuple[list[str], str]:
    """``"optim.lr=1e-3"`` -> (["optim", "lr"], "1e-3"); the text is typed by :func:`typed_override`."""
    if "=" not in text:
        raise UsageError(f"override '{text}' is not of the form key=value (e.g. epochs=10)")
    key, raw = text.split("=", 1)
    if not key or "" in key.split("."):
        raise UsageError(f"override '{text}' has an empty key before '=' (expected e.g. optim.base_lr=1e-4)")
    return key.split("."), raw


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """(X, True) for ``X | None``; (annotation, False) otherwise."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) < len(typing.get_args(annotation)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True  # noqa: UP007 (built at run time)
    return annotation, False


def typed_override(cls: type, path: list[str], raw: str) -> Any:
    """The value of override ``path=raw`` for config class ``cls``, typed by the field it sets."""
    annotation: Any = cls
    for depth, part in enumerate(path):
        inner, _ = _unwrap_optional(annotation)
        if typing.get_origin(inner) is dict or inner is Any:
            return _scalar(raw)  # free-form mapping (e.g. model.extra.depth): YAML decides
        if not dataclasses.is_dataclass(inner):
            where = ".".join(path[:depth])
            raise UsageError(f"config key '{where}' is a single value, it has no field '{part}'")
        hints = _field_types(inner)
        if part not in hints:
            raise _unknown_key(part, list(hints), "".join(p + "." for p in path[:depth]))
        annotation = hints[part]
    return _convert(raw, annotation, ".".join(path))


def _scalar(raw: str) -> Any:
    """A value with no declared type (``extra``, ``Any``) parsed as a YAML scalar (``3``, ``true``, ``[1, 2]``)."""
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
    return value


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in ("nan", "inf", "-inf", "infinity", "-infinity")


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    for part in reversed(path):
        value = {part: value}
    return value  # type: ignore[return-value]


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> T:
    """Defaults of ``cls``, then the YAML file at ``path``, then ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"config file {path} does not exist (expected a YAML file, e.g. configs/...)")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            first = str(err).splitlines()[0]
            raise UsageError(f"config file {path} is not valid YAML: {first}") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"config file {path} must hold a mapping of keys to values")
        data = loaded
    for text in overrides:
        key_path, raw = parse_override(text)
        data = _merge(data, _nest(key_path, typed_override(cls, key_path, raw)))
    merged = _merge(to_dict(cls()), data)  # type: ignore[call-arg]
    return _from_dict(cls, merged)


def to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain YAML/JSON-safe values (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(config))


def save_config(config: Any, path: str | Path) -> Path:
    """Write the resolved config beside a run's outputs (atomically), so the run can be repeated."""
    from selfsup.files import atomic_write_bytes

    path = Path(path)
    text = yaml.safe_dump(to_dict(config), sort_keys=False)
    atomic_write_bytes(path, text.encode())
    return path


class CommandParser(argparse.ArgumentParser):
    """argparse whose refusals are the project's: one line and exit code 2 (a UsageError through
    :func:`~selfsup.errors.exits_cleanly`) instead of the usage text."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def flag_type(kind: type, **rule: Any) -> typing.Callable[[str], Any]:
    """An argparse ``type`` held to a config field's :class:`Rule`: ``type=flag_type(int, ge=1)``."""
    checked = Rule(**rule)

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects {kind.__name__}, got {text!r}") from None
        problem = checked.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(f"must be {problem}, got {text}")
        return value

    return convert


def parse_command(
    parser: argparse.ArgumentParser, argv: list[str] | None, keys: dict[str, str | None] | None = None
) -> tuple[argparse.Namespace, list[str]]:
    """Every command's line: named flags plus ``key=value`` overrides anywhere among them.

    A flag sets the config key of its own name (``--data-root`` -> ``data_root``); ``keys`` maps a
    destination to another key (``teacher`` -> ``distill.teacher``) or, with ``None``, keeps it off the
    config. A repeated flag's list is passed as one JSON list (a YAML flow list that quotes any path).
    The flags become overrides first, then the positional ones (so a positional override wins).
    """
    if "overrides" not in {action.dest for action in parser._actions}:  # a parser parsed twice
        parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)  # key=value before and after the flags
    keys = {"config": None, "overrides": None, **(keys or {})}
    named = [
        f"{keys.get(dest, dest)}={json.dumps(value) if isinstance(value, list) else value}"
        for dest, value in vars(args).items()
        if keys.get(dest, dest) is not None and value is not None
    ]
    return args, named + list(args.overrides)
