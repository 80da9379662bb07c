"""Typed run configuration: dataclass schemas, YAML files and ``key=value`` overrides.

Every stage describes its settings as a (possibly nested) dataclass whose defaults are the recipe
it implements. :func:`load_config` layers a YAML file and command-line overrides on top of the
defaults; nested fields are addressed with dots (``optim.lr=1e-3``). An unknown key or a value of
the wrong type is a :class:`~selfsup.errors.UsageError` naming the key (and the closest valid one).
"""

from __future__ import annotations

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
    hint = f" (did you mean '{close[0]}'?)" if close else f"; valid keys: {', '.join(sorted(valid))}"
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
        raise errors[0] if len(errors) == 1 else UsageError(f"config key '{key}' got {value!r}: " + "; ".join(errors))
    if origin is typing.Literal:
        if value in args:
            return value
        raise UsageError(f"config key '{key}' must be one of {', '.join(map(repr, args))}, got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):  # "a,b,c" on the command line
            value = [_scalar(v) for v in value.split(",") if v]
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
        raise UsageError(f"config key '{key}' expects a string, got {value!r}")
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


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> (["optim", "lr"], 0.001); the value is parsed as a YAML scalar."""
    if "=" not in text:
        raise UsageError(f"override '{text}' is not of the form key=value (e.g. epochs=10)")
    key, raw = text.split("=", 1)
    if not key:
        raise UsageError(f"override '{text}' has no key before '='")
    return key.split("."), _scalar(raw)


def _scalar(raw: str) -> Any:
    """A command-line value parsed as a YAML scalar (``3``, ``true``, ``null``, ``[1, 2]``)."""
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


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
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
        key_path, value = parse_override(text)
        data = _merge(data, _nest(key_path, value))
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
    from selfsup.checkpoint import atomic_write_bytes

    path = Path(path)
    text = yaml.safe_dump(to_dict(config), sort_keys=False)
    atomic_write_bytes(path, text.encode())
    return path
