"""Bounded back-off on passing store failures; everything else raised at once."""
import sqlite3

import pytest
import requests
from mlflow.exceptions import MlflowException

from gqaprune.errors import UserError
from tracking import retry


def _locked() -> MlflowException:
    """What MLflow's SQLAlchemy store raises on a locked SQLite file (chained like MLflow does)."""
    try:
        try:
            raise sqlite3.OperationalError("database is locked")
        except sqlite3.OperationalError as inner:
            raise MlflowException("(sqlite3.OperationalError) database is locked",
                                  error_code="TEMPORARILY_UNAVAILABLE") from inner
    except MlflowException as exc:
        return exc


def _refused() -> Exception:
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError as inner:
            raise requests.exceptions.ConnectionError("HTTPConnectionPool(host='127.0.0.1', port=9): "
                                                      "Max retries exceeded") from inner
    except requests.exceptions.ConnectionError as exc:
        return exc


@pytest.mark.parametrize("exc, transient", [
    (_locked(), True),
    (_refused(), True),
    (MlflowException("API request to http://h/api/2.0/mlflow/runs/log-batch failed with exception "
                     "HTTPConnectionPool(host='h', port=1): Max retries exceeded"), True),
    (MlflowException("too many 503 error responses"), True),
    (MlflowException("Run 'x' not found", error_code="RESOURCE_DOES_NOT_EXIST"), False),
    (MlflowException("Invalid value for param", error_code="INVALID_PARAMETER_VALUE"), False),
    (ValueError("bad"), False),
])
def test_is_transient(exc, transient):
    assert retry.is_transient(exc) is transient


class FakeClock:
    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def sleep(self, s):
        self.sleeps.append(s)
        self.now += s

    def __call__(self):
        return self.now


def test_retries_with_doubling_back_off_then_succeeds(capsys):
    clock, calls = FakeClock(), []

    def flaky():
        calls.append(clock.now)
        if len(calls) < 4:
            raise _locked()
        return "ok"
    policy = retry.RetryPolicy(budget_s=60, first_delay_s=0.5, max_delay_s=1.5)
    assert retry.call(flaky, "sqlite:////x/mlflow.db", "logging", policy, sleep=clock.sleep, clock=clock) == "ok"
    assert clock.sleeps == [0.5, 1.0, 1.5]                   # doubled, capped at max_delay
    assert capsys.readouterr().err.count("retrying for up to 60 s") == 1   # one line, not one per try


def test_gives_up_after_the_budget_with_the_fix_for_sqlite():
    clock = FakeClock()

    def locked():
        raise _locked()
    with pytest.raises(retry.StoreUnavailable) as info:
        retry.call(locked, "sqlite:////x/mlflow.db", "logging metrics", retry.RetryPolicy(5, 1, 8),
                   sleep=clock.sleep, clock=clock)
    assert clock.sleeps == [1, 2]                           # 1 + 2 = 3 s; the next 4 s would pass 5 s
    assert isinstance(info.value, UserError)
    assert "stayed locked" in info.value.problem and "logging metrics" in info.value.problem
    assert "tracking server" in info.value.fix and "Team setup" in info.value.fix


def test_gives_up_naming_the_redacted_server():
    clock = FakeClock()

    def down():
        raise _refused()
    with pytest.raises(retry.StoreUnavailable) as info:
        retry.call(down, "http://alice:s3cret@10.0.0.1:5000", "starting the run", retry.RetryPolicy(2, 1, 1),
                   sleep=clock.sleep, clock=clock)
    assert "http://***@10.0.0.1:5000" in info.value.problem and "s3cret" not in str(info.value)


def test_non_transient_errors_are_raised_at_once():
    clock, calls = FakeClock(), []

    def missing():
        calls.append(1)
        raise MlflowException("Run 'x' not found", error_code="RESOURCE_DOES_NOT_EXIST")
    with pytest.raises(MlflowException):
        retry.call(missing, "sqlite:///x.db", "reading", retry.RetryPolicy(60), sleep=clock.sleep, clock=clock)
    assert calls == [1] and clock.sleeps == []


@pytest.mark.parametrize("uri, env, budget", [
    ("sqlite:///x.db", None, retry.SQLITE_BUDGET_S),
    ("http://h:5000", None, retry.SERVER_BUDGET_S),
    ("http://h:5000", "7.5", 7.5),
])
def test_policy_for(monkeypatch, uri, env, budget):
    if env is None:
        monkeypatch.delenv("GQAPRUNE_STORE_RETRY_S", raising=False)
    else:
        monkeypatch.setenv("GQAPRUNE_STORE_RETRY_S", env)
    assert retry.policy_for(uri).budget_s == budget


def test_policy_rejects_a_bad_budget(monkeypatch):
    monkeypatch.setenv("GQAPRUNE_STORE_RETRY_S", "soon")
    with pytest.raises(UserError, match="GQAPRUNE_STORE_RETRY_S"):
        retry.policy_for("sqlite:///x.db")
