"""Nothing computed is lost when the store is away: logging calls wait in a local spool.

Every logging call of :mod:`tracking.runs` is an :class:`Op` applied to one run. When the store
does not take it within the retry budget, the op (and a hard link or copy of its files: the
metrics JSON, the pruned model dir) goes to ``<spool>/<store key>/<run id>/`` and later ops of
that run queue behind it, so the run's history keeps its order. The spool is uploaded, oldest op
first, as soon as the store answers again: by the same process on its next logging call, by
the next entry point on the same store (``tracking.runs.setup``), or by hand::

    python -m tracking.spool            # upload everything waiting for MLFLOW_TRACKING_URI's store
    python -m tracking.spool --list     # only show what is waiting

The spool root is ``GQAPRUNE_SPOOL``, else ``<GQAPRUNE_CACHE or ~/.cache/gqaprune>/spool``; the
store key is a hash of the tracking URI (the URI itself, which may hold credentials, is never
written; ``store.txt`` holds its redacted form).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tracking import schema
from tracking.redact import redact

OPS_FILE = "ops.jsonl"
DONE_FILE = "done"   # number of ops of ops.jsonl already uploaded (a replay resumes after them)
_lock = threading.RLock()


@dataclass(frozen=True)
class Op:
    """One logging call. kind: params | metrics | tags | artifact | terminate."""
    kind: str
    data: dict = field(default_factory=dict)       # params / metrics / tags; terminate: status
    step: int = 0                                   # metrics
    timestamp_ms: int = 0                           # metrics: when logged; terminate: end time
    local_path: str = ""                            # artifact: a file or a directory
    artifact_path: str | None = None                # artifact: the destination dir in the run


def now_ms() -> int:
    return int(time.time() * 1000)


# ------------------------------------------------------------------------------ applying ops

def apply(client, run_id: str, op: Op) -> None:
    """Perform ``op`` on the store through an ``MlflowClient`` (idempotent where MLflow allows)."""
    from mlflow.entities import Metric, Param, RunTag
    if op.kind == "params":
        existing = client.get_run(run_id).data.params  # MLflow refuses to change a param
        fresh = [Param(k, v) for k, v in op.data.items() if k not in existing]
        if fresh:
            client.log_batch(run_id, params=fresh)
    elif op.kind == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, v, op.timestamp_ms, op.step) for k, v in op.data.items()])
    elif op.kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in op.data.items()])
    elif op.kind == "artifact":
        if Path(op.local_path).is_dir():
            client.log_artifacts(run_id, op.local_path, artifact_path=op.artifact_path)
        else:
            client.log_artifact(run_id, op.local_path, artifact_path=op.artifact_path)
    elif op.kind == "terminate":
        status = op.data["status"]
        tags = client.get_run(run_id).data.tags
        if tags.get(schema.TAG_FAILURE) == schema.REASON_KILLED and tags.get(schema.TAG_CLOSED_BY) \
                and status == "FINISHED":  # a sweeper took the silent run for dead; it was not
            client.delete_tag(run_id, schema.TAG_FAILURE)
        client.set_terminated(run_id, status, end_time=op.timestamp_ms or None)
    else:
        raise ValueError(f"unknown spool op {op.kind!r}")


# ------------------------------------------------------------------------------ the spool on disk

def root() -> Path:
    if os.environ.get(schema.ENV_SPOOL):
        return Path(os.environ[schema.ENV_SPOOL]).expanduser()
    cache = os.environ.get("GQAPRUNE_CACHE") or Path.home() / ".cache" / "gqaprune"
    return Path(cache).expanduser() / "spool"


def store_key(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def store_dir(uri: str) -> Path:
    return root() / store_key(uri)


def run_dir(uri: str, run_id: str) -> Path:
    return store_dir(uri) / run_id


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard links where possible (a multi-GB model dir costs nothing), else copies."""
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=link)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        link(src, dst)


def append(uri: str, run_id: str, op: Op) -> Path:
    """Keep ``op`` (and a link / copy of its files) in the run's spool; return the run's spool dir."""
    with _lock:
        where = run_dir(uri, run_id)
        where.mkdir(parents=True, exist_ok=True)
        meta = where.parent / "store.txt"
        if not meta.exists():
            meta.write_text(redact(uri) + "\n")
        if op.kind == "artifact":
            n = sum(1 for _ in (where / "files").glob("*")) if (where / "files").exists() else 0
            src = Path(op.local_path)
            dst = where / "files" / f"{n:05d}" / src.name
            _link_or_copy(src, dst)
            op = Op(**{**asdict(op), "local_path": str(dst)})
        with open(where / OPS_FILE, "a") as handle:
            handle.write(json.dumps(asdict(op)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return where


def pending(uri: str, run_id: str) -> list[Op]:
    """Ops of the run not uploaded yet, oldest first."""
    where = run_dir(uri, run_id)
    if not (where / OPS_FILE).exists():
        return []
    lines = (where / OPS_FILE).read_text().splitlines()
    done = int((where / DONE_FILE).read_text() or 0) if (where / DONE_FILE).exists() else 0
    return [Op(**json.loads(line)) for line in lines[done:] if line.strip()]


def has_pending(uri: str, run_id: str) -> bool:
    return (run_dir(uri, run_id) / OPS_FILE).exists()


def pending_runs(uri: str) -> list[str]:
    base = store_dir(uri)
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if (p / OPS_FILE).exists())


def replay_run(client, uri: str, run_id: str) -> int:
    """Upload the run's waiting ops in order; the spool dir goes when all are in. Returns the
    number uploaded. A failing op raises (what is uploaded stays counted in ``done``)."""
    with _lock:
        where = run_dir(uri, run_id)
        if not (where / OPS_FILE).exists():
            return 0
        done = int((where / DONE_FILE).read_text() or 0) if (where / DONE_FILE).exists() else 0
        ops = pending(uri, run_id)
        for i, op in enumerate(ops, 1):
            apply(client, run_id, op)
            (where / DONE_FILE).write_text(str(done + i))
        shutil.rmtree(where, ignore_errors=True)
        return len(ops)


@dataclass(frozen=True)
class ReplayReport:
    uploaded: dict[str, int]     # run id -> ops uploaded
    failed: dict[str, str]       # run id -> one-line reason (still in the spool)


def replay_all(uri: str, client=None) -> ReplayReport:
    """Upload every run waiting in the spool of this store (quietly does nothing when empty)."""
    uploaded, failed = {}, {}
    runs = pending_runs(uri)
    if not runs:
        return ReplayReport(uploaded, failed)
    if client is None:
        from mlflow.tracking import MlflowClient
        client = MlflowClient(uri)
    for run_id in runs:
        try:
            uploaded[run_id] = replay_run(client, uri, run_id)
        except Exception as exc:  # noqa: BLE001 - keep it for the next replay
            failed[run_id] = (redact(str(exc)).strip().splitlines() or [type(exc).__name__])[0][:200]
    return ReplayReport(uploaded, failed)


def describe(uri: str) -> str:
    runs = pending_runs(uri)
    if not runs:
        return f"nothing waiting in {store_dir(uri)} for {redact(uri)}"
    lines = [f"{len(runs)} run(s) waiting in {store_dir(uri)} for {redact(uri)}:"]
    lines += [f"  {r}: {len(pending(uri, r))} op(s)" for r in runs]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from tracking.connect import tracking_uri
    uri = tracking_uri()
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    print(describe(uri))
    if argv and argv[0] == "--list":
        return 0
    report = replay_all(uri)
    for run_id, n in report.uploaded.items():
        print(f"uploaded run {run_id}: {n} op(s)")
    for run_id, why in report.failed.items():
        print(f"still waiting: run {run_id} ({why})", file=sys.stderr)
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
