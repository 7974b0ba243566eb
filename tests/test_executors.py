"""Executors: the local loop and Ray tasks share scheduling, retries, claims and progress.

Ray itself (worker processes killed mid-point, redone; claims taken over) is exercised end to
end by tests/test_team_server.py, which starts a local Ray instance once for the whole sweep.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from gqaprune.errors import UserError
from prune_entry import executors
from prune_entry.executors import ExecutorSettings, LocalExecutor, Progress, make_executor
from tracking import claims
from tracking.claims import ClaimSettings


@dataclass(frozen=True)
class P:
    key: str
    fail_times: int = 0         # attempts that raise before one succeeds
    marker_dir: str = ""


@dataclass(frozen=True)
class Out:
    key: str
    ok: bool
    error: str = ""
    retryable: bool = True


def _attempt_no(p: P) -> int:
    """Count attempts of a point across processes (a file per attempt)."""
    d = Path(p.marker_dir)
    n = len(list(d.glob(f"{p.key}.*"))) + 1
    (d / f"{p.key}.{n}").touch()
    return n


def flaky(p: P) -> Out:
    if _attempt_no(p) <= p.fail_times:
        raise RuntimeError(f"boom {p.key}")
    return Out(p.key, True)


def soft_fail(p: P) -> Out:
    return Out(p.key, False, "bad point")


def with_claim(p: P) -> Out:
    held = claims.current()
    assert held is not None and held.key == p.key
    return Out(p.key, True)


@pytest.fixture
def markers(tmp_path):
    d = tmp_path / "attempts"
    d.mkdir()
    return str(d)


def test_local_runs_in_order_and_retries_failures(markers):
    points = [P("a", 0, markers), P("b", 1, markers), P("c", 5, markers)]
    seen, progress = [], []
    results = LocalExecutor(ExecutorSettings(max_retries=2)).run(points, flaky, on_done=seen.append,
                                                                 on_progress=progress.append)
    assert [r.point.key for r in results] == ["a", "b", "c"]
    assert [(r.status, r.attempts) for r in results] == [("ok", 1), ("ok", 2), ("failed", 3)]
    assert results[2].error == "RuntimeError: boom c" and results[2].value is None
    assert [r.point.key for r in seen] == ["a", "b", "c"]
    assert progress[-1] == Progress(3, 2, 1, 0, 0, 3)
    assert progress[-1].metrics()["search/live_completed"] == 2.0


def test_value_with_ok_false_is_a_failed_point_and_keeps_its_value(markers):
    (r,) = LocalExecutor(ExecutorSettings(max_retries=1)).run([P("a", 0, markers)], soft_fail)
    assert (r.status, r.attempts, r.error) == ("failed", 2, "bad point")
    assert r.value == Out("a", False, "bad point")


def final_fail(p: P) -> Out:
    _attempt_no(p)
    return Out(p.key, False, "ratio too high", retryable=False)


def test_a_value_that_is_not_retryable_is_not_tried_again(markers):
    (r,) = LocalExecutor(ExecutorSettings(max_retries=3)).run([P("a", 0, markers)], final_fail)
    assert (r.status, r.attempts, r.error) == ("failed", 1, "ratio too high")
    assert len(list(Path(markers).iterdir())) == 1


def test_on_done_true_stops_the_sweep(markers):
    points = [P(k, 0, markers) for k in "abcd"]
    results = LocalExecutor().run(points, flaky, on_done=lambda r: r.point.key == "b")
    assert [r.status for r in results] == ["ok", "ok", "not run", "not run"]


def test_claims_are_held_during_work_and_busy_points_wait(tracking_store, markers):
    exp = MlflowClient().create_experiment(f"claims-{Path(markers).parent.name}")
    cs = ClaimSettings(exp, heartbeat_s=0.2)
    elsewhere = claims.claim(cs, "b")                 # another live worker holds b for a moment
    threading.Timer(1.0, elsewhere.release).start()
    t0 = time.monotonic()
    results = LocalExecutor(ExecutorSettings(busy_poll_s=0.3), cs).run(
        [P("a", 0, markers), P("b", 0, markers)], with_claim)
    assert [r.status for r in results] == ["ok", "ok"]
    assert [r.attempts for r in results] == [1, 1]    # waiting is not an attempt
    assert time.monotonic() - t0 >= 0.9
    state = claims.point_state(claims.list_registries(MlflowClient(), exp), "b")
    assert sorted(state.gens) == [0, 1]               # the other holder's, then ours


def test_a_claim_that_cannot_be_made_is_a_failed_attempt(tracking_store, markers):
    (r,) = LocalExecutor(ExecutorSettings(max_retries=1), ClaimSettings("987654321")).run(
        [P("a", 0, markers)], flaky)
    assert (r.status, r.attempts) == ("failed", 2)
    assert r.error.startswith("could not claim the point: ")
    assert list(Path(markers).iterdir()) == []            # work never ran without its claim


def test_unknown_executor_and_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="unknown executor 'dask'"):
        make_executor(ExecutorSettings(executor="dask"))
    with pytest.raises(UserError, match="max_retries"):
        make_executor(ExecutorSettings(max_retries=-1))


def test_ray_missing_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)     # import ray -> ImportError
    with pytest.raises(UserError) as err:
        make_executor(ExecutorSettings(executor="ray"))
    assert executors.INSTALL_HINT in str(err.value)


def test_worker_env_forwards_the_store_but_no_credentials(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    monkeypatch.setenv("MLFLOW_RUN_ID", "0" * 32)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret-secret")
    env = executors.worker_env()
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999"
    assert "secret-secret" not in env.values() and "MLFLOW_TRACKING_PASSWORD" not in env
    assert env["MLFLOW_RUN_ID"] == ""                   # workers never resume the search run
