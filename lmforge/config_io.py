"""Nested dataclasses <-> YAML, with nanoGPT's configurator behaviour minus its `exec`.

A recipe (YAML) holds only what differs from the defaults; `a.b=c` overrides on the command line go on
top. Every value is parsed (YAML scalars, so `[0.9, 0.95]`, `null` and `true` work) and then checked
against the field's type: an unknown key is rejected with the nearest valid key, a wrongly typed value
is named with its dotted path ("optim.lr must be a float, got 'abc'").
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lmforge.errors import UserError

T = TypeVar("T")


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """An instance of dataclass `cls` from its defaults, then the YAML file at `path`, then the overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key:
            raise UserError(f"override {item!r} must look like key=value (e.g. optim.lr=3e-4)")
        _check_key(cls, key)
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):  # the YAML gave a scalar where a section belongs
                child = node[p] = {}
            node = child
        node[leaf] = _Raw(raw)
    return from_dict(cls, data)


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build `cls` from a (possibly partial) nested dict; missing fields keep their defaults."""
    if not isinstance(data, dict):
        raise UserError(f"{prefix or 'the config'} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            raise UserError(f"unknown key {path!r}{_suggestion(cls, path)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise UserError(f"{path} is a section; set its keys, e.g. {path}.{_first_field(tp)}=...")
            kwargs[key] = from_dict(tp, {**_explicit(fields[key]), **value}, prefix=f"{path}.")
        else:
            kwargs[key] = _coerce(value, tp, path)
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) of a dataclass instance."""
    return _plain(dataclasses.asdict(obj))


def dump(obj: Any) -> str:
    """The whole resolved config as YAML, in field order."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None)


# --------------------------------------------------------------------------------------------- helpers


class _Raw(str):
    """A command-line value not parsed yet: YAML-parsed when checked, kept verbatim for str fields."""


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file {path} not found") from None
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"{path} is not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of keys to values, not a {type(data).__name__}")
    return data


def _explicit(field: dataclasses.Field) -> dict[str, Any]:
    """The values a parent's default sets on a nested section, minus those derived in __post_init__.

    A field whose class default is None but whose default instance holds a value was filled in by
    __post_init__ (e.g. ModelConfig.intermediate_size from n_embd); dropping it lets it be derived again
    from the overridden sizes instead of going stale.
    """
    if field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    elif field.default is not dataclasses.MISSING:
        default = field.default
    else:
        return {}
    if default is None:
        return {}
    out = {}
    for f in dataclasses.fields(default):
        value = getattr(default, f.name)
        if f.default is None and value is not None:
            continue
        out[f.name] = _asdict_shallow(value)
    return out


def _asdict_shallow(value: Any) -> Any:
    return to_dict(value) if dataclasses.is_dataclass(value) else value


def _first_field(cls: type) -> str:
    return dataclasses.fields(cls)[0].name


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            out += _all_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def _suggestion(cls: type, path: str) -> str:
    # Suggest among every key of the section's whole tree: `lr` -> `optim.lr` is the common slip.
    keys = _all_keys(cls)
    leaf = path.rsplit(".", 1)[-1]
    prefix = path[: len(path) - len(leaf)]
    full = [prefix + k for k in keys]
    same_leaf = [k for k in full if k.rsplit(".", 1)[-1] == leaf]
    close = same_leaf or difflib.get_close_matches(path, full, n=1, cutoff=0.6)
    if not close:
        close = [prefix + k for k in difflib.get_close_matches(leaf, keys, n=1, cutoff=0.6)]
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(full[:12])}, ..."


def _check_key(cls: type, key: str) -> None:
    node: type = cls
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(node)
        names = {f.name for f in dataclasses.fields(node) if f.init}
        if part not in names:
            path = ".".join(parts[: i + 1])
            keys = _all_keys(cls)
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
            close = close or [k for k in keys if k.rsplit(".", 1)[-1] == parts[-1]]
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(f"unknown key {path!r}{hint}")
        tp = hints[part]
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(tp):
                raise UserError(f"{'.'.join(parts[: i + 1])} is a value, not a section: set {part}=...")
            node = tp
        elif dataclasses.is_dataclass(tp):
            raise UserError(f"{key} is a section; set its keys, e.g. {key}.{_first_field(tp)}=...")


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        count = f"{len(args)} " if origin is tuple and args[-1] is not Ellipsis else ""
        return f"a list of {count}{_PLURAL.get(args[0], 'values')}"
    return _SINGULAR.get(tp, getattr(tp, "__name__", str(tp)))


_SINGULAR = {int: "an integer", float: "a float", bool: "true or false", str: "a string"}
_PLURAL = {int: "integers", float: "floats", bool: "booleans", str: "strings"}


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any, path: str) -> Any:
    raw = value if isinstance(value, _Raw) else None
    if raw is not None:
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = str(raw)
    try:
        return _check(value, tp)
    except _Mismatch:
        if raw is not None and _accepts_str(tp):
            return str(raw)  # name=2024 means the string "2024"
        shown = str(raw) if raw is not None else value
        raise UserError(f"{path} must be {_type_name(tp)}, got {shown!r}") from None


def _accepts_str(tp: Any) -> bool:
    return tp is str or (
        typing.get_origin(tp) in (types.UnionType, typing.Union) and str in typing.get_args(tp)
    )


def _check(value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        # Exact types first, so 3 stays an int in `int | float` and "1e-3" only becomes a float if no
        # member takes the string as it is.
        for arg in sorted(args, key=lambda a: a is float):
            try:
                return _check(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)  # 1e6 in YAML
        raise _Mismatch
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # PyYAML reads 1e-3 (no dot) as a string
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise _Mismatch
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _Mismatch
            return tuple(_check(v, a) for v, a in zip(value, args, strict=True))
        items = [_check(v, args[0]) for v in value] if args else list(value)
        return tuple(items) if origin is tuple else items
    raise TypeError(f"config_io cannot check values of type {tp!r}")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
