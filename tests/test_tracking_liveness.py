"""Liveness verdicts on hand-built tags, the heartbeat thread, and stop signals -> Stopped."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tracking import liveness, schema
from tracking import schema as names

linux_only = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc (Linux)")


def dead_process() -> liveness.ProcessId:
    """The identity of a process that ran and is gone (its PID is free or reused)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    start = liveness.proc_start(child.pid) or ""
    child.wait()
    me = liveness.current()
    return liveness.ProcessId(me.host, child.pid, start, me.machine)


NOW = 1_800_000_000.0


def tags_of(p: liveness.ProcessId, heartbeat: float | None = None, **extra) -> dict:
    tags = liveness.identity_tags(p)
    tags[names.TAG_HEARTBEAT] = str(int(heartbeat if heartbeat is not None else NOW))
    tags.update(extra)
    return tags


@linux_only
def test_proc_start_is_stable_and_none_for_a_gone_process():
    me = os.getpid()
    assert liveness.proc_start(me) == liveness.proc_start(me) == liveness.current().start
    assert liveness.proc_start(2 ** 22 + 12345) is None             # above pid_max: never a process


@linux_only
@pytest.mark.parametrize("case, alive, why", [
    ("this process", True, "is running"),
    ("dead on this machine", False, "is gone"),
    ("pid reused", False, "now belongs to another process"),
    ("other host, fresh heartbeat", True, "heartbeat from"),
    ("other host, stale heartbeat", False, "no heartbeat"),
    ("other boot, stale heartbeat", False, "no heartbeat"),
    ("ours, untagged, old", False, "no liveness tags"),
    ("ours, untagged, young", True, "no liveness tags yet"),
    ("foreign, untagged, old", True, "not a gqaprune run"),
])
def test_judge(case, alive, why):
    me = liveness.current()
    start_ms = int((NOW - 10) * 1000)
    tags = {
        "this process": lambda: tags_of(me),
        "dead on this machine": lambda: tags_of(dead_process()),
        "pid reused": lambda: tags_of(liveness.ProcessId(me.host, me.pid, "1", me.machine)),
        "other host, fresh heartbeat": lambda: tags_of(liveness.ProcessId("node7", 42, "9", "b:p"), NOW - 60),
        "other host, stale heartbeat": lambda: tags_of(liveness.ProcessId("node7", 42, "9", "b:p"), NOW - 301),
        "other boot, stale heartbeat": lambda: tags_of(liveness.ProcessId(me.host, me.pid, me.start,
                                                                          "otherboot:pid"), NOW - 400),
        "ours, untagged, old": lambda: {schema.TAG_STAGE: "prune"},
        "ours, untagged, young": lambda: {schema.TAG_STAGE: "prune"},
        "foreign, untagged, old": lambda: {},
    }[case]()
    if case.endswith("old"):
        start_ms = int((NOW - liveness.UNTAGGED_GRACE_S - 1) * 1000)
    verdict = liveness.judge(tags, start_ms, now_s=NOW, stale_after=300)
    assert verdict.alive is alive and why in verdict.why
    if not alive and names.TAG_HEARTBEAT in tags:
        assert verdict.last_seen_ms == int(tags[names.TAG_HEARTBEAT]) * 1000


def test_heartbeat_beats_registered_runs_until_removed():
    beats = []
    hb = liveness.Heartbeat(beats.append, interval=0.02)
    hb.add("a")
    hb.add("b")
    deadline = time.monotonic() + 5
    while not ({"a", "b"} <= set(beats)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert {"a", "b"} <= set(beats)
    hb.remove("a")                                     # waits for a beat in progress
    n = len(beats)
    deadline = time.monotonic() + 5
    while beats[n:].count("b") < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert beats[n:].count("b") >= 3 and "a" not in beats[n:]
    hb.remove("b")
    assert hb.runs() == []


def test_a_failing_beat_does_not_stop_the_heartbeat():
    beats = []

    def beat(run_id):
        beats.append(run_id)
        raise ConnectionError("server away")
    hb = liveness.Heartbeat(beat, interval=0.02)
    hb.add("a")
    deadline = time.monotonic() + 5
    while len(beats) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    hb.remove("a")
    assert len(beats) >= 3


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_stop_signals_raise_stopped_with_the_signal_as_reason(sig):
    previous = signal.getsignal(sig)
    with pytest.raises(liveness.Stopped) as info:
        with liveness.stop_on_signals():
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler raises at the next bytecode
    assert info.value.reason == f"killed by {signal.Signals(sig).name}"
    assert info.value.exit_code == 128 + sig
    assert isinstance(info.value, KeyboardInterrupt)
    assert signal.getsignal(sig) is previous                         # restored


def test_signals_while_closing_are_deferred_not_raised():
    with liveness.stop_on_signals():
        with liveness.closing():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)                                        # nothing raised here
        assert liveness.take_pending() == signal.SIGTERM
        assert liveness.take_pending() is None


def test_a_second_signal_during_the_stop_is_deferred():
    with pytest.raises(liveness.Stopped) as info:
        with liveness.stop_on_signals():
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            finally:  # the unwinding (closing the runs) must not be cut short by mlflow run's SIGTERM
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
    assert info.value.signum == signal.SIGINT
    assert liveness.take_pending() == signal.SIGTERM


def test_ignored_signals_stay_ignored():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)        # nohup
    try:
        with liveness.stop_on_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_outside_the_main_thread_nothing_is_installed():
    seen = []

    def worker():
        with liveness.stop_on_signals():
            seen.append(signal.getsignal(signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [before]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_stop_swallowed_by_python_is_delivered_again(monkeypatch):
    """A Stopped raised inside a weakref callback is printed and dropped by Python; the signal is
    delivered again so the process still stops."""
    import weakref
    monkeypatch.setattr(liveness, "LOST_STOP_S", 0.2)

    class Thing:
        pass
    with pytest.raises(liveness.Stopped) as info:
        with liveness.stop_on_signals():
            thing = Thing()
            weakref.finalize(thing, lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.05)))
            del thing                                   # the handler runs inside the finalizer
            for _ in range(100):                        # nothing raised yet: the Stopped was dropped ...
                time.sleep(0.05)                        # ... until it is delivered again
    assert info.value.signum == signal.SIGTERM
