"""Is the process that owns a RUNNING run still alive? And stop signals that close runs.

Every run we start is tagged with its process: host, PID, the PID's start time and the machine
(boot id + PID namespace), and a daemon thread refreshes a heartbeat tag. A RUNNING run is dead:

* on this machine (same host, boot and PID namespace): when its PID is gone or now belongs to a
  process that started at another time (exact, immediate);
* elsewhere: when its heartbeat is older than ``GQAPRUNE_STALE_AFTER_S`` (default 300 s);
* without any liveness tag (an older version, or a launcher whose worker never started): when it
  started more than ``UNTAGGED_GRACE_S`` ago.

Signals: inside :func:`stop_on_signals`, SIGTERM / SIGINT / SIGHUP raise :class:`Stopped` (a
``KeyboardInterrupt``) in the main thread, so the runs close KILLED with the signal as reason.
Signals arriving while a run is being closed are deferred, not raised: ``mlflow run`` answers the
terminal's Ctrl-C with a SIGTERM of its own a moment later, which must not cut the closing short.
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

from tracking import names_robust as names

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
    return _env_seconds(names.ENV_HEARTBEAT_S, HEARTBEAT_S)


def stale_after_s() -> float:
    return _env_seconds(names.ENV_STALE_AFTER_S, STALE_AFTER_S)


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
    return {names.TAG_HOST: p.host, names.TAG_PID: str(p.pid), names.TAG_PID_START: p.start,
            names.TAG_MACHINE: p.machine, names.TAG_HEARTBEAT: str(int(time.time()))}


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
    pid, host = tags.get(names.TAG_PID), tags.get(names.TAG_HOST, "?")
    beat = tags.get(names.TAG_HEARTBEAT)
    last_s = float(beat) if beat and beat.replace(".", "", 1).isdigit() else None
    last_ms = int(last_s * 1000) if last_s is not None else None
    if pid and pid.isdigit() and me.machine and tags.get(names.TAG_MACHINE) == me.machine \
            and tags.get(names.TAG_HOST) == me.host:
        started = proc_start(int(pid))
        if started is None:
            return Verdict(False, f"process {pid} on {host} is gone", last_ms)
        if tags.get(names.TAG_PID_START) and started != tags[names.TAG_PID_START]:
            return Verdict(False, f"process {pid} on {host} is gone (its PID now belongs to another process)",
                           last_ms)
        return Verdict(True, f"process {pid} on {host} is running", last_ms)
    if last_s is not None:
        age = now_s - last_s
        if age > stale_after:
            return Verdict(False, f"no heartbeat from process {pid} on {host} for {age:.0f} s "
                                  f"(limit {stale_after:.0f} s)", last_ms)
        return Verdict(True, f"heartbeat from {host} {age:.0f} s ago", last_ms)
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
        self.reason = names.REASON_SIGNAL.format(signal=signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_state = {"depth": 0, "stopping": False, "closing": 0, "pending": None}


def _handler(signum, frame):  # noqa: ARG001 - signal handler signature
    if _state["stopping"] or _state["closing"]:
        _state["pending"] = _state["pending"] or signum
        return
    _state["stopping"] = True
    raise Stopped(signum)


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
        if _state["depth"] == 0:
            _state["stopping"] = False


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
    _state["stopping"] = True


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
