"""First contact with a tracking store: safe under concurrent first use, fast to fail when down.

* SQLite: MLflow creates the schema on the first access of a fresh file without any lock, so two
  processes starting together race inside alembic ("duplicate column name: step", "table
  alembic_version already exists", "Online migration expected to match one row"). The first access
  of each process runs under an ``fcntl`` lock on ``<db>.lock`` beside the database, and a failed
  schema setup (a launcher outside our code may still race us) is retried.
* Server (http/https): one request without retries (5 s timeout) before anything else, so an
  unreachable server fails in seconds naming the (redacted) URI, and bad credentials fail with
  the fix. MLflow's own per-request retries are lowered (unless set by the user) because
  :mod:`tracking.retry` owns the retry budget.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from gqaprune.errors import UserError
from tracking import redact

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROBE_TIMEOUT_S = 5
_INIT_RACE = ("duplicate column name", "already exists", "online migration expected to match one row",
              "no such table", "can't locate revision")
_INIT_ATTEMPTS = 5
_ready: set[str] = set()


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else an *absolute* sqlite store in the project root.

    Absolute because ``mlflow run`` starts entry points with the project dir as cwd while a
    user may call ``python -m`` from anywhere; both must write the same store.
    """
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths against the cwd); None for an
    in-memory database or another scheme."""
    if not uri.startswith("sqlite:///"):
        return None
    raw = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not raw or raw == ":memory:":
        return None
    path = Path(raw)
    return path if path.is_absolute() else Path.cwd() / path


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``fcntl`` lock on ``path`` (created if missing); a no-op where fcntl is absent."""
    try:
        import fcntl
    except ImportError:  # Windows: MLflow's own init lock is all there is
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialise store set-up (schema, experiment creation) across the processes of one machine."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    with file_lock(db.with_name(db.name + ".lock")):
        yield


def _first_access(uri: str) -> None:
    """Open the store (MLflow creates the schema of a fresh database here), retrying a lost race."""
    from mlflow.tracking import MlflowClient
    for attempt in range(1, _INIT_ATTEMPTS + 1):
        try:
            MlflowClient(uri).search_experiments(max_results=1)
            return
        except Exception as exc:  # noqa: BLE001 - classified below
            text = str(exc).lower()
            if attempt == _INIT_ATTEMPTS or not any(t in text for t in _INIT_RACE):
                raise
            time.sleep(0.2 * attempt)  # the other process is finishing the schema


def _server_defaults() -> None:
    """MLflow retries a refused request for minutes by default; our retry layer owns the budget,
    and MLflow's own 'View run at <uri>' lines would print credentials embedded in the URI."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def probe_server(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """One request to the server, no retries; UserError when it is down or refuses us."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request
    shown = redact.redact(uri)
    try:
        response = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "POST",
                                json={"max_results": 1}, max_retries=0, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - requests / urllib3 raise many types
        first = (redact.redact(str(exc)).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"the tracking server {shown} is not reachable ({first})",
                        "start it (README 'Team setup'), fix MLFLOW_TRACKING_URI, or unset "
                        "MLFLOW_TRACKING_URI to use the local SQLite store") from None
    if response.status_code in (401, 403):
        raise UserError(f"the tracking server {shown} refused the credentials (HTTP {response.status_code})",
                        "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                        "MLFLOW_TRACKING_TOKEN) to an account allowed to write runs")
    if response.status_code >= 500:
        raise UserError(f"the tracking server {shown} answers HTTP {response.status_code}",
                        "check the server's log; retry when it is healthy")


def ensure_store(uri: str) -> None:
    """Once per process and store: redact logs, then initialise / probe the store (see module doc)."""
    if uri in _ready:
        return
    redact.install_log_filter()
    if is_server(uri):
        _server_defaults()
        probe_server(uri)
    else:
        with store_lock(uri):
            _first_access(uri)
    _ready.add(uri)


def forget(uri: str | None = None) -> None:
    """Probe / initialise again on the next :func:`ensure_store` (tests, a store that came back)."""
    if uri is None:
        _ready.clear()
    else:
        _ready.discard(uri)
