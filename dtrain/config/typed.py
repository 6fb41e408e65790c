"""YAML file -> typed dataclasses, for run configs and Slurm cluster profiles alike.

YAML is read here and nowhere else. Every problem (unreadable file, duplicate key, unknown key, wrong type) is
collected with its dotted key path, so a user fixes a file in one pass; `ConfigError` carries them all.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")

# Keys an older dtrain read, with what replaced them: a config written for it is told what to write now, not only
# "unknown key". Dotted paths from the top of the file.
RENAMED = {
    "logging.tensorboard": "replaced by logging.report_to, a list (report_to: [tensorboard]; [] for none)",
}


class ConfigError(ValueError):
    """All problems found in a config, each prefixed by its dotted key path."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s){where}:\n{lines}")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice: YAML lets the last one win silently, which for
    a whole `deepspeed:` section turns one configuration into another without a word."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def parse_yaml(text: str, source: str) -> Any:
    """YAML text -> plain data (safe: no Python objects); ConfigError naming file and line on any problem."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError([f"{where}invalid YAML: {e.problem or e}"], source) from e
    except yaml.YAMLError as e:
        raise ConfigError([f"invalid YAML: {e}"], source) from e


def read_yaml(path: str | os.PathLike) -> Any:
    """A YAML file -> plain data; ConfigError (not a traceback) for a missing, unreadable or non-UTF-8 file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"not UTF-8 text (byte {e.start}): a config must be a UTF-8 YAML file"], source) from e
    except OSError as e:
        raise ConfigError([f"cannot read: {e.strerror}"], source) from e
    return parse_yaml(text, source)


def apply_override(raw: dict, item: str) -> list[str]:
    """Apply `a.b.c=value` (value parsed as a YAML scalar/list) to the raw dict in place."""
    key, sep, value = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        return [f"override {item!r}: expected key.sub=value"]
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            return [f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section"]
        node = child
    try:
        node[parts[-1]] = parse_yaml(value, f"override {item!r}") if value != "" else None
    except ConfigError:
        node[parts[-1]] = value
    return []


def load_typed(tp: type[T], path: str | os.PathLike, validate: Callable[[T], list[str]] | None = None) -> T:
    """Any YAML file -> dataclass `tp`: types checked, unknown keys rejected, then `validate(obj)` for cross-field
    problems; raises one ConfigError listing every problem."""
    raw = read_yaml(path)
    problems: list[str] = []
    obj = convert(tp, {} if raw is None else raw, "", problems)
    if validate is not None:
        problems += guarded(lambda: validate(obj))
    if problems:
        raise ConfigError(problems, str(path))
    return obj


def guarded(check: Callable[[], list[str]]) -> list[str]:
    """Run a cross-field check; a value of the wrong type has already been reported by the conversion, and a check
    tripping over it must not hide the other problems."""
    try:
        return check()
    except TypeError:
        return []


def one_of(key: str, value: Any, choices: typing.Iterable[str]) -> list[str]:
    choices = list(choices)
    return [] if value in choices else [f"{key}: must be one of {', '.join(map(repr, choices))}, got {value!r}"]


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists of dicts -> {dotted key: leaf}; lists of plain values stay one leaf."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(node, list) and any(isinstance(v, dict) for v in node):
        out = {f"{prefix}.count": len(node)}
        for i, v in enumerate(node):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: node}


def describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


def convert(tp: Any, value: Any, key: str, problems: list[str]) -> Any:
    """Convert `value` to type `tp`, appending `key: problem` for every mismatch; returns a best-effort value."""
    where = key or "top level"
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _convert_section(tp, value, key, problems)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in (o for o in options if o is not type(None)):
            trial: list[str] = []
            converted = convert(option, value, key, trial)
            if not trial:
                return converted
        names = " or ".join("null" if o is type(None) else _type_name(o) for o in options)
        problems.append(f"{where}: expected {names}, got {describe(value)}")
        return None
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            problems.append(f"{where}: must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {describe(value)}")
            return []
        (item_tp,) = typing.get_args(tp)
        return [convert(item_tp, v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {describe(value)}")
            return {}
        _, val_tp = typing.get_args(tp)
        return {str(k): convert(val_tp, v, f"{key}.{k}", problems) for k, v in value.items()}
    return _convert_scalar(tp, value, where, problems)


def _convert_section(tp: Any, value: Any, key: str, problems: list[str]) -> Any:
    if not isinstance(value, dict):
        problems.append(f"{key or 'top level'}: expected a section (mapping), got {describe(value)}")
        return tp()
    hints = typing.get_type_hints(tp)
    names = {f.name for f in dataclasses.fields(tp) if f.init}
    prefix = key + "." if key else ""
    for unknown in sorted(set(value) - names, key=str):
        renamed = RENAMED.get(f"{prefix}{unknown}")
        known = f"unknown key (known here: {', '.join(sorted(names))})"
        problems.append(f"{prefix}{unknown}: {renamed or known}")
    kwargs = {name: convert(hints[name], value[name], prefix + name, problems) for name in names if name in value}
    return tp(**kwargs)


def _convert_scalar(tp: type, value: Any, where: str, problems: list[str]) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        number = _number(value)
        if number is not None and math.isfinite(number):
            return number
        if number is not None:  # .nan / .inf parse as floats but no knob of dtrain means anything with them
            problems.append(f"{where}: must be a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    problems.append(f"{where}: expected {_type_name(tp)}, got {describe(value)}")
    return value


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads "2e-5" as a string; accept what is plainly a number
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "a section"
    if typing.get_origin(tp) is list:
        return "a list"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))
