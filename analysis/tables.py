"""One rendered table four ways: terminal text, Markdown, LaTeX (booktabs) and CSV.

A :class:`Table` holds the raw values (``frame``, written as CSV as they are) and how to show them
(per-column formats); every rendering carries the caption that says how the numbers were measured
and the notes (what is missing and why). Every rendering and CSV goes through
``tracking.redact.redact``: a tracking URI, ray address or path with credentials never reaches a
report.
"""
from __future__ import annotations

import math
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from tracking import runs
from tracking.redact import redact

LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
MISSING = "–"


def latex_escape(text: str) -> str:
    out = "".join(LATEX_SPECIAL.get(ch, ch) for ch in str(text))
    return out.replace("–", "--").replace("×", r"$\times$").replace("Δ", r"$\Delta$").replace("±", r"$\pm$")


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def number(value, digits: int = 4) -> str:
    """A plain number: integers without decimals, large values with thousands separators."""
    if is_missing(value):
        return MISSING
    if isinstance(value, str):
        return value
    if isinstance(value, (bool,)):
        return str(value).lower()
    v = float(value)
    if v.is_integer() and abs(v) < 1e15:
        return f"{int(v):,}" if abs(v) >= 10000 else str(int(v))
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}" if abs(v) < 1 else f"{v:.2f}"


def signed(value, digits: int = 4, suffix: str = "") -> str:
    if is_missing(value):
        return MISSING
    return f"{value:+.{digits}f}{suffix}"


def percent(value) -> str:
    return MISSING if is_missing(value) else f"{value:+.1f}%"


@dataclass
class Table:
    """A table of one analysis: ``name`` (the artifact base name), ``title``, ``caption`` (what the
    numbers are and how they were measured), the raw ``frame`` and per-column ``formats``."""
    name: str
    title: str
    caption: str
    frame: pd.DataFrame
    formats: dict[str, Callable] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    group_by: str | None = None   # a \midrule in LaTeX whenever this column changes

    def grid(self) -> tuple[list[str], list[list[str]]]:
        header = [str(c) for c in self.frame.columns]
        body = [[self.formats.get(c, number)(v) if not is_missing(v) else MISSING
                 for c, v in zip(self.frame.columns, row)] for row in self.frame.itertuples(index=False)]
        return header, body

    def numeric(self) -> list[bool]:
        return [pd.api.types.is_numeric_dtype(self.frame[c]) and not pd.api.types.is_bool_dtype(self.frame[c])
                for c in self.frame.columns]


def wrap(text: str, width: int = 110) -> str:
    return "\n".join(textwrap.wrap(text, width))


def clean(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with every text cell redacted (credentials removed)."""
    text = [c for c in frame.columns if frame[c].dtype == object]
    return frame.assign(**{c: [redact(v) if isinstance(v, str) else v for v in frame[c]] for c in text}) \
        if text else frame


def terminal(t: Table) -> str:
    return redact(_terminal(t))


def _terminal(t: Table) -> str:
    header, body = t.grid()
    if not body:
        return "\n".join([f"== {t.title} ==", wrap(t.caption), "(no rows)", *[f"note: {n}" for n in t.notes]])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    right = t.numeric()
    line = lambda r: "  ".join(c.rjust(w) if right[i] else c.ljust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([f"== {t.title} ==", wrap(t.caption), line(header), sep, *map(line, body), sep,
                      *[f"note: {n}" for n in t.notes]])


def markdown(t: Table) -> str:
    header, body = t.grid()
    esc = lambda s: s.replace("|", r"\|")  # noqa: E731
    align = ["---:" if r else "---" for r in t.numeric()]
    lines = [f"### {t.title}", "", t.caption, ""]
    if body:
        lines += [f"| {' | '.join(map(esc, header))} |", f"|{'|'.join(align)}|"]
        lines += [f"| {' | '.join(map(esc, r))} |" for r in body]
    else:
        lines.append("(no rows)")
    lines += [""] + [f"- note: {n}" for n in t.notes]
    return "\n".join(lines).rstrip() + "\n"


def latex(t: Table) -> str:
    """A booktabs table (``\\toprule``/``\\midrule``/``\\bottomrule``), caption and label."""
    header, body = t.grid()
    spec = "".join("r" if r else "l" for r in t.numeric()) or "l"
    label = re.sub(r"[^A-Za-z0-9]+", "_", t.name)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{latex_escape(t.caption)}}}",
             rf"\label{{tab:{label}}}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    col = list(t.frame.columns).index(t.group_by) if t.group_by in t.frame.columns else None
    previous = None
    for r in body:
        if col is not None and previous is not None and r[col] != previous:
            lines.append(r"\midrule")
        previous = r[col] if col is not None else None
        lines.append(" & ".join(latex_escape(c) for c in r) + r" \\")
    if not body:
        lines.append(r"\multicolumn{" + str(max(1, len(header))) + r"}{l}{(no rows)} \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write(t: Table, out: Path | None, prefix: str = "") -> list[str]:
    """``<prefix><name>.md / .tex / .csv`` logged to the active run and written to ``out``."""
    names = {f"{prefix}{t.name}.md": redact(markdown(t)), f"{prefix}{t.name}.tex": redact(latex(t))}
    for name, text in names.items():
        runs.log_text(text, name)
    log_csv(t.frame, f"{prefix}{t.name}.csv")
    if out is not None:
        for name, text in names.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(text)
        clean(t.frame).to_csv(out / f"{prefix}{t.name}.csv", index=False)
    return [*names, f"{prefix}{t.name}.csv"]


def log_csv(frame: pd.DataFrame, name: str) -> None:
    """A CSV artifact of the active run, also under a sub-path (``<alias>/x.csv``)."""
    import tempfile
    parent = str(Path(name).parent)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(name).name
        clean(frame).to_csv(path, index=False)
        runs.log_file(path, None if parent == "." else parent)
