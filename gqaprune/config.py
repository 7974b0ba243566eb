"""Floor 1: typed, nested, frozen configuration whose fields carry help, choices and checks.

A config is a tree of frozen dataclasses deriving from :class:`Section`. Leaf fields are declared
with :func:`knob` (default, help text, choices, bounds); they validate themselves when the
section is built, and cross-field rules go into ``Section.check``. Leaf names are unique across
a tree, so a tree has one flat namespace of parameters — exactly the command-line flags and
MLflow params of an entry point, which are generated from it (``tracking/cli.py``) and pinned
against MLproject by a test.

    @dataclass(frozen=True)
    class Reconstruction(Section):
        "reconstruction after surgery"
        reconstruct: str = knob("lstsq", "refit mode", choices=MODES)
        damping: float = knob(0.05, "ridge damping", low=0.0)

    leaves(Reconstruction)                    # -> [Leaf(name="reconstruct", ...), ...]
    build(Reconstruction, {"damping": 0.1})   # validated instance
    flat(instance)                            # -> {"reconstruct": "lstsq", "damping": 0.1}

The core never imports argparse: :func:`parse_text` turns command-line text into a leaf's type
and the CLI layer wraps it.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from gqaprune.errors import UserError

NONE_WORDS = ("", "none", "null")
TRUE_WORDS = ("1", "true", "yes", "y", "on")
FALSE_WORDS = ("0", "false", "no", "n", "off")


@dataclass(frozen=True)
class Knob:
    """What a leaf field declares besides its default (see :func:`knob`)."""
    help: str
    choices: tuple | Callable[[], Iterable[str]] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False      # (low, ...] instead of [low, ...]
    high_open: bool = False
    fix: str | None = None      # how to fix an out-of-range value (default: derived)
    example: str | None = None  # a valid value, used in the derived fix
    must: str | None = None     # wording of the bound, e.g. "a finite number >= 0"
    kind: str | None = None     # noun of an unknown choice, e.g. "reconstruct mode" (default: the name)

    def choice_names(self) -> tuple[str, ...] | None:
        if self.choices is None:
            return None
        return tuple(self.choices() if callable(self.choices) else self.choices)


def knob(default: Any, help: str, *, choices=None, low=None, high=None, low_open=False,
         high_open=False, fix=None, example=None, must=None, kind=None):
    """A leaf field: ``default`` plus its help text, choices (a tuple or a callable returning the
    registered names) and bounds, checked when the section is built."""
    return field(default=default, metadata={"knob": Knob(help, choices, low, high, low_open, high_open,
                                                         fix, example, must, kind)})


class Section:
    """Base of config dataclasses: leaves are checked on construction, then :meth:`check`."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            k = f.metadata.get("knob")
            if k is not None:
                check_value(f.name, getattr(self, f.name), k)
        self.check()

    def check(self) -> None:
        """Cross-field rules of this section (override)."""

    def validate(self):
        """Run the checks again (they already ran on construction); returns self."""
        Section.__post_init__(self)
        return self

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def _interval(k: Knob) -> str:
    lo = "-inf" if k.low is None else f"{k.low:g}"
    hi = "inf" if k.high is None else f"{k.high:g}"
    return f"{'(' if k.low_open or k.low is None else '['}{lo}, {hi}{')' if k.high_open or k.high is None else ']'}"


def check_value(name: str, value: Any, k: Knob) -> None:
    """Raise UserError when ``value`` is not a valid ``name`` (choices, bounds, finiteness)."""
    if value is None:
        return
    names = k.choice_names()
    if names is not None and value not in names:
        if isinstance(value, str):
            raise UserError(f"unknown {k.kind or name} '{value}'", k.fix or f"use one of {', '.join(map(str, names))}")
        raise UserError(f"{name} must be {' or '.join(map(str, names))}, got {value}",
                        k.fix or f"use {' or '.join(map(str, names))}")
    if k.low is None and k.high is None or isinstance(value, (bool, str)):
        return
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    if ok and k.low is not None:
        ok = value > k.low if k.low_open else value >= k.low
    if ok and k.high is not None:
        ok = value < k.high if k.high_open else value <= k.high
    if not ok:
        if k.must:
            what = f"must be {k.must}"
        elif k.low is not None and k.high is None and not k.low_open:
            what = f"must be >= {k.low:g}"
        else:
            what = f"must be in {_interval(k)}"
        fix = k.fix or (f"pass e.g. {k.example}" if k.example else
                         f"pass a positive {name}" if k.low == 1 and k.high is None else
                         f"pass a {name} in {_interval(k)}")
        raise UserError(f"{name} {what}, got {value}", fix)


# ---- the tree ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Leaf:
    name: str
    path: tuple[str, ...]     # attribute path from the root, e.g. ("reconstruction", "damping")
    type: Any                 # resolved annotation, e.g. int, float | None
    default: Any
    knob: Knob
    section: type             # the Section class that owns it

    @property
    def help(self) -> str:
        return self.knob.help


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def is_section(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp) and issubclass(tp, Section)


def leaves(cls, prefix: tuple[str, ...] = ()) -> list[Leaf]:
    """Every leaf of the tree rooted at ``cls``, depth first in declaration order."""
    out: list[Leaf] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if is_section(tp):
            out += leaves(tp, prefix + (f.name,))
        elif "knob" in f.metadata:
            out.append(Leaf(f.name, prefix + (f.name,), tp, f.default, f.metadata["knob"], cls))
    if not prefix:
        seen: dict[str, tuple] = {}
        for leaf in out:
            if leaf.name in seen:
                raise TypeError(f"{cls.__name__}: leaf '{leaf.name}' appears at {seen[leaf.name]} and {leaf.path}")
            seen[leaf.name] = leaf.path
    return out


def sections(cls) -> dict[str, type]:
    """Direct child sections of ``cls``: field name -> Section class."""
    hints = _hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if is_section(hints[f.name])}


def build(cls, values: Mapping[str, Any] | None = None):
    """An instance of ``cls`` from flat leaf values (missing leaves keep their defaults).

    Unknown names are a UserError listing the known ones."""
    values = dict(values or {})
    known = {leaf.name for leaf in leaves(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown parameter(s) {', '.join(unknown)}", f"known parameters: {', '.join(sorted(known))}")
    return _build(cls, values)


def _build(cls, values: dict):
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if is_section(tp):
            kwargs[f.name] = _build(tp, values)
        elif f.name in values and "knob" in f.metadata:    # plain fields are set by code, not by flags
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def flat(config) -> dict[str, Any]:
    """Leaf name -> value of a built config (the params an entry point logs)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, Section):
            out.update(flat(value))
        elif "knob" in f.metadata:
            out[f.name] = value
    return out


def defaults(cls) -> dict[str, Any]:
    return {leaf.name: leaf.default for leaf in leaves(cls)}


def changed(config, section: str | None = None) -> dict[str, Any]:
    """Leaves whose value differs from the default (of the whole tree, or of one child section)."""
    node = getattr(config, section) if section else config
    base = defaults(type(node))
    return {k: v for k, v in flat(node).items() if v != base[k]}


def with_values(config, **values):
    """A copy of a built config with some leaves changed (validated again)."""
    return build(type(config), {**flat(config), **values})


# ---- text -> typed value (the command line, sweep grids, MLflow -P values) ---------------------

def _parts(tp) -> tuple:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def parse_text(leaf: Leaf, text: Any):
    """Command-line text (or a YAML scalar) -> the leaf's type. ``none`` -> None where allowed."""
    parts = _parts(leaf.type)
    if not isinstance(text, str):
        if text is None and type(None) in parts:
            return None
        if isinstance(text, bool) and bool in parts or not isinstance(text, bool) and type(text) in parts:
            return text
        text = str(text).lower() if isinstance(text, bool) else str(text)
    low = text.strip().lower()
    if type(None) in parts and low in NONE_WORDS:
        return None
    for tp in [p for p in parts if p is not type(None)]:
        try:
            return _convert(tp, text, low)
        except ValueError:
            continue
    kinds = " or ".join(_kind(p) for p in parts)
    raise UserError(f"{leaf.name}: expected {kinds}, got '{text}'", f"pass --{leaf.name} <{_kind(parts[0])}>")


def _convert(tp, text: str, low: str):
    if tp is bool:
        if low in TRUE_WORDS:
            return True
        if low in FALSE_WORDS or low == "":
            return False
        raise ValueError(text)
    if tp is int:
        return int(text)
    if tp is float:
        return float(text)
    if tp is str:
        return text
    raise ValueError(text)


def _kind(tp) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string",
            type(None): "none"}.get(tp, getattr(tp, "__name__", str(tp)))


def parse_flat(cls, raw: Mapping[str, Any]):
    """Build ``cls`` from text values keyed by leaf name (e.g. a sweep point)."""
    by_name = {leaf.name: leaf for leaf in leaves(cls)}
    unknown = sorted(set(raw) - set(by_name))
    if unknown:
        raise UserError(f"unknown parameter(s) {', '.join(unknown)}", f"known parameters: {', '.join(sorted(by_name))}")
    return build(cls, {k: parse_text(by_name[k], v) for k, v in raw.items()})
