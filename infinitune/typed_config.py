"""Typed configuration on pydantic v2: every component owns a `Section`, built and checked from YAML.

A section's fields carry a docstring (a string literal right under the field, as torchtitan and litgpt write
them); pydantic reads them back (`use_attribute_docstrings`) and they become the CLI help, the generated config
reference and the JSON Schema's descriptions, so the documentation cannot drift from the code.

Values are taken as YAML gives them (pydantic's strict mode: no "5" for an integer, no "yes" for true), with
two allowances for what a YAML user means: a number written `2e-5` (a string to YAML 1.1) for a float, and a
number for a string. Every refusal is a `ConfigError` naming the full key path: unknown keys (with a
close-match suggestion), values of the wrong type, and rules between fields (`Section.check`).
"""

from __future__ import annotations

import copy
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticUndefined


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
    """For `Section.check`: raise a ConfigError on field `key` unless `condition` holds."""
    if not condition:
        raise ConfigError(key, message)


class Section(BaseModel):
    """A config section: unknown keys refused, types as YAML writes them, field docstrings as descriptions.
    Rules between fields go in `check`, with `require`."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

    def __init__(self, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise _config_error(type(self), e) from None

    def model_post_init(self, context: Any) -> None:
        self.check()

    def check(self) -> None:
        """Rules between fields; raise ConfigError (`require`) naming the field."""

    @field_validator("*", mode="before")
    @classmethod
    def _as_yaml_means(cls, value: Any, info: ValidationInfo) -> Any:
        return _as_meant(value, cls.model_fields[info.field_name].annotation)


def _as_meant(value: Any, tp: Any) -> Any:
    """What a YAML user means by `value` for a field of type `tp`: a number written `2e-5` (a string to YAML 1.1)
    for a float, a whole float for an integer, a number for a string; inside lists and mappings too."""
    allowed = _leaf_types(tp) - {type(None)}
    if isinstance(value, list):
        items = {t for t in allowed if typing.get_origin(t) in (list, Sequence)}
        return [_as_meant(v, typing.get_args(next(iter(items)))[0]) for v in value] if len(items) == 1 else value
    if isinstance(value, dict):
        maps = {t for t in allowed if typing.get_origin(t) in (dict, Mapping)}
        return {k: _as_meant(v, typing.get_args(next(iter(maps)))[1]) for k, v in value.items()} if maps else value
    if isinstance(value, str) and float in allowed and str not in allowed:
        try:  # YAML 1.1 reads `2e-5` (no dot) as a string
            return float(value)
        except ValueError:
            return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if isinstance(value, float) and value.is_integer() and int in allowed and float not in allowed:
        return int(value)
    if allowed == {str}:
        return str(value)
    return value


def _leaf_types(tp: Any) -> set:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return {t for arg in typing.get_args(tp) for t in _leaf_types(arg)}
    return {tp}


def from_dict(cls: type[Section], data: Mapping[str, Any] | None, key: str = "") -> Any:
    """Build section `cls` from plain data, refusing unknown keys and bad values with their key path."""
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(key, f"expected a mapping of {cls.__name__} fields, got {data!r}")
    try:
        return cls.model_validate(dict(data or {}))
    except ValidationError as e:
        raise _config_error(cls, e).under(key) from None


def _config_error(cls: type[BaseModel], error: ValidationError) -> ConfigError:
    """The first of pydantic's errors, as a ConfigError with its dotted key path and our wording."""
    first = error.errors(include_url=False)[0]
    path, section, annotation = [], cls, None
    loc, kind = first["loc"], first["type"]
    for i, part in enumerate(loc):
        if kind == "extra_forbidden" and i == len(loc) - 1:
            path.append(str(part))  # the unknown key itself
            break
        if isinstance(section, type) and issubclass(section, BaseModel) and part in section.model_fields:
            annotation = section.model_fields[part].annotation
        elif isinstance(part, int) or (annotation is not None and _mapping_value(annotation) is not None):
            annotation = _item_type(annotation)
        else:
            continue  # a union member's tag, not a key
        path.append(str(part))
        section = _model_in(annotation)
    key, value = ".".join(path), first.get("input")
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):
        return cause.under(key)
    if kind == "extra_forbidden":
        parent = _model_at(cls, path[:-1])
        known = list(parent.model_fields) if parent else []
        hint = difflib.get_close_matches(path[-1], known, n=1)
        extra = f" Did you mean {hint[0]!r}?" if hint else ""
        return ConfigError(key, f"unknown key.{extra} Known keys here: {', '.join(known)}.")
    if kind == "missing":
        parent = _model_at(cls, path[:-1])
        doc = parent.model_fields[path[-1]].description if parent else ""
        return ConfigError(key, f"required key is missing. {doc or ''}".strip())
    if kind == "literal_error":
        choices = typing.get_args(_strip_optional(annotation))
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        return ConfigError(key, f"must be one of {', '.join(repr(c) for c in choices)}; got {value!r}{extra}")
    bound = first.get("ctx") or {}
    if kind == "greater_than":
        return ConfigError(key, f"must be {'positive' if bound['gt'] == 0 else '> ' + str(bound['gt'])}; got {value!r}")
    if kind == "greater_than_equal":
        return ConfigError(key, f"must be >= {bound['ge']}; got {value!r}")
    expected = {
        "int_type": "an integer",
        "int_from_float": "an integer",
        "float_type": "a number",
        "bool_type": "true or false",
        "string_type": "a string",
        "list_type": "a list",
        "dict_type": "a mapping",
        "model_type": "a mapping",
    }.get(kind)
    union = typing.get_origin(_strip_optional(annotation)) in (Union, types.UnionType)
    if (expected is None or union) and annotation is not None:
        expected = type_name(annotation)
    return ConfigError(key, f"expected {expected}, got {value!r}" if expected else first["msg"])


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _mapping_value(tp: Any) -> Any:
    tp = _strip_optional(tp)
    return typing.get_args(tp)[1] if typing.get_origin(tp) in (dict, Mapping) else None


def _item_type(tp: Any) -> Any:
    tp = _strip_optional(tp)
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (dict, Mapping):
        return args[1]
    for arg in args:  # list[X], or a union holding one
        if typing.get_origin(arg) in (list, Sequence):
            return typing.get_args(arg)[0]
    return args[0] if args else Any


def _model_in(tp: Any) -> type[BaseModel] | None:
    for t in (tp, _strip_optional(tp), *typing.get_args(_strip_optional(tp))):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def _model_at(cls: type[BaseModel], path: list[str]) -> type[BaseModel] | None:
    section: Any = cls
    for part in path:
        if section is not None and part in section.model_fields:
            tp = section.model_fields[part].annotation
            section = _model_in(tp) or _model_in(_item_type(tp))
    return section


def json_schema(cls: type[Section]) -> dict[str, Any]:
    """The JSON Schema of a config (editors complete and check YAML with it)."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **cls.model_json_schema()}


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, Sequence):
        (item,) = typing.get_args(tp) or (Any,)
        return f"list of {type_name(item)}"
    if origin in (dict, Mapping) or (isinstance(tp, type) and issubclass(tp, BaseModel)):
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def describe(cls: type[Section], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key path, type, default, help) for every field of `cls`, recursing into nested sections."""
    rows = []
    for name, f in cls.model_fields.items():
        path = f"{prefix}{name}"
        if f.default is not PydanticUndefined:
            default = repr(f.default) if f.default is not None else "null"
        elif f.default_factory is not None:
            made = f.default_factory()  # type: ignore[call-arg]
            default = "see below" if isinstance(made, BaseModel) else repr(made)
        else:
            default = "(required)"
        rows.append((path, type_name(f.annotation), default, f.description or ""))
        inner = _model_in(f.annotation) or _model_in(_item_type(f.annotation))
        if inner is not None:
            listed = typing.get_origin(_strip_optional(f.annotation)) in (list, Sequence)
            rows.extend(describe(inner, f"{path}[]." if listed else f"{path}."))
    return rows


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
