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


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a type annotation, converting only where it loses nothing."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except UsageError as err:
                errors.append(str(err))
        raise (
            errors[0]
            if len(errors) == 1
            else UsageError(f"config key '{key}' got {value!r}: " + "; ".join(errors))
        )
    if origin is typing.Literal:
        if value in args:
            return value
        raise UsageError(
            f"config key '{key}' must be one of {', '.join(map(repr, args))}, got {value!r}{_yaml11_hint(value)}"
        )
    if origin in (list, tuple):
        if isinstance(value, str):  # "a,b,c" in a YAML file
            return _from_text(value, annotation, key)
        if not isinstance(value, list | tuple):
            raise UsageError(f"config key '{key}' expects a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise UsageError(f"config key '{key}' expects {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        item = args[0] if args else Any
        out = [_coerce(v, item, key) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise UsageError(f"config key '{key}' expects a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise UsageError(f"config key '{key}' expects true or false, got {value!r}")
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise UsageError(f"config key '{key}' expects a number, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UsageError(f"config key '{key}' expects an integer, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # e.g. a dataset called "101" parsed as a number by YAML
        raise UsageError(f"config key '{key}' expects a string, got {value!r}{_yaml11_hint(value)}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise UsageError(f"config key '{key}' expects a mapping of its fields, got {value!r}")
        return _from_dict(annotation, value, prefix=f"{key}.")
    return value


def _from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key(key, list(hints), prefix)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
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


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}
_NULL = {"null", "none", "~"}


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """(X, True) for ``X | None``; (annotation, False) otherwise."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) < len(typing.get_args(annotation)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True  # noqa: UP007 (built at run time)
    return annotation, False


def _from_text(raw: str, annotation: Any, key: str) -> Any:
    """Command-line text typed by the field it sets: what the user typed is what the field gets.

    YAML 1.1 would read ``no``/``off`` as false and ``1e-3`` as a string; here a string or Literal
    field takes the raw text, a bool field accepts true/false/yes/no/on/off/1/0, a number field
    parses a number, an optional field takes null/none/~ as None.
    """
    inner, optional = _unwrap_optional(annotation)
    if optional and raw.strip().lower() in _NULL:
        return None
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if inner is Any or origin is dict:
        return _scalar(raw)
    if origin in (typing.Union, types.UnionType):  # e.g. int | str: the first that parses
        errors = []
        for option in args:
            try:
                return _from_text(raw, option, key)
            except UsageError as err:
                errors.append(str(err))
        raise UsageError(f"config key '{key}' got {raw!r}: " + "; ".join(errors))
    if origin is typing.Literal:
        for option in args:
            if raw == str(option) or (
                isinstance(option, bool) and raw.lower() in (_TRUE if option else _FALSE)
            ):
                return option
        raise UsageError(f"config key '{key}' must be one of {', '.join(map(repr, args))}, got {raw!r}")
    if origin in (list, tuple):
        text = raw.strip()
        if text.startswith("["):
            items = _scalar(text)
            if not isinstance(items, list):
                raise UsageError(f"config key '{key}' expects a list such as [1, 2] or 1,2, got {raw!r}")
            items = [str(v) if not isinstance(v, str) else v for v in items]
        else:
            items = [v.strip() for v in text.split(",") if v.strip()]
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(items):
                raise UsageError(f"config key '{key}' expects {len(args)} values, got {len(items)} ({raw!r})")
            return tuple(_from_text(v, a, key) for v, a in zip(items, args))
        item = args[0] if args else Any
        return [_from_text(v, item, key) for v in items]
    if inner is bool:
        if raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise UsageError(f"config key '{key}' expects true or false, got {raw!r}")
    if inner in (int, float):
        try:
            return inner(raw.strip())
        except ValueError:
            kind = "an integer" if inner is int else "a number"
            raise UsageError(f"config key '{key}' expects {kind}, got {raw!r}") from None
    if inner is str:
        return raw
    if dataclasses.is_dataclass(inner):
        raise UsageError(f"config key '{key}' is a group of settings: set its fields, e.g. {key}.<field>=...")
    return _scalar(raw)


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
    return _from_text(raw, annotation, ".".join(path))


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


def parse_command(
    parser: argparse.ArgumentParser, argv: list[str] | None, flags: dict[str, str]
) -> tuple[argparse.Namespace, list[str]]:
    """Every command's line: named flags plus ``key=value`` overrides anywhere among them.

    ``flags`` maps an argparse destination to the config key it sets; the overrides are those
    ``key=value`` pairs first, then the positional ones (so a positional override wins).
    """
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)  # key=value before and after the flags
    named = [f"{key}={getattr(args, dest)}" for dest, key in flags.items() if getattr(args, dest) is not None]
    return args, named + list(args.overrides)
