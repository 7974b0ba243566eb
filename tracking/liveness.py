"""Is the process that owns a RUNNING run still alive? And stop signals that close runs.

Every run we start is tagged with its process: host, PID, the PID's start time and the machine
(boot id + PID namespace), and a daemon thread refreshes a heartbeat tag. A RUNNING run is dead:

* on this machine (same host, boot and PID namespace): when its PID is gone or now belongs to a
  process that started at another time (exact, immediate);
* elsewhere: when its heartbeat is older than ``GQAPRUNE_STALE_AFTER_S`` (default 300 s);
* without any liveness tag but with our ``stage`` tag (an older version): when it started more than
  ``UNTAGGED_GRACE_S`` ago. Runs with neither (another tool's, or an ``mlflow run`` launcher whose
  worker has not started yet) are never touched.

Signals: inside :func:`stop_on_signals`, SIGTERM / SIGINT / SIGHUP raise :class:`Stopped` (a
``KeyboardInterrupt``) in the main thread, so the runs close KILLED with the signal as reason.
Signals arriving while a stop is handled or a run is being closed are deferred, not raised:
``mlflow run`` answers the terminal's Ctrl-C with a SIGTERM of its own a moment later, which must
not cut the closing short. A Stopped that Python drops (raised inside a weakref callback or
``__del__``) is noticed and the signal delivered again.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

from tracking import schema

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
UNTAGGED_GRACE_S = 1800.0
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")
_PPID_AT_IMPORT = os.getppid()


def _env_seconds(name: str, default: float) -> float:
    try:
        return max(0.1, float(os.environ.get(name, default)))
    except ValueError:
        return default


def heartbeat_s() -> float:
    return _env_seconds(schema.ENV_HEARTBEAT_S, HEARTBEAT_S)


def stale_after_s() -> float:
    return _env_seconds(schema.ENV_STALE_AFTER_S, STALE_AFTER_S)


# ------------------------------------------------------------------------------ process identity

@dataclass(frozen=True)
class ProcessId:
    host: str
    pid: int
    start: str     # /proc/<pid>/stat starttime (clock ticks after boot); "" where /proc is absent
    machine: str   # "<boot id>:<pid namespace>"; "" where unknown


def proc_start(pid: int) -> str | None:
    """Field 22 of ``/proc/<pid>/stat`` (start time in clock ticks after boot); None when the
    process does not exist (or /proc is absent)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode(errors="replace")
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and ')', so split after the last ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _machine() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read().strip()
        return f"{boot}:{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


_CURRENT: ProcessId | None = None


def current() -> ProcessId:
    """This process (recomputed after a fork)."""
    global _CURRENT
    if _CURRENT is None or _CURRENT.pid != os.getpid():
        pid = os.getpid()
        _CURRENT = ProcessId(socket.gethostname(), pid, proc_start(pid) or "", _machine())
    return _CURRENT


def identity_tags(process: ProcessId | None = None) -> dict[str, str]:
    p = process or current()
    return {schema.TAG_HOST: p.host, schema.TAG_PID: str(p.pid), schema.TAG_PID_START: p.start,
            schema.TAG_MACHINE: p.machine, schema.TAG_HEARTBEAT: str(int(time.time()))}


@dataclass(frozen=True)
class Verdict:
    alive: bool
    why: str
    last_seen_ms: int | None = None  # the last heartbeat, when known (the dead run's end time)


def judge(tags: Mapping[str, str], start_time_ms: int, now_s: float | None = None,
          stale_after: float | None = None, untagged_grace: float = UNTAGGED_GRACE_S) -> Verdict:
    """Whether the process behind a RUNNING run with these tags is alive (module docstring)."""
    now_s = time.time() if now_s is None else now_s
    stale_after = stale_after_s() if stale_after is None else stale_after
    me = current()
    pid, host = tags.get(schema.TAG_PID), tags.get(schema.TAG_HOST, "?")
    beat = tags.get(schema.TAG_HEARTBEAT)
    last_s = float(beat) if beat and beat.replace(".", "", 1).isdigit() else None
    last_ms = int(last_s * 1000) if last_s is not None else None
    if pid and pid.isdigit() and me.machine and tags.get(schema.TAG_MACHINE) == me.machine \
            and tags.get(schema.TAG_HOST) == me.host:
        started = proc_start(int(pid))
        if started is None:
            return Verdict(False, f"process {pid} on {host} is gone", last_ms)
        if tags.get(schema.TAG_PID_START) and started != tags[schema.TAG_PID_START]:
            return Verdict(False, f"process {pid} on {host} is gone (its PID now belongs to another process)",
                           last_ms)
        return Verdict(True, f"process {pid} on {host} is running", last_ms)
    if last_s is not None:
        age = now_s - last_s
        if age > stale_after:
            return Verdict(False, f"no heartbeat from process {pid} on {host} for {age:.0f} s "
                                  f"(limit {stale_after:.0f} s)", last_ms)
        return Verdict(True, f"heartbeat from {host} {age:.0f} s ago", last_ms)
    if not tags.get(schema.TAG_STAGE):  # no liveness tag, no stage: not provably ours, never touched
        return Verdict(True, "not a gqaprune run")
    age = now_s - start_time_ms / 1000
    if age > untagged_grace:
        return Verdict(False, f"no liveness tags and started {age:.0f} s ago", None)
    return Verdict(True, f"no liveness tags yet, started {age:.0f} s ago")


# ------------------------------------------------------------------------------ heartbeat

class Heartbeat:
    """A daemon thread calling ``beat(run_id)`` for every registered run each ``interval`` s."""

    def __init__(self, beat: Callable[[str], None], interval: float | None = None):
        self._beat, self._interval = beat, interval
        self._runs: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, run_id: str) -> None:
        with self._lock:
            if run_id not in self._runs:
                self._runs.append(run_id)
            if self._thread is None or not self._thread.is_alive():
                self._wake.clear()
                self._thread = threading.Thread(target=self._loop, name="gqaprune-heartbeat", daemon=True)
                self._thread.start()

    def remove(self, run_id: str) -> None:
        """Stop beating for ``run_id``; waits for a beat in progress so none lands after a close."""
        with self._lock:
            if run_id in self._runs:
                self._runs.remove(run_id)

    def runs(self) -> list[str]:
        with self._lock:
            return list(self._runs)

    def _loop(self) -> None:
        while not self._wake.wait(self._interval or heartbeat_s()):
            with self._lock:  # held while beating: remove() waits until the beat is done
                if not self._runs:
                    self._thread = None
                    return
                for run_id in list(self._runs):
                    try:
                        self._beat(run_id)
                    except Exception:  # noqa: BLE001 - a missed beat is not an error
                        pass


# ------------------------------------------------------------------------------ stop signals

class Stopped(KeyboardInterrupt):
    """A stop signal: the runs close KILLED with ``reason``."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.reason = schema.REASON_SIGNAL.format(signal=signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_state = {"depth": 0, "stopping": False, "handled": False, "signum": None, "closing": 0, "pending": None,
          "generation": 0}  # generation: which stop a watchdog timer belongs to
LOST_STOP_S = 2.0  # a Stopped not caught by a tracked run within this time was swallowed


def _handler(signum, frame):  # noqa: ARG001 - signal handler signature
    if _state["stopping"] or _state["closing"]:
        _state["pending"] = _state["pending"] or signum
        return
    _state.update(stopping=True, handled=False, signum=signum, generation=_state["generation"] + 1)
    _watch_for_a_lost_stop(_state["generation"])
    raise Stopped(signum)


def _watch_for_a_lost_stop(generation: int) -> None:
    """An exception raised by a signal handler inside a weakref callback or ``__del__`` is
    printed and dropped ("Exception ignored in ..."). If no tracked run has caught the Stopped
    after LOST_STOP_S, deliver the signal again so the stop is not lost."""
    def check():
        if _state["generation"] != generation or not _state["stopping"] or _state["handled"]:
            return
        if _state["closing"]:
            _watch_for_a_lost_stop(generation)
            return
        signum, _state["pending"] = _state["pending"] or _state["signum"], None
        _state["stopping"] = False
        os.kill(os.getpid(), signum)
    timer = threading.Timer(LOST_STOP_S, check)
    timer.daemon = True
    timer.start()


def stop_handled() -> None:
    """A tracked run caught the Stopped: it is being handled (closing the runs)."""
    _state["handled"] = True


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn stop signals into :class:`Stopped` for the duration (main thread only; nests).

    A signal whose handler is SIG_IGN (``nohup``, background jobs) stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {}
    if _state["depth"] == 0:
        _state.update(stopping=False, pending=None)
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None or signal.getsignal(sig) is signal.SIG_IGN:
                continue
            saved[sig] = signal.signal(sig, _handler)
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        for sig, previous in saved.items():
            signal.signal(sig, previous)
        if _state["depth"] == 0:  # (the generation bump retires this stop's watchdog)
            _state.update(stopping=False, handled=False, signum=None, generation=_state["generation"] + 1)


@contextmanager
def closing() -> Iterator[None]:
    """While a run is being closed, stop signals are deferred (see :func:`take_pending`)."""
    _state["closing"] += 1
    try:
        yield
    finally:
        _state["closing"] -= 1


def take_pending() -> int | None:
    """The signal that arrived while closing (and had nothing to interrupt), once."""
    pending, _state["pending"] = _state["pending"], None
    return pending


def mark_stopping() -> None:
    """A stop is being handled (e.g. a KeyboardInterrupt): further signals are deferred."""
    _state.update(stopping=True, handled=True)


def die_with_parent() -> None:
    """Linux: get SIGTERM when the parent (``mlflow run``'s launcher) dies, even by SIGKILL, so
    the runs close KILLED instead of running on orphaned. A parent already gone stops us now."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG = 1
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != _PPID_AT_IMPORT:
        os.kill(os.getpid(), signal.SIGTERM)


# ------------------------------------------------------------------------------ after mlflow run

def _gone(pid: int, start: str | None) -> bool:
    """True when process ``pid`` (started at ``start``) has exited (a zombie counts as exited)."""
    now = proc_start(pid)
    if now is None or (start and now != start):
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[-1].split()[0] in ("Z", "X")
    except OSError:
        return True


def reassert_after(pid: int, status: str, run_ids: list[str], uri: str) -> None:
    """Start a detached helper that, once process ``pid`` has exited, sets ``status`` again on
    the runs that another writer changed meanwhile.

    Why: ``mlflow run`` (3.x) marks its run FAILED after its worker exits non-zero, without
    looking at the status the worker set (``RunStatus.is_terminated`` is given the status string
    and never matches), so a KILLED run would end FAILED. The helper waits at most 120 s.
    """
    import subprocess
    import sys
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)  # through the environment: argv is public
    subprocess.Popen([sys.executable, "-m", "tracking.liveness", "reassert", str(pid), proc_start(pid) or "",
                      status, *run_ids], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)


def _reassert(pid: int, start: str, status: str, run_ids: list[str], wait_s: float = 120.0) -> None:
    deadline = time.monotonic() + wait_s
    while not _gone(pid, start) and time.monotonic() < deadline:
        time.sleep(0.2)
    from mlflow.tracking import MlflowClient
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    for run_id in run_ids:
        run = client.get_run(run_id)
        reason = run.data.tags.get(schema.TAG_FAILURE, "")
        if run.info.status != status and reason.startswith(schema.REASON_SIGNAL.split("{")[0]):
            client.set_terminated(run_id, status, end_time=run.info.end_time)


if __name__ == "__main__":
    import sys
    if len(sys.argv) >= 5 and sys.argv[1] == "reassert":
        _reassert(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:])
