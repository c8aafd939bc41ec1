"""Typed configuration: frozen dataclasses loaded from YAML, with dotted command-line overrides.

One YAML file per pipeline; each stage owns a section (``ingest:``, ...) whose schema is that
stage's ``<Name>Config`` dataclass. Overrides look like ``ingest.resolution=64``; their values are
parsed as YAML scalars (``true``, ``3``, ``0.5``, ``null``, ``[1, 2]``). An unknown key or a value
of the wrong type is a :class:`ConfigError` that names the dotted key. Choosing a class is code,
never a string in YAML.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, naming the offending dotted key."""


# --------------------------------------------------------------------------- field roles

ROLE = "taming.role"
OMIT_DEFAULT = "taming.omit_default"  # added_field: left out of the hash at its default


def execution_field(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A field that changes how the work runs (batch sizes, CPUs, logging cadence), not what it
    produces: outside the config hash, so changing it keeps a committed output valid."""
    return dataclasses.field(default=default, metadata={ROLE: "execution"}, **kwargs)


def input_field(default: Any = "", **kwargs: Any) -> Any:
    """Where an input is (``*_uri``): outside the config hash; the input counts by its identity
    (a committed output's, a weights file's sha256, a source listing's digest)."""
    return dataclasses.field(default=default, metadata={ROLE: "input"}, **kwargs)


def output_field(default: Any = "", **kwargs: Any) -> Any:
    """Where the output goes: outside the config hash."""
    return dataclasses.field(default=default, metadata={ROLE: "output"}, **kwargs)


def added_field(default: Any, **kwargs: Any) -> Any:
    """A field a stage gained after outputs were made without it: at its default it is left out
    of the config hash, so those outputs keep their identity (and stay cached); any other value
    counts as usual."""
    return dataclasses.field(default=default, metadata={OMIT_DEFAULT: True}, **kwargs)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and build nested dataclasses."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if value is None and origin not in (Union, types.UnionType):
        raise ConfigError(f"{key}: null is not allowed (expected {_type_name(tp)})")
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key}: null is not allowed (expected {_type_name(tp)})")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} does not fit {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string: take it as the number it is
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a plain mapping, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]} (known keys of {prefix.rstrip('.') or cls.__name__}: "
            f"{', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key {prefix}{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from e


def to_dict_value(v: Any) -> Any:
    """A config value as plain YAML/JSON data (tuples become lists, dataclasses mappings)."""
    if dataclasses.is_dataclass(v):
        v = dataclasses.asdict(v)
    if isinstance(v, tuple | list):
        return [to_dict_value(x) for x in v]
    if isinstance(v, dict):
        return {k: to_dict_value(x) for k, x in v.items()}
    return v


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable mapping of a config dataclass."""
    return to_dict_value(cfg)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings to a nested mapping (values parsed as YAML)."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from e
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])} is a value, not a section (override {key})")
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:  # python/object tags included: plain YAML only, nothing is constructed
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"config file {path} is not plain YAML: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load(cls: type[T], path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> T:
    """Load ``cls`` from a YAML file (optional) plus dotted overrides."""
    data = read_yaml(path) if path else {}
    return from_dict(cls, apply_overrides(data, overrides))


def config_hash(cfg: Any) -> str:
    """A stable hash of the fields that determine a stage's output.

    Fields declared with :func:`execution_field`, :func:`input_field` or :func:`output_field` are
    left out (nested configs too): how the work runs, where the inputs are (they count by their own
    identity, see ``infra.stage.identity``) and where the output goes do not make an output
    "different".
    """
    blob = json.dumps(identity_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def identity_dict(cfg: Any) -> dict[str, Any]:
    """``to_dict(cfg)`` without the fields that carry a role (see :func:`config_hash`)."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f.metadata.get(ROLE):
            continue
        v = getattr(cfg, f.name)
        if f.metadata.get(OMIT_DEFAULT) and v == f.default:
            continue
        out[f.name] = identity_dict(v) if dataclasses.is_dataclass(v) else to_dict_value(v)
    return out


def role(cls: type, name: str) -> str | None:
    """The role a config field was declared with ("execution", "input", "output"), or None."""
    return {f.name: f.metadata.get(ROLE) for f in dataclasses.fields(cls)}[name]


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def field_comments(cls: type) -> dict[str, str]:
    """Each field's description as its source says it: the comment on the field's line, else the
    comment lines right above it (a dataclass and its bases; {} where the source is not at hand)."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        comments: dict[int, tuple[int, str]] = {}
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
        body = ast.parse(src).body[0]
        for stmt in getattr(body, "body", []):
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            inline = [comments[n][1] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments]
            above, n = [], stmt.lineno - 1
            while n in comments and comments[n][0] == stmt.col_offset:
                above.insert(0, comments[n][1])
                n -= 1
            text = " ".join(inline) or " ".join(above)
            if text:
                out[stmt.target.id] = text
    return out
