"""Where a sweep's points run: in this process (``local``) or as Ray tasks (``ray``).

One interface for both::

    executor = make_executor(ExecutorSettings(executor="ray", max_retries=2),
                             ClaimSettings(experiment_id))
    results = executor.run(points, work, on_done=..., on_progress=...)

``work(point)`` is a picklable top-level function (or ``functools.partial`` of one) that runs one
point and returns a value; the point *failed* when it raises or when the value has ``ok ==
False`` (search's ``Outcome``; its ``error`` is reported, and ``retryable == False`` on it means
do not try again, e.g. for a bad setting). Before ``work`` runs, the executor claims the point in the
tracking store (``tracking.claims``, key ``point.key``) so no two workers or sweeps run it at
once; ``claims.current()`` inside ``work`` is that claim (``end_orphans`` ends runs left RUNNING
by a worker that died). A point claimed by a live worker elsewhere is tried again every
``busy_poll_s`` (it is not a failure; resume then reuses what the other worker finished).
A failed point is tried again up to ``max_retries`` times; on Ray a point whose worker process
died (killed, out of memory, node lost) counts as a failed attempt and is redone.

Differences: ``local`` runs one point at a time in this process (today's behaviour; no extra
dependency). ``ray`` runs ``floor(cluster CPUs / cpus_per_point)`` (and GPUs / gpus_per_point)
points at once, each in a Ray worker process with ``num_cpus=cpus_per_point`` and
``num_gpus=gpus_per_point`` (default 1 when the cluster has GPUs, else 0), on a local Ray
instance started for the sweep (bound to loopback) or on the cluster at ``ray_address``
(``auto``, ``ray://host:10001``; unset inside ``ray job submit``, where RAY_ADDRESS is set).
Workers log to the same tracking store: MLFLOW_TRACKING_URI is handed to them; credentials
(MLFLOW_TRACKING_USERNAME / PASSWORD) are not (Ray shows a job's runtime_env in its dashboard):
a local instance inherits them from this process, cluster nodes need them in their environment.
"""
from __future__ import annotations

import math
import os
import socket
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from gqaprune.errors import UserError
from tracking import claims
from tracking.claims import ClaimSettings, PointBusy
from tracking.connect import tracking_uri

EXECUTORS = ("local", "ray")
INSTALL_HINT = "pip install -e .[distributed]"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Forwarded to Ray workers (never credentials: Ray shows runtime_env in its dashboard).
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "GQAPRUNE_CACHE", "HF_HOME",
                 "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT")


@dataclass(frozen=True)
class ExecutorSettings:
    executor: str = "local"             # local | ray
    ray_address: str | None = None      # None: RAY_ADDRESS if set, else a local instance; "local": always one
    gpus_per_point: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_point: float = 1.0
    max_retries: int = 1                # attempts after the first failed one
    busy_poll_s: float = 15.0           # wait before asking again for a point claimed elsewhere
    num_cpus: int | None = None         # size of a local Ray instance (None: every core)
    worker_logs: bool = False           # stream Ray workers' stdout/stderr to this console


@dataclass(frozen=True)
class PointResult:
    point: Any
    status: str             # ok | failed | not run
    value: Any = None       # what work returned on the last attempt (None if it raised / died)
    error: str = ""         # one line, for failed points
    attempts: int = 0       # attempts that ran (busy retries not counted)
    worker: str = ""        # host:pid of the last attempt
    time_s: float = 0.0     # wall time of the last attempt

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class Progress:
    total: int
    completed: int          # ended ok
    failed: int             # ended failed after every retry
    running: int
    waiting: int            # claimed by another worker / sweep, asked again later
    retried: int            # failed attempts that were tried again

    def metrics(self, prefix: str = "search/live_") -> dict[str, float]:
        """The counts as metrics for the search run (``search/live_completed`` ...)."""
        return {f"{prefix}{k}": float(v) for k, v in
                (("completed", self.completed), ("failed", self.failed), ("running", self.running),
                 ("waiting", self.waiting), ("retried", self.retried))}


@dataclass(frozen=True)
class Attempt:
    """What one attempt of one point came back with (from the worker)."""
    status: str             # ok | failed | busy | died
    value: Any = None
    error: str = ""
    worker: str = ""
    time_s: float = 0.0
    retryable: bool = True  # False: the value said so (e.g. a bad setting: trying again cannot help)


class Executor(Protocol):
    def run(self, points: Sequence[Any], work: Callable[[Any], Any],
            on_done: Callable[[PointResult], bool | None] | None = None,
            on_progress: Callable[[Progress], None] | None = None) -> list[PointResult]:
        """Run every point; results in the order of ``points``. ``on_done`` sees each final result
        (return True to stop: no new point starts, running ones finish, the rest are 'not run');
        ``on_progress`` sees the counts whenever they change."""


# ---------------------------------------------------------------------------- one attempt

def _one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return text if isinstance(exc, UserError) else f"{type(exc).__name__}: {text}"


def attempt(point: Any, work: Callable[[Any], Any], claim: ClaimSettings | None) -> Attempt:
    """Claim the point, run ``work``, release the claim: in this process or in a Ray worker."""
    worker, t0 = f"{socket.gethostname()}:{os.getpid()}", time.perf_counter()
    held = None
    if claim is not None:
        try:
            held = claims.claim(claim, point.key)
        except PointBusy as exc:
            return Attempt("busy", error=str(exc), worker=worker)
        except Exception as exc:  # noqa: BLE001 - the store unreachable: a failed attempt, retried
            return Attempt("failed", error=f"could not claim the point: {_one_line(exc)}", worker=worker)
    status, value, error, retryable = "failed", None, "", True
    try:
        value = work(point)
        ok = getattr(value, "ok", True)
        status = "ok" if ok else "failed"
        error = "" if ok else str(getattr(value, "error", "") or "failed")
        retryable = bool(getattr(value, "retryable", True))
    except Exception as exc:  # noqa: BLE001 - one point's failure is reported, not raised
        error = _one_line(exc)
        traceback.print_exc()
    finally:
        if held is not None:
            held.release(claims.END_DONE if status == "ok" else claims.END_FAILED)
    return Attempt(status, value, error, worker, time.perf_counter() - t0, retryable)


# ---------------------------------------------------------------------------- scheduling

class _Backend(Protocol):
    def capacity(self) -> int: ...
    def submit(self, index: int, point: Any) -> None: ...
    def wait(self, timeout: float) -> list[tuple[int, Attempt]]: ...
    def cancel(self) -> None: ...


def _drive(backend: _Backend, settings: ExecutorSettings, points: Sequence[Any], on_done, on_progress,
           desc: str) -> list[PointResult]:
    """The loop both executors share: submit up to capacity, collect, retry, defer busy points."""
    from tqdm.auto import tqdm
    n = len(points)
    ready, deferred = deque(range(n)), []          # deferred: (time to ask again, index)
    attempts, results, in_flight = [0] * n, [None] * n, set()
    counts = {"retried": 0}
    stopping = False
    bar = tqdm(total=n, desc=desc, unit="point")

    def progress() -> None:
        done = [r for r in results if r is not None]
        p = Progress(n, sum(r.ok for r in done), sum(r.status == "failed" for r in done),
                     len(in_flight), len(deferred), counts["retried"])
        bar.set_postfix(running=p.running, failed=p.failed, waiting=p.waiting, refresh=False)
        if on_progress is not None:
            on_progress(p)

    def finish(i: int, result: PointResult) -> None:
        nonlocal stopping
        results[i] = result
        bar.update(1)
        if on_done is not None and on_done(result):
            stopping = True

    try:
        progress()
        while ready or deferred or in_flight:
            now = time.monotonic()
            for item in [d for d in deferred if d[0] <= now]:
                deferred.remove(item)
                ready.append(item[1])
            submitted = False
            while ready and not stopping and len(in_flight) < backend.capacity():
                i = ready.popleft()
                in_flight.add(i)
                backend.submit(i, points[i])
                submitted = True
            if submitted:
                progress()
            if stopping and not in_flight:
                break
            if not in_flight:
                time.sleep(max(0.0, min(d[0] for d in deferred) - time.monotonic()) if deferred else 0)
                continue
            for i, att in backend.wait(timeout=1.0):
                in_flight.discard(i)
                if att.status == "busy":
                    deferred.append((time.monotonic() + settings.busy_poll_s, i))
                    continue
                attempts[i] += 1
                if att.status == "ok":
                    finish(i, PointResult(points[i], "ok", att.value, "", attempts[i], att.worker, att.time_s))
                elif attempts[i] <= settings.max_retries and att.retryable and not stopping:
                    counts["retried"] += 1
                    bar.write(f"retrying point {getattr(points[i], 'key', i)} "
                              f"({attempts[i]}/{settings.max_retries}): {att.error}")
                    ready.append(i)
                else:
                    finish(i, PointResult(points[i], "failed", att.value, att.error, attempts[i],
                                          att.worker, att.time_s))
            progress()
    except BaseException:
        backend.cancel()
        raise
    finally:
        bar.close()
    return [r if r is not None else PointResult(points[i], "not run", attempts=attempts[i])
            for i, r in enumerate(results)]


# ---------------------------------------------------------------------------- local

class _LocalBackend:
    """One point at a time: ``submit`` queues it, ``wait`` runs it (so progress shows it running)."""

    def __init__(self, work, claim):
        self.work, self.claim, self.queued = work, claim, []

    def capacity(self) -> int:
        return 1

    def submit(self, index, point) -> None:
        self.queued.append((index, point))

    def wait(self, timeout):
        out, self.queued = self.queued, []
        return [(index, attempt(point, self.work, self.claim)) for index, point in out]

    def cancel(self) -> None:
        pass


class LocalExecutor:
    """Points one after another in this process."""

    def __init__(self, settings: ExecutorSettings = ExecutorSettings(), claim: ClaimSettings | None = None):
        self.settings, self.claim = settings, claim

    def run(self, points, work, on_done=None, on_progress=None) -> list[PointResult]:
        return _drive(_LocalBackend(work, self.claim), self.settings, points, on_done, on_progress, "sweep")


# ---------------------------------------------------------------------------- Ray

def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise UserError("--executor ray needs Ray, which is not installed",
                        f"run `{INSTALL_HINT}` (or use --executor local)") from exc
    return ray


def _loopback_only() -> None:
    """A Ray instance started for one sweep listens on 127.0.0.1, not on the machine's network
    interfaces (Ray picks the node's routable address otherwise). Must precede ``import ray``
    in the processes it starts, which inherit the variable."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if "ray._private.ray_constants" in sys.modules:  # imported already: its constant was read
        sys.modules["ray._private.ray_constants"].ENABLE_RAY_CLUSTER = False


def worker_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    env["MLFLOW_TRACKING_URI"] = tracking_uri()   # absolute sqlite default, or the server
    # `mlflow run` sets MLFLOW_RUN_ID for the search run; a worker inheriting it would resume that
    # run as its own active run (and end it). Workers start their children with parent_run_id.
    env["MLFLOW_RUN_ID"] = ""
    return env


def _job_env_keys() -> set[str]:
    """Environment variables the submitted Ray job already sets for its workers (setting one again
    in ray.init is a conflict Ray refuses)."""
    import json
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    try:
        return set((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}) if raw else set()
    except (ValueError, AttributeError):
        return set()


class _RayBackend:
    def __init__(self, ray, work, claim, settings: ExecutorSettings, gpus: float):
        self.ray, self.settings, self.gpus = ray, settings, gpus
        self.task = ray.remote(attempt)
        # Ray's own retries are off: every failed attempt is counted here, the same way as locally.
        self.options = dict(num_cpus=settings.cpus_per_point, num_gpus=gpus, max_retries=0,
                            retry_exceptions=False)
        self.work, self.claim = ray.put(work), claim   # put once, not once per point
        self.refs = {}

    def capacity(self) -> int:
        res = self.ray.cluster_resources()
        slots = math.floor(res.get("CPU", 0) / self.settings.cpus_per_point + 1e-9) \
            if self.settings.cpus_per_point > 0 else len(self.refs) + 1
        if self.gpus > 0:
            slots = min(slots, math.floor(res.get("GPU", 0) / self.gpus + 1e-9))
        return max(1, slots)

    def submit(self, index, point) -> None:
        key = str(getattr(point, "key", index))[:12]
        self.refs[self.task.options(name=f"point-{key}", **self.options).remote(point, self.work, self.claim)] = index

    def wait(self, timeout):
        done, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=timeout)
        out = []
        for ref in done:
            index = self.refs.pop(ref)
            try:
                out.append((index, self.ray.get(ref)))
            except self.ray.exceptions.RayError as exc:   # not the point's code: attempt() catches that
                out.append((index, Attempt("died", error=self._why(exc))))
        return out

    def _why(self, exc) -> str:
        died = tuple(getattr(self.ray.exceptions, n) for n in ("WorkerCrashedError", "NodeDiedError",
                                                                "OutOfMemoryError", "LocalRayletDiedError")
                     if hasattr(self.ray.exceptions, n))
        what = "worker died" if isinstance(exc, died) else "Ray could not run the task"
        return f"{what} ({type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]})"

    def cancel(self) -> None:
        for ref in list(self.refs):
            self.ray.cancel(ref, force=True)
        self.refs.clear()


def _check(settings: ExecutorSettings) -> None:
    if settings.cpus_per_point < 0 or (settings.gpus_per_point or 0) < 0:
        raise UserError("cpus_per_point and gpus_per_point must be >= 0", "pass e.g. --cpus_per_point 4 --gpus_per_point 1")
    if settings.max_retries < 0:
        raise UserError(f"max_retries {settings.max_retries} is negative", "pass --max_retries 0 or more")


class RayExecutor:
    """Each point a Ray task, on a local instance started for the sweep or on a cluster."""

    def __init__(self, settings: ExecutorSettings, claim: ClaimSettings | None = None):
        _check(settings)
        import_ray()            # fail now, with the install command, not after planning
        self.settings, self.claim = settings, claim

    def _connect(self):
        """-> (ray, started): connect, or start a local instance (then stopped after the run)."""
        s = self.settings
        address = os.environ.get("RAY_ADDRESS") if s.ray_address is None else s.ray_address
        remote = bool(address) and address != "local"
        if not remote:
            _loopback_only()
        ray = import_ray()
        if ray.is_initialized():
            return ray, False
        env = worker_env()
        uri = env["MLFLOW_TRACKING_URI"]
        if remote and (uri.startswith(("sqlite:", "file:")) or "://127." in uri or "://localhost" in uri):
            print(f"warning: Ray workers on other machines cannot reach the tracking store {uri}; "
                  "start scripts/team_server.sh on a reachable address and set MLFLOW_TRACKING_URI",
                  file=sys.stderr)
        for key in _job_env_keys():     # inside `ray job submit`: the job's own values win
            env.pop(key, None)
        runtime_env = {"env_vars": env}
        if not remote:  # workers of a local instance import this checkout
            path = os.environ.get("PYTHONPATH", "")
            env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT)] + ([path] if path else []))
        kwargs = dict(runtime_env=runtime_env, log_to_driver=s.worker_logs)
        try:
            if remote:
                ray.init(address=address, **kwargs)
            else:
                ray.init(address="local", num_cpus=s.num_cpus, include_dashboard=False, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"could not connect to the Ray cluster at '{address}' ({_one_line(exc)})",
                            "start it with `ray start --head` or pass --ray_address auto / ray://host:10001") from exc
        return ray, not remote

    def _gpus(self, ray, local: bool) -> float:
        have = ray.cluster_resources().get("GPU", 0)
        want = self.settings.gpus_per_point
        if want is None:
            return 1.0 if have > 0 else 0.0
        if want > have and local:   # a cluster may still scale up
            raise UserError(f"gpus_per_point {want:g} but the Ray instance has {have:g} GPU(s)",
                            "pass --gpus_per_point 0 (CPU) or run where GPUs are visible")
        return float(want)

    def run(self, points, work, on_done=None, on_progress=None) -> list[PointResult]:
        ray, started = self._connect()
        try:
            if self.settings.cpus_per_point > ray.cluster_resources().get("CPU", 0) and started:
                raise UserError(f"cpus_per_point {self.settings.cpus_per_point:g} exceeds the "
                                f"{ray.cluster_resources().get('CPU', 0):g} CPUs of the Ray instance",
                                "pass a smaller --cpus_per_point")
            if self.claim is not None:      # one registry made here, not raced for by the workers
                claims.prepare(self.claim)
            backend = _RayBackend(ray, work, self.claim, self.settings, self._gpus(ray, started))
            return _drive(backend, self.settings, points, on_done, on_progress, "sweep (ray)")
        finally:
            if started:
                ray.shutdown()


def make_executor(settings: ExecutorSettings, claim: ClaimSettings | None = None) -> Executor:
    if settings.executor not in EXECUTORS:
        raise UserError(f"unknown executor '{settings.executor}'", f"use one of {', '.join(EXECUTORS)}")
    _check(settings)
    return LocalExecutor(settings, claim) if settings.executor == "local" else RayExecutor(settings, claim)
