"""Command lines of every tool (entry points and analysis): generated from the core's config trees.

The core declares each parameter once (``gqaprune.config.knob``: default, help, choices, bounds);
here those declarations become argparse flags, so MLproject, the config dataclass and the
command line cannot drift apart (a test pins MLproject against the trees). Every parse error is a
one-line ``UserError`` (exit 2, run FAILED). Both ``prune_entry/`` and ``analysis/`` import this
module; the core never imports argparse.
"""
from __future__ import annotations

import argparse
import sys
import typing
from typing import Any, Sequence

from gqaprune.config import NONE_WORDS, Leaf, build, flat, leaves, parse_text
from gqaprune.errors import UserError


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors become UserError (so the run is marked FAILED)."""

    def error(self, message: str):
        if "unrecognized arguments" in message:
            known = sorted(a.dest for a in self._actions if a.dest != "help")
            raise UserError(f"{self.prog}: {message}", f"known parameters: {', '.join(known)}")
        raise UserError(f"{self.prog}: {message}", "see --help for the parameters")


def boolean(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "y", "on"):
        return True
    if low in ("0", "false", "no", "n", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got '{text}'")


def optional_int(text: str) -> int | None:
    if str(text).strip().lower() in ("", "none", "null", "-1"):
        return None
    try:
        return int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an integer or none, got '{text}'") from exc


def optional_str(text: str) -> str | None:
    return None if str(text).strip().lower() in NONE_WORDS else text


def optional_bool(text: str) -> bool | None:
    return None if str(text).strip().lower() in NONE_WORDS else boolean(text)


def raw_flags(argv: list[str] | None) -> dict:
    """``--key value`` pairs as given (logged before parsing, so a failed run still shows them)."""
    args = sys.argv[1:] if argv is None else argv
    out, i = {}, 0
    while i < len(args):
        if args[i].startswith("--"):
            key, _, val = args[i][2:].partition("=")
            if not _ and i + 1 < len(args) and not args[i + 1].startswith("--"):
                val, i = args[i + 1], i + 1
            out[key] = val
        i += 1
    return out


# ---- config tree -> flags ------------------------------------------------------------------------

def _converter(leaf: Leaf):
    """The argparse ``type`` of a leaf (named after its type, so argparse says 'invalid int value')."""
    parts = typing.get_args(leaf.type) or (leaf.type,)
    if bool in parts:
        return optional_bool if type(None) in parts else boolean
    if parts == (int, type(None)) or parts == (type(None), int):
        return optional_int
    if leaf.type is str:
        return str
    if parts and set(parts) <= {str, type(None)}:
        return optional_str

    def convert(text: str):
        try:
            return parse_text(leaf, text)
        except UserError as exc:
            raise ValueError(str(exc)) from exc
    convert.__name__ = {int: "int", float: "float"}.get(leaf.type, leaf.name)
    return convert


def _help(leaf: Leaf) -> str:
    names = leaf.knob.choice_names()
    parts = [leaf.help]
    if names:
        parts.append(f"one of {', '.join(map(str, names))}")
    parts.append(f"default {'none' if leaf.default is None else leaf.default}")
    return "; ".join(parts).replace("%", "%%")     # argparse formats help with %


def add_config(parser: argparse.ArgumentParser, config_cls, skip: Sequence[str] = ()) -> None:
    """One flag per leaf of ``config_cls``, grouped by the section that declares it."""
    groups: dict[type, Any] = {}
    for leaf in leaves(config_cls):
        if leaf.name in skip:
            continue
        if leaf.section is config_cls:
            target = parser
        else:
            if leaf.section not in groups:
                title = (leaf.section.__doc__ or leaf.section.__name__).strip().splitlines()[0]
                groups[leaf.section] = parser.add_argument_group(title)
            target = groups[leaf.section]
        target.add_argument(f"--{leaf.name}", dest=leaf.name, type=_converter(leaf), default=leaf.default,
                            help=_help(leaf))


def parser_for(prog: str, config_cls, description: str | None = None) -> Parser:
    p = Parser(prog=prog, description=description or (config_cls.__doc__ or "").strip().splitlines()[0])
    add_config(p, config_cls)
    return p


def parse_config(config_cls, argv: list[str] | None, prog: str):
    """argv -> a validated config tree (UserError on any bad flag or value)."""
    values = vars(parser_for(prog, config_cls).parse_args(argv))
    return build(config_cls, values)


def flags_of(config) -> list[str]:
    """A built config back to ``--name value`` flags (values as the command line writes them)."""
    out = []
    for name, value in flat(config).items():
        text = "none" if value is None else ("true" if value is True else "false" if value is False else str(value))
        out += [f"--{name}", text]
    return out
