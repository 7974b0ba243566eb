"""Quiet by default: known-harmless library messages are counted, not printed, and summarised once.

lm-eval and transformers repeat notes that say nothing about the user's run (a model passed in
memory, a few-shot default overridden, a prompt truncated to the window, ...). Entry points install
:func:`install` once; ``--verbose true`` (or ``GQAPRUNE_VERBOSE=1``) shows everything. Progress
bars, the toolkit's own messages and every other warning stay.
"""
from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import warnings
from collections import Counter

ENV_VERBOSE = "GQAPRUNE_VERBOSE"

# (regex on the message, short label for the summary)
KNOWN = (
    (r"`pretrained` model kwarg is not of type `str`", "lm-eval: model passed in memory"),
    (r"Passed an already-initialized model through `pretrained`", "lm-eval: model passed in memory"),
    (r"Overwriting default num_fewshot of", "lm-eval: num_fewshot set explicitly"),
    (r"Combined length of context .* Truncating", "lm-eval: context truncated to the window"),
    (r"neither marked as", "lm-eval: task output type notes"),
    (r"You are using a model of type .* to instantiate a model of type", "transformers: config class note"),
    (r"`past_key_values`.* deprecated", "transformers: cache argument renamed"),
    (r"Setting `pad_token_id` to `eos_token_id`", "transformers: pad token note"),
)
_PATTERNS = [(re.compile(p, re.S), label) for p, label in KNOWN]
# The loggers those messages come from (a filter on a parent logger does not see its children's).
SOURCES = ("lm_eval", "lm_eval.evaluator", "lm_eval.models.huggingface", "lm_eval.api.task",
           "transformers", "transformers.configuration_utils", "transformers.modeling_utils",
           "transformers.generation.utils", "transformers.utils.generic")


class _Counter(logging.Filter):
    """Drops known-harmless records and counts them by label."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def label(self, text: str) -> str | None:
        for pattern, label in _PATTERNS:
            if pattern.search(text):
                return label
        return None

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is not ours to judge
            return True
        label = self.label(text)
        if label is None:
            return True
        self.counts[label] += 1
        return False

    def summary(self) -> str | None:
        if not self.counts:
            return None
        parts = ", ".join(f"{label} x{n}" for label, n in self.counts.most_common())
        return (f"note: {sum(self.counts.values())} known-harmless library messages hidden ({parts}); "
                f"--verbose true shows them")


_INSTALLED: _Counter | None = None


def wants_verbose(raw_flags: dict | None = None) -> bool:
    value = (raw_flags or {}).get("verbose") or os.environ.get(ENV_VERBOSE, "")
    return str(value).strip().lower() in ("1", "true", "yes", "y", "on")


def _handlers():
    """Every handler the libraries' messages pass through (root, lm-eval's, transformers')."""
    names = ("", "lm_eval", "transformers", "datasets", "peft")
    for name in names:
        yield from logging.getLogger(name).handlers


def install(verbose: bool = False) -> None:
    """Filter known-harmless messages from now on (idempotent); print a one-line summary at exit."""
    global _INSTALLED
    if verbose or _INSTALLED is not None:
        return
    _INSTALLED = counter = _Counter()
    for name in SOURCES:
        logging.getLogger(name).addFilter(counter)
    _attach_to_handlers(counter)
    # Python warnings (FutureWarning / UserWarning) with the same messages: count them too.
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        label = counter.label(str(message))
        if label is not None:
            counter.counts[label] += 1
            return
        original(message, category, filename, lineno, file, line)
    warnings.showwarning = show

    def report():
        _attach_to_handlers(counter)
        text = counter.summary()
        if text:
            print(text, file=sys.stderr)
    atexit.register(report)


def _attach_to_handlers(counter: _Counter) -> None:
    """Child loggers (``lm_eval.evaluator``, ``transformers.modeling_utils``) bypass a filter on
    their parent logger, but not one on the handler that prints them; libraries may add handlers
    late, so this runs again at the points where they do."""
    for handler in _handlers():
        if counter not in handler.filters:
            handler.addFilter(counter)


def refresh() -> None:
    """Attach to handlers the libraries added since :func:`install` (e.g. lm-eval's own)."""
    if _INSTALLED is not None:
        _attach_to_handlers(_INSTALLED)
