"""Flag parsing shared by entry points: every parse error is a one-line UserError."""
from __future__ import annotations

import argparse

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
    return None if str(text).strip().lower() in ("", "none", "null") else text


def raw_flags(argv: list[str] | None) -> dict:
    """``--key value`` pairs as given (logged before parsing, so a failed run still shows them)."""
    import sys
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
