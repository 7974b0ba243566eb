"""Bounded retries with back-off for tracking-store calls that failed for a passing reason.

Passing ("transient") failures: SQLite's "database is locked" (MLflow waits 20 s per statement,
then raises), a server that refuses connections, times out or answers 429 / 502 / 503 / 504.
Anything else (a bad request, a missing run) is raised at once: retrying cannot fix it.
After the budget, :class:`StoreUnavailable` (a ``UserError``) names the store and the fix.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from gqaprune.errors import UserError
from tracking import schema
from tracking.redact import redact

T = TypeVar("T")

SQLITE_BUDGET_S = 60.0
SERVER_BUDGET_S = 300.0
_TRANSIENT_TEXT = ("database is locked", "database table is locked", "connection refused",
                   "failed to establish a new connection", "max retries exceeded", "connection aborted",
                   "connection reset", "remote end closed connection", "read timed out",
                   "connect timeout", "temporarily unavailable", "service unavailable", "bad gateway",
                   "gateway timeout", "too many requests", "too many 503", "too many 502",
                   "too many 504", "too many 429", "name or service not known")
_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}


@dataclass(frozen=True)
class RetryPolicy:
    budget_s: float              # total time spent retrying one call
    first_delay_s: float = 0.5   # back-off: first_delay, x2 each attempt, capped at max_delay
    max_delay_s: float = 15.0


def policy_for(uri: str) -> RetryPolicy:
    """``GQAPRUNE_STORE_RETRY_S`` when set, else 60 s for SQLite and 300 s for a server."""
    env = os.environ.get(schema.ENV_STORE_RETRY_S)
    if env:
        try:
            return RetryPolicy(max(0.0, float(env)))
        except ValueError as exc:
            raise UserError(f"{schema.ENV_STORE_RETRY_S}={env!r} is not a number of seconds",
                            f"set {schema.ENV_STORE_RETRY_S} to e.g. 60") from exc
    return RetryPolicy(SQLITE_BUDGET_S if is_sqlite(uri) else SERVER_BUDGET_S)


def is_sqlite(uri: str) -> bool:
    return uri.startswith("sqlite:")


class StoreUnavailable(UserError):
    """The store did not accept a call within the retry budget."""

    def __init__(self, uri: str, what: str, waited_s: float, cause: BaseException):
        first = (redact(str(cause)).strip().splitlines() or [type(cause).__name__])[0][:200]
        if is_sqlite(uri):
            problem = (f"the SQLite store {redact(uri)} stayed locked for {waited_s:.0f} s while {what} "
                       f"(other processes are writing to it: {first})")
            fix = ("SQLite takes one writer at a time: for parallel workers run a tracking server "
                   "(README 'Team setup', scripts/team_server.sh) and set MLFLOW_TRACKING_URI, "
                   f"or raise {schema.ENV_STORE_RETRY_S}")
        else:
            problem = (f"the tracking store {redact(uri)} did not answer for {waited_s:.0f} s while "
                       f"{what} ({first})")
            fix = (f"check that the server is up and reachable (MLFLOW_TRACKING_URI), or raise "
                   f"{schema.ENV_STORE_RETRY_S}")
        super().__init__(problem, fix)
        self.uri, self.what, self.problem, self.fix = uri, what, problem, fix


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) is a passing store failure."""
    for e in _chain(exc):
        if isinstance(e, StoreUnavailable):
            return True
        code = getattr(e, "error_code", None)
        if code in _TRANSIENT_CODES:
            return True
        if type(e).__name__ in ("ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout",
                                "NewConnectionError", "MaxRetryError", "ProtocolError",
                                "RemoteDisconnected", "ConnectionRefusedError", "ConnectionResetError"):
            return True
        text = str(e).lower()
        if any(t in text for t in _TRANSIENT_TEXT):
            return True
    return False


def call(fn: Callable[[], T], uri: str, what: str, policy: RetryPolicy | None = None, *,
         sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> T:
    """``fn()``, retried with back-off while it fails transiently, for at most ``policy.budget_s``.

    Raises the first non-transient error as it is, and :class:`StoreUnavailable` (from the last
    transient one) when the budget is spent. One line on stderr says that it is retrying.
    """
    policy = policy or policy_for(uri)
    start, delay, warned = clock(), policy.first_delay_s, False
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if not is_transient(exc):
                raise
            waited = clock() - start
            if waited + delay > policy.budget_s:
                raise StoreUnavailable(uri, what, waited, exc) from exc
            if not warned:
                first = (redact(str(exc)).strip().splitlines() or [""])[0][:160]
                print(f"warning: tracking store {redact(uri)} busy or unreachable while {what} ({first}); "
                      f"retrying for up to {policy.budget_s:.0f} s", file=sys.stderr)
                warned = True
            sleep(delay)
            delay = min(delay * 2, policy.max_delay_s)
