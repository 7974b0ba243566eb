"""Team setup end to end: PostgreSQL + `mlflow server` with basic-auth (scripts/team_server.sh),
a local Ray instance with 2 workers running a toy sweep that survives a server restart and a
killed worker, a resumed sweep, and the access rules (401 without credentials, a read-only user
cannot create runs). Every process started here is stopped.

This file is also the sweep driver (``python tests/test_team_server.py sweep ...``): its toy
``work`` lives in ``__main__``, so Ray ships it to the workers by value.
"""
from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "team_server.sh"
PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
EXPERIMENT = "team-sweep"
N_POINTS = 8
METRICS = ("loss", "achieved_ratio")


# ---------------------------------------------------------------------------- the toy sweep (driver side)

@dataclass(frozen=True)
class ToyPoint:
    key: str
    index: int


@dataclass(frozen=True)
class ToyOutcome:
    key: str
    status: str             # finished | reused
    run_id: str
    ok: bool = True


def toy_point(experiment_id: str, search_id: str, state_dir: str, step_s: float, point: ToyPoint) -> ToyOutcome:
    """One grid point as search runs it: reuse a FINISHED child, else end orphans of a dead worker
    and run a nested child run that logs metrics over a few seconds."""
    from mlflow.tracking import MlflowClient

    from tracking import claims
    client = MlflowClient()
    tags = {"search_point": point.key, "stage": "prune"}
    found = client.search_runs([experiment_id], " and ".join(
        [f"tags.`{k}` = '{v}'" for k, v in tags.items()] + ["attributes.status = 'FINISHED'"]))
    if found:
        return ToyOutcome(point.key, "reused", found[0].info.run_id)
    held = claims.current()
    held.end_orphans(tags)
    run = client.create_run(experiment_id, run_name=f"toy-{point.key}", tags={
        **tags, "mlflow.parentRunId": search_id, "search_run_id": search_id})
    Path(state_dir, f"running-{point.key}").write_text(str(os.getpid()))
    for step in range(3):
        client.log_metric(run.info.run_id, "loss", 1.0 / (point.index + step + 1), step=step)
        time.sleep(step_s)
    client.log_param(run.info.run_id, "index", point.index)
    client.log_metric(run.info.run_id, "achieved_ratio", 0.1 * point.index)
    client.set_terminated(run.info.run_id, "FINISHED")
    held.end_orphans(tags)      # a create_run retried across the outage may have left a twin
    Path(state_dir, f"done-{point.key}").write_text(str(os.getpid()))
    return ToyOutcome(point.key, "finished", run.info.run_id)


def sweep_main(argv: list[str]) -> int:
    """Driver: one search run, N points on a local Ray instance (2 CPUs) or the local executor,
    results as JSON."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--state", required=True)
    ap.add_argument("--max_retries", type=int, default=1)
    ap.add_argument("--step_s", type=float, default=1.0)
    ap.add_argument("--executor", default="ray")
    args = ap.parse_args(argv)
    from mlflow.tracking import MlflowClient

    from prune_entry.executors import ExecutorSettings, make_executor
    from tracking.claims import ClaimSettings
    client = MlflowClient()
    exp_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    search = client.create_run(exp_id, run_name="toy-search", tags={"stage": "search"})
    points = [ToyPoint(f"pt{i}", i) for i in range(N_POINTS)]
    work = functools.partial(toy_point, exp_id, search.info.run_id, args.state, args.step_s)

    def metrics(p) -> None:     # live counts on the search run; an outage must not stop the sweep
        try:
            client.log_batch(search.info.run_id, metrics=[
                __import__("mlflow").entities.Metric(k, v, int(time.time() * 1000), 0)
                for k, v in p.metrics().items()])
        except Exception as exc:  # noqa: BLE001
            print(f"progress metrics not logged ({type(exc).__name__})", file=sys.stderr)
    settings = ExecutorSettings(executor=args.executor, num_cpus=2, cpus_per_point=1, gpus_per_point=0,
                                max_retries=args.max_retries, busy_poll_s=2.0)
    results = make_executor(settings, ClaimSettings(exp_id, heartbeat_s=2.0, stale_after_s=60.0)).run(
        points, work, on_progress=metrics)
    client.set_terminated(search.info.run_id, "FINISHED" if all(r.ok for r in results) else "FAILED")
    import ray
    print(json.dumps({"ray_stopped": not ray.is_initialized(), "results": [
        {"key": r.point.key, "status": r.status, "attempts": r.attempts, "error": r.error,
         "outcome": getattr(r.value, "status", None)} for r in results]}))
    return 0


# ---------------------------------------------------------------------------- fixtures

def _missing() -> str | None:
    if not (PG_BIN / "initdb").exists():
        return f"PostgreSQL binaries not found in {PG_BIN} (apt-get install postgresql, or set PG_BIN)"
    for module, extra in (("ray", "ray"), ("psycopg2", "psycopg2-binary"), ("flask_wtf", "mlflow[auth]")):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install -e .[distributed] brings {extra})"
    if os.geteuid() == 0 and subprocess.run(["id", "postgres"], capture_output=True).returncode:
        return "running as root but there is no 'postgres' OS user to run initdb as"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_marked(marker: str) -> list[int]:
    """SIGKILL every process whose environment carries this test's marker (its Ray instance)."""
    killed = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if f"GQAPRUNE_TEAM_TEST={marker}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(int(proc.name))
        except (OSError, PermissionError):
            pass
    return killed


@dataclass
class Team:
    dir: Path
    url: str
    env: dict           # the script's environment (admin credentials)
    admin: tuple
    worker: tuple
    reader: tuple
    marker: str

    def script(self, *args, stdin: str | None = None, timeout: float = 150) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), *args, "--dir", str(self.dir)], env=self.env,
                              input=stdin, capture_output=True, text=True, timeout=timeout)

    def client_env(self, user: tuple) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(MLFLOW_TRACKING_URI=self.url, MLFLOW_TRACKING_USERNAME=user[0],
                   MLFLOW_TRACKING_PASSWORD=user[1], PYTHONPATH=str(REPO), GQAPRUNE_TEAM_TEST=self.marker,
                   MLFLOW_HTTP_REQUEST_MAX_RETRIES="10", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
                   MLFLOW_HTTP_REQUEST_BACKOFF_JITTER="0.5", RAY_DEDUP_LOGS="0")
        return env


@pytest.fixture(scope="module")
def team():
    reason = _missing()
    if reason:
        pytest.skip(reason)
    # Under /tmp, not pytest's tmp_path: the postgres OS user must be able to reach the data dir.
    base = Path(tempfile.mkdtemp(prefix="gqaprune-team-"))
    base.chmod(0o711)
    pw = lambda: secrets.token_urlsafe(18)  # noqa: E731
    admin, worker, reader = ("admin", pw()), ("worker", pw()), ("reader", pw())
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
           "MLFLOW_TRACKING_USERNAME": admin[0], "MLFLOW_TRACKING_PASSWORD": admin[1],
           "GQAPRUNE_PYTHON": sys.executable}
    port = _free_port()
    t = Team(base / "team", f"http://127.0.0.1:{port}", env, admin, worker, reader, secrets.token_hex(8))
    try:
        started = t.script("start", "--port", str(port), "--pg-port", str(_free_port()), "--workers", "1",
                           "--throwaway")
        assert started.returncode == 0, started.stderr
        for user, grant in ((worker, ["--grant", f"{EXPERIMENT}=EDIT"]), (reader, [])):
            made = t.script("add-user", user[0], *grant, stdin=user[1] + "\n")
            assert made.returncode == 0, made.stderr
        yield t
    finally:
        _kill_marked(t.marker)
        t.script("stop", "--purge", timeout=90)
        pid_file = t.dir / "mlflow.pid"
        if pid_file.exists():     # the script failed half way: never leave a server behind
            subprocess.run(["kill", "-KILL", "--", f"-{pid_file.read_text().strip()}"], capture_output=True)
        pg = base / "team" / "pgdata"
        if (pg / "postmaster.pid").exists():
            subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(pg),
                            "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _rest(url: str, user: tuple | None, path: str, body: dict | None = None) -> int:
    headers = {"Content-Type": "application/json"}
    if user:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()
    req = urllib.request.Request(url + path, headers=headers, method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _wait(cond, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep exited (rc {proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _sweep(team: Team, state: Path, log: Path, executor: str = "ray") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(Path(__file__)), "sweep", "--state", str(state),
                             "--executor", executor],
                            env=team.client_env(team.worker), cwd=str(REPO), stdout=subprocess.PIPE,
                            stderr=log.open("w"), text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, log: Path, timeout: float) -> list[dict]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"sweep timed out; log:\n{log.read_text()[-3000:]}")
    assert proc.returncode == 0, log.read_text()[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["ray_stopped"], "the sweep's local Ray instance was shut down"
    return report["results"]


# ---------------------------------------------------------------------------- the test

@pytest.mark.slow
def test_team_sweep_survives_server_restart_and_a_killed_worker(team, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    assert _rest(team.url, None, "/api/2.0/mlflow/experiments/search?max_results=1") == 401
    assert _rest(team.url, ("admin", "wrong-password-1"), "/api/2.0/mlflow/experiments/search?max_results=1") == 401

    # Sweep 1: kill the server mid-sweep, kill the worker of a running point while it is down.
    proc = _sweep(team, state, tmp_path / "sweep1.log")
    try:
        _wait(lambda: len(list(state.glob("done-*"))) >= 1 and len(list(state.glob("running-*"))) >= 3,
              150, "a finished point and a running one", proc)
        victim = next(p for p in sorted(state.glob("running-*"))
                      if not (state / p.name.replace("running-", "done-")).exists())
        server = int((team.dir / "mlflow.pid").read_text())
        os.killpg(server, signal.SIGKILL)
        os.kill(int(victim.read_text()), signal.SIGKILL)
        time.sleep(1.0)
        restarted = team.script("start")
        assert restarted.returncode == 0, restarted.stderr
        assert int((team.dir / "mlflow.pid").read_text()) != server
        first = _finish(proc, tmp_path / "sweep1.log", 200)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed_key = victim.name.removeprefix("running-")
    assert all(r["status"] == "ok" for r in first), first
    assert {r["key"]: r["attempts"] for r in first}[killed_key] == 2, "the dead worker's point was redone"

    # Sweep 2 (resume, on the local executor: the store decides, not the executor): every point
    # is reused, nothing runs again.
    proc = _sweep(team, state, tmp_path / "sweep2.log", executor="local")
    second = _finish(proc, tmp_path / "sweep2.log", 150)
    assert [(r["status"], r["outcome"]) for r in second] == [("ok", "reused")] * N_POINTS

    # The store, read as the admin.
    os.environ.update(MLFLOW_TRACKING_USERNAME=team.admin[0], MLFLOW_TRACKING_PASSWORD=team.admin[1])
    try:
        from mlflow.tracking import MlflowClient
        client = MlflowClient(team.url)
        exp = client.get_experiment_by_name(EXPERIMENT)
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        children = [r for r in runs if r.data.tags.get("stage") == "prune"]
        finished = {}
        for r in children:
            if r.info.status == "FINISHED":
                finished.setdefault(r.data.tags["search_point"], []).append(r)
        assert sorted(finished) == sorted(f"pt{i}" for i in range(N_POINTS))
        assert all(len(v) == 1 for v in finished.values()), "exactly one FINISHED child per point"
        assert all(set(METRICS) <= set(v[0].data.metrics) for v in finished.values())
        assert all(len(client.get_metric_history(v[0].info.run_id, "loss")) >= 3 for v in finished.values())
        assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"], "no RUNNING run"
        assert any(r.info.status == "FAILED" and r.data.tags.get("failure_reason") == "killed"
                   and r.data.tags["search_point"] == killed_key for r in children), "the orphan was closed"
        from tracking import claims
        state = claims.point_state(claims.list_registries(client, exp.experiment_id), killed_key)
        assert state.latest >= 1, "the dead worker's claim was taken over"
        searches = [r for r in runs if r.data.tags.get("stage") == "search"]
        assert len(searches) == 2 and all(r.data.metrics.get("search/live_completed") == N_POINTS for r in searches)
        secrets_ = {team.admin[1], team.worker[1], team.reader[1]}
        for r in runs:
            values = set(r.data.params.values()) | set(r.data.tags.values())
            assert not values & secrets_, "a password was logged"
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
        os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)

    # A read-only user reads but cannot create runs.
    assert _rest(team.url, team.reader, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=" + EXPERIMENT) == 200
    assert _rest(team.url, team.reader, "/api/2.0/mlflow/runs/create",
                 {"experiment_id": exp.experiment_id}) == 403
    assert _rest(team.url, team.worker, "/api/2.0/mlflow/runs/create",
                 {"experiment_id": exp.experiment_id, "tags": [{"key": "stage", "value": "probe"}]}) == 200


def test_script_refuses_bad_flags_and_loose_credentials(tmp_path):
    bad = subprocess.run(["bash", str(SCRIPT), "start", "--dir", str(tmp_path), "--bogus"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown flag '--bogus'" in bad.stderr
    perm = subprocess.run(["bash", str(SCRIPT), "start", "--dir", str(tmp_path), "--default-permission", "ALL"],
                          capture_output=True, text=True, timeout=30)
    assert perm.returncode == 2 and "--default-permission" in perm.stderr
    creds = tmp_path / "creds"
    creds.write_text("[mlflow]\nmlflow_tracking_username = admin\nmlflow_tracking_password = x\n")
    creds.chmod(0o644)
    loose = subprocess.run(["bash", str(SCRIPT), "start", "--dir", str(tmp_path / "d"), "--credentials", str(creds)],
                           capture_output=True, text=True, timeout=30, env={**os.environ, "GQAPRUNE_PYTHON": sys.executable})
    assert loose.returncode == 2 and "readable by others (chmod 600" in loose.stderr, loose.stderr
    assert not (tmp_path / "d" / "pgdata").exists()       # refused before anything started
    assert "x\n" not in loose.stdout + loose.stderr


if __name__ == "__main__":
    if sys.argv[1:2] == ["sweep"]:
        raise SystemExit(sweep_main(sys.argv[2:]))
    raise SystemExit("usage: python tests/test_team_server.py sweep --state DIR")
