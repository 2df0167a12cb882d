"""Typed configuration: plain dataclasses, checked when built from YAML.

Every component owns a small dataclass whose fields carry a docstring (a string literal right under the
field, as torchtitan and litgpt write them). Those docstrings are read back with `ast` and become the CLI
help and the generated config reference, so the documentation cannot drift from the code.

`from_dict` builds a dataclass from plain data (parsed YAML) and refuses, naming the full key path:
unknown keys (with a close-match suggestion), values of the wrong type, and values that `__post_init__`
rejects. Nothing here knows about any particular component.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import functools
import inspect
import itertools
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or impossible. `key` is its dotted path."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)

    def __reduce__(self):  # crosses process boundaries (Ray, multiprocessing)
        return ConfigError, (self.key, self.message)

    def under(self, prefix: str) -> ConfigError:
        """The same error, with its key placed under `prefix`."""
        if not prefix:
            return self
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.message)


def require(condition: bool, key: str, message: str) -> None:
    """For `__post_init__`: raise a ConfigError on field `key` unless `condition` holds."""
    if not condition:
        raise ConfigError(key, message)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass `cls` (and of its dataclass bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source (frozen app): help text is simply absent
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, following in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(following.value.value)
    return docs


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, Sequence):
        (item,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(item)}"
    if origin in (dict, Mapping):
        return "mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (converted where that is lossless)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(key, f"must be one of {', '.join(repr(c) for c in choices)}; got {value!r}{extra}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, key)
    if origin in (list, Sequence):
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return [_convert(v, item, f"{key}.{i}") for i, v in enumerate(value)]
    if origin in (dict, Mapping):
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return {_convert(k, key_tp, key): _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `2e-5` (no dot) as a string; a user writing it means a number.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, f"expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")


def from_dict(cls: type, data: Mapping[str, Any] | None, key: str = "") -> Any:
    """Build dataclass `cls` from `data`, refusing unknown keys and bad values with their key path."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        name = unknown[0]
        hint = difflib.get_close_matches(str(name), list(fields), n=1)
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        full = f"{key}.{name}" if key else str(name)
        raise ConfigError(full, f"unknown key.{extra} Known keys here: {', '.join(fields)}.")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{key}.{name}" if key else name)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        full = f"{key}.{missing[0]}" if key else missing[0]
        raise ConfigError(full, f"required key is missing. {field_docs(cls).get(missing[0], '')}".strip())
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.under(key) from None


def to_dict(obj: Any) -> Any:
    """Plain data (for YAML and JSON) from a config dataclass."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as a YAML scalar or flow collection)."""
    if "=" not in text:
        raise ConfigError(text, "an override must look like section.key=value")
    path, _, raw = text.partition("=")
    parts = path.strip().split(".")
    if not all(parts):
        raise ConfigError(path, "an override key must be a dotted path such as train.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(path, f"cannot parse the value {raw!r}: {e}") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each `section.key=value` in nested plain `data` (a copy). List items are addressed by index."""
    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(where, f"no list item {part} (the list has {len(node)})")
                node = node[int(part)]
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            if not isinstance(node, (dict, list)):
                raise ConfigError(where, f"is a value ({node!r}), not a section; cannot set {text}")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(".".join(parts), f"no list item {last} (the list has {len(node)})")
            node[int(last)] = value
        else:
            node[last] = value
    return data


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key path, type, default, help) for every field of `cls`, recursing into nested sections."""
    rows = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = f"{prefix}{f.name}"
        if f.default is not dataclasses.MISSING:
            default = repr(f.default) if f.default is not None else "null"
        elif f.default_factory is not dataclasses.MISSING:
            made = f.default_factory()
            default = "see below" if dataclasses.is_dataclass(made) else repr(to_dict(made))
        else:
            default = "(required)"
        rows.append((path, _type_name(tp), default, docs.get(f.name, "")))
        inner = [a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)]
        if inner:
            rows.extend(describe(inner[0], f"{path}[]." if typing.get_origin(tp) is list else f"{path}."))
    return rows
