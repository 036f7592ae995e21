"""One way to read settings: a typed dataclass filled from layers of plain values (YAML files, KEY=VALUE).

Each command's settings are a dataclass with documented defaults (``extract.config.ExtractConfig``,
``train.config.TrainConfig``). A field whose type is itself a dataclass is a *section*; its fields can be
given flat (``lr``, when no other section has a field of that name and the section does not set ``DOTTED_ONLY``),
dotted (``optim.lr``), nested in YAML (``optim: {lr: 1e-3}``) or by an older name (:func:`setting_aliases`).
Layers are applied in order, later ones winning, and every problem (an unknown key, with the closest valid one;
a value of the wrong type; a value out of range) is collected and reported at once, naming the key.

Values are read by the field's type, with one set of rules for YAML files and the command line:

- numbers: every form a person types: ``1e-3``, ``3E-5``, ``.5``, ``1_000``, ``+2`` (YAML 1.1 reads ``1e-3``
  as a string; it is a number here). Decimal always, as YAML 1.2 reads them: ``010`` is 10 (YAML 1.1: octal
  8), and ``1:30`` is text, refused where a number is wanted (YAML 1.1: sexagesimal 90). Integers must be whole
  (``1e3`` is 1000, ``2.5`` is not an integer); NaN and infinities are refused;
- booleans: ``true/false``, ``yes/no``, ``on/off``, ``1/0`` (any case);
- tuples of strings: a list, or one comma-separated string;
- ``X | None``: ``None`` (YAML ``null`` or ``~``), ``none`` or ``null`` in any case.

A key given twice in a YAML mapping is refused, naming the key (YAML 1.1 kept the last value), and so is one
setting named twice in one layer (``lr`` and ``optim.lr``, or ``epochs=3 epochs=5``).

A field declared with ``metadata=NOT_A_SETTING`` is left out: it keeps its default (or what the owner's
``__post_init__`` derives) and is neither read nor recorded.

This module imports nothing of ours (every package may use it).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
NOT_A_SETTING = {"setting": False}  # dataclass field metadata: derived or internal, not read from the user

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
NONE = ("none", "null", "~")
# A number as a person types it: optional sign, digits with single underscores, optional fraction, exponent.
_NUMBER = re.compile(r"[+-]?(?:\d(?:_?\d)*(?:\.(?:\d(?:_?\d)*)?)?|\.\d(?:_?\d)*)(?:[eE][+-]?\d+)?")


QUOTE_LIMIT = 120  # characters of a value an error message quotes


def quoted(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters (with the full length) so a huge value
    (an expanded YAML structure, a pasted file) cannot flood the terminal."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def parse_number(value: Any) -> int | float:
    """``value`` (a number or its text) as an int when written as one, else a float; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{quoted(value)} is not a number")
    if isinstance(value, (int, float)):
        number = value
    elif isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        text = value.strip().replace("_", "")
        number = int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)
    else:
        raise ValueError(f"{quoted(value)} is not a number")
    if isinstance(number, float) and not math.isfinite(number):
        raise ValueError(f"{quoted(value)} is not a finite number")
    return number


def coerce(tp: Any, value: Any) -> Any:
    """``value`` read as type ``tp`` (the rules in the module docstring); ValueError saying what is wrong."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in NONE)):
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise ValueError(f"unsupported type {tp}")
        return coerce(inner[0], value)
    if origin is tuple or tp is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"{quoted(value)} is not a list or a comma-separated string")
        return tuple(str(v).strip() for v in items if str(v).strip())
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{quoted(value)} is not a mapping")
        return dict(value)
    if tp is bool:
        return _boolean(value)
    if tp is int:
        number = parse_number(value)
        if isinstance(number, float) and not number.is_integer():
            raise ValueError(f"{quoted(value)} is not an integer")
        return int(number)
    if tp is float:
        return float(parse_number(value))
    if tp is str:
        if isinstance(value, (Mapping, list, tuple)):
            raise ValueError(f"{quoted(value)} is not a string")
        return str(value)
    if tp is Any:
        return value
    raise ValueError(f"unsupported type {tp}")


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise ValueError(f"{quoted(value)} is not a boolean (true/false)")


# Numbers and booleans the YAML 1.2 way: integers decimal only (no octal ``010``, no hex, no sexagesimal ``1:30``),
# with the underscores a person types in ``1_000``; floats as PyYAML's YAML 1.1 resolver reads them less its
# sexagesimal form (``1e-3``, without a dot, stays text for :func:`parse_number`, so a message quotes it as typed).
_YAML_INT = r"^[-+]?[0-9][0-9_]*$"
_YAML_FLOAT = (
    r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?|[-+]?\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_YAML_BOOL = r"^(?:true|True|TRUE|false|False|FALSE)$"
_YAML_1_1 = {f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float")}


@functools.cache
def _loader() -> type:
    """PyYAML's safe loader read the YAML 1.2 way: only ``true`` / ``false`` are booleans, so ``amp: off`` is the
    text "off" (YAML 1.1 made it False; the field's type reads ``yes`` / ``off`` as a boolean where one is wanted,
    :func:`coerce`); numbers are decimal (``010`` is 10, ``1:30`` is text). Aliases and duplicated keys are
    refused."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            """Refuse aliases (``*name``): settings never need them, and nested ones expand exponentially (a few
            hundred bytes of "billion laughs" become gigabytes)."""
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in settings", mark)
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            """Refuse a key given twice in one mapping (YAML 1.1 loaders silently keep the last value)."""
            seen: set[Any] = set()
            for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
                key = self.construct_object(key_node, deep=True)
                try:
                    repeated = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: the base class says so
                    continue
                if repeated:
                    problem = f"key {quoted(key)} is given twice: keep one"
                    raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            return super().construct_mapping(node, deep=deep)

        def construct_yaml_int(self, node: Any) -> int:
            return int(self.construct_scalar(node).replace("_", ""))  # base 10: "010" is 10

    Loader.add_constructor("tag:yaml.org,2002:int", Loader.construct_yaml_int)
    Loader.yaml_implicit_resolvers = {
        first: [(tag, regex) for tag, regex in resolvers if tag not in _YAML_1_1]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(_YAML_BOOL), list("tTfF"))
    Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(_YAML_INT), list("-+0123456789"))
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_YAML_FLOAT), list("-+0123456789."))
    return Loader


def load_yaml(text: str) -> Any:
    """``text`` read as YAML with :func:`_loader`'s rules."""
    import yaml

    return yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: Path | str, error: type[Exception]) -> dict[str, Any]:
    """A YAML file of ``setting: value``; ``error`` naming the file when it cannot be read or is not a mapping."""
    import yaml

    try:
        loaded = load_yaml(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise error(f"cannot read config {path}: {yaml_problem(exc)}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read config {path}: {exc}") from exc
    if not isinstance(loaded, dict):
        raise error(f"config {path} must be a mapping of setting: value")
    return loaded


def yaml_problem(exc: Exception) -> str:
    """A YAML error in one line: what is wrong and where (line and column), without the quoted source lines."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if not problem or mark is None:
        return " ".join(str(exc).split())
    context = getattr(exc, "context", None)
    return f"{context + ': ' if context else ''}{problem} (line {mark.line + 1}, column {mark.column + 1})"


def parse_override(token: str, error: type[Exception]) -> tuple[str, Any]:
    """``KEY=VALUE`` -> ``(KEY, value)``, the value read as YAML (``[a, b]`` is a list, ``{}`` a mapping) and kept
    as text when it is not valid YAML; the field's type decides the rest (:func:`coerce`). A mapping with a key
    given twice is refused, naming the key."""
    import yaml

    if "=" not in token:
        raise error(f"override {quoted(token)} is not KEY=VALUE")
    key, raw = token.split("=", 1)
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.constructor.ConstructorError as exc:
        raise error(f"override {quoted(key.strip())}: {yaml_problem(exc)}") from None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def repeated_settings(keys: Iterable[str], cls: type) -> list[str]:
    """The problems of one layer (a file, the command line) whose ``keys`` name a setting of ``cls`` more than once:
    by the same key (``epochs=3 epochs=5``) or by two of its names (``lr`` and ``optim.lr``). A later layer
    overrides an earlier one; within one layer, which value was meant is not known."""
    paths, named = leaf_paths(cls), {}
    for key in keys:
        named.setdefault(paths.get(key, key), []).append(key)
    return [
        f"{quoted(names[0])} is given {len(names)} times: keep one"
        if len(set(names)) == 1
        else f"{' and '.join(map(quoted, dict.fromkeys(names)))} name the same setting: keep one"
        for names in named.values()
        if len(names) > 1
    ]


def leaf_paths(cls: type, aliases: bool = True) -> dict[str, tuple[str, ...]]:
    """Every key a setting of ``cls`` can be given by -> its path: the dotted path, a section's field by its bare name
    when no other field has it (``lr`` -> ``("optim", "lr")``), with ``aliases`` those of :func:`setting_aliases`."""
    leaves = list(_leaves(cls, ()))
    keys = {".".join(path): path for path in leaves}
    names = Counter(path[-1] for path in leaves)
    keys |= {p[-1]: p for p in leaves if names[p[-1]] == 1 and p[-1] not in keys and not _dotted_only(cls, p[:-1])}
    if aliases:
        keys.update({a: keys[t] for a, t in setting_aliases(cls).items() if t in keys and a not in keys})
    return keys


def _dotted_only(cls: type, section: tuple[str, ...]) -> bool:  # the section sets DOTTED_ONLY: bare names mislead
    for name in section:
        cls = typing.get_type_hints(cls)[name]
    return bool(section) and getattr(cls, "DOTTED_ONLY", False)


def setting_aliases(cls: type) -> dict[str, str]:
    """Older names of settings: ``cls.SETTING_ALIASES`` (alias -> dotted key) and its sections', the section's name
    put before the key (section ``text`` declaring ``{"text_model": "model"}``: ``text_model`` -> ``text.model``)."""
    found, hints = dict(getattr(cls, "SETTING_ALIASES", {})), typing.get_type_hints(cls)
    sections = [
        f.name for f in dataclasses.fields(cls) if f.metadata.get("setting", True) and _is_section(hints[f.name])
    ]
    return found | {a: f"{s}.{t}" for s in sections for a, t in setting_aliases(hints[s]).items()}


def _leaves(cls: type, prefix: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("setting", True):
            continue
        if _is_section(hints[f.name]):
            yield from _leaves(hints[f.name], (*prefix, f.name))
        else:
            yield (*prefix, f.name)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def flatten(values: Mapping[str, Any], cls: type, prefix: str = "") -> dict[str, Any]:
    """YAML-style nested sections (``{"optim": {"lr": 1e-3}}``) -> dotted keys (``{"optim.lr": 1e-3}``)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in values.items():
        tp = hints.get(key)
        if tp is not None and _is_section(tp) and isinstance(value, Mapping):
            out.update(flatten(value, tp, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def canonical(values: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """``values`` with every key of ``cls`` under its shortest name (``optim.lr`` and ``{"optim": {"lr": ..}}``
    become ``lr``), so that layers merge key by key; unknown keys are kept for :func:`build` to report."""
    paths, shortest = leaf_paths(cls), _shortest_keys(cls)
    return {shortest[paths[k]] if k in paths else k: v for k, v in flatten(values, cls).items()}


def build(
    cls: type[T],
    layers: Iterable[Mapping[str, Any]],
    error: type[Exception],
    what: str,
    checks: Callable[[T], list[str]] | None = None,
    found: Iterable[str] = (),
) -> T:
    """An instance of ``cls`` from its defaults and ``layers`` (later layers win); ``error`` listing every
    problem (``invalid {what}: ...``) and the valid keys when a key is unknown, with a close match for each
    unknown key ("did you mean epochs?").

    ``checks(instance)`` returns the problems of the values themselves (a range, a choice); they are reported
    together with the unknown keys and unreadable values (such a value keeps its default while checking), as
    are the problems in ``found`` that the caller found before."""
    paths = leaf_paths(cls)
    chosen: dict[tuple[str, ...], tuple[str, Any]] = {}
    problems: list[str] = []
    for layer in layers:
        problems += repeated_settings(flatten(layer, cls), cls)
        for key, value in flatten(layer, cls).items():
            if key not in paths:
                problems.append(_unknown(key, paths))
                continue
            chosen[paths[key]] = (key, value)
    instance = _instantiate(cls, (), chosen, problems)
    problems += found
    if instance is not None and checks is not None:
        problems += checks(instance)
    if problems:
        valid = sorted(_shortest_keys(cls).values())
        hint = f"\nvalid keys: {', '.join(valid)}" if any(p.startswith("unknown") for p in problems) else ""
        raise error(f"invalid {what}:\n  " + "\n  ".join(dict.fromkeys(problems)) + hint)
    return instance  # type: ignore[return-value]


def _unknown(key: str, paths: Mapping[str, tuple[str, ...]]) -> str:
    """The problem of a key that names no setting: ambiguous (in several sections), or unknown with the
    closest valid key when one is close (difflib's ratio of at least 0.6)."""
    where = sorted(k for k, p in paths.items() if "." in k and p[-1] == key)
    if len(where) > 1:
        return f"setting {quoted(key)} is in several sections: write {' or '.join(where)}"
    close = difflib.get_close_matches(key, list(paths), n=1)
    return f"unknown setting {quoted(key)}" + (f" (did you mean {close[0]}?)" if close else "")


def _instantiate(
    cls: type, prefix: tuple[str, ...], chosen: Mapping[tuple[str, ...], tuple[str, Any]], problems: list[str]
) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        path = (*prefix, f.name)
        if not f.metadata.get("setting", True) or not f.init:
            continue
        if _is_section(hints[f.name]):
            kwargs[f.name] = _instantiate(hints[f.name], path, chosen, problems)
        elif path in chosen:
            key, value = chosen[path]
            try:
                kwargs[f.name] = coerce(hints[f.name], value)
            except ValueError as exc:
                problems.append(f"{key}: {exc}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a dataclass whose __post_init__ checks its values
        problems.append(str(exc))
        return None


def as_dotted_dict(instance: Any) -> dict[str, Any]:
    """The settings as one flat mapping, each under its full dotted key (``optim.lr``; a field outside every section
    by its name), in field order, tuples as lists. A dotted key names the same setting whatever fields are added
    later, where a bare name may come to be in several sections: what a record to be read back later keeps, and
    what :func:`build` reads."""
    out: dict[str, Any] = {}
    for path in _leaves(type(instance), ()):
        value = instance
        for name in path:
            value = getattr(value, name)
        out[".".join(path)] = list(value) if isinstance(value, tuple) else value
    return out


def _shortest_keys(cls: type) -> dict[tuple[str, ...], str]:
    """Each setting's path -> the shortest key naming it, in field order."""
    keys = leaf_paths(cls, aliases=False)
    shortest = {path: key for key, path in keys.items() if "." not in key or path[-1] not in keys}
    return {path: shortest.get(path, ".".join(path)) for path in _leaves(cls, ())}
