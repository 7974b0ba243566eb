"""Team setup end to end: PostgreSQL + `mlflow server` with basic-auth (scripts/team_server.sh),
the real `python -m prune_entry.search` on the demo model with `--executor ray` (a local Ray
instance, two points at a time) surviving a tracking-server restart and a killed Ray worker, the
sweep resumed with the local executor, `python -m analysis.cross_model` reading the result, and
the access rules (401 without credentials, a read-only user cannot create runs). Every process
started here is stopped.
"""
from __future__ import annotations

import base64
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "team_server.sh"
PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
EXPERIMENT = "team-sweep"
METHODS, RATIOS = ("taylor", "magnitude", "random"), ("0.2", "0.35")
N_PRUNED = len(METHODS) * len(RATIOS)       # + 1 dense eval point


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
        env.update(MLFLOW_TRACKING_URI=self.url, MLFLOW_EXPERIMENT_NAME=EXPERIMENT, MLFLOW_TRACKING_USERNAME=user[0],
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


@pytest.fixture(scope="module")
def sweep_files(tmp_path_factory):
    """The demo model (its architecture, tokenizer and corpus; trained for a few steps only: the
    sweep's behaviour, not its quality, is under test)."""
    from gqaprune import demo
    return demo.ensure_demo_model(seed=0, cache_dir=tmp_path_factory.mktemp("team-demo"), steps=12,
                                  progress=False)


def _search_cmd(model: Path, executor: str) -> list[str]:
    return [sys.executable, "-m", "prune_entry.search", "--models", str(model),
            "--methods", ",".join(METHODS), "--ratios", ",".join(RATIOS), "--executor", executor,
            "--cpus_per_point", "1", "--max_retries", "2", "--eval", "true",
            "--prune_args", "--calibration_dataset demo --taylor_num_samples 4 --taylor_seq_len 32 "
                            "--batch_size 4 --reconstruct none",
            "--eval_args", "--ppl_datasets demo --ppl_seq_len 64 --ppl_nsamples 8 --tasks none --speed false"]


def _sweep(team: Team, files: Path, log: Path, executor: str) -> subprocess.Popen:
    return subprocess.Popen(_search_cmd(files, executor), env=team.client_env(team.worker), cwd=str(REPO),
                            stdout=log.open("w"), stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"sweep timed out; log:\n{log.read_text()[-3000:]}")
    assert proc.returncode == 0, log.read_text()[-3000:]
    return log.read_text()


@contextmanager
def _as(team: Team, user: tuple):
    """This process reads the team store as `user` (MlflowClient takes credentials from the env)."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_USERNAME=user[0], MLFLOW_TRACKING_PASSWORD=user[1])
    try:
        from mlflow.tracking import MlflowClient
        yield MlflowClient(team.url)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _running_child(client, proc: subprocess.Popen):
    """(run, pid) of a prune/eval child RUNNING in a Ray worker once some prune child FINISHED;
    None while not there yet or while the store cannot be read."""
    from tracking import schema
    try:
        exp = client.get_experiment_by_name(EXPERIMENT)
        runs = client.search_runs([exp.experiment_id], max_results=500) if exp else []
    except Exception:  # noqa: BLE001 - the server may be starting
        return None
    kids = [r for r in runs if r.data.tags.get(schema.TAG_STAGE) in (schema.STAGE_PRUNE, schema.STAGE_EVAL)]
    if not any(r.info.status == "FINISHED" and r.data.tags[schema.TAG_STAGE] == schema.STAGE_PRUNE for r in kids):
        return None
    for r in kids:
        pid = r.data.tags.get(schema.TAG_PID)
        if r.info.status == "RUNNING" and pid and int(pid) != proc.pid:
            return r, int(pid)
    return None


# ---------------------------------------------------------------------------- the test

@pytest.mark.slow
def test_team_sweep_survives_server_restart_and_a_killed_worker(team, sweep_files, tmp_path):
    from tracking import claims, schema
    assert _rest(team.url, None, "/api/2.0/mlflow/experiments/search?max_results=1") == 401
    assert _rest(team.url, ("admin", "wrong-password-1"), "/api/2.0/mlflow/experiments/search?max_results=1") == 401

    # Sweep 1 on Ray: once a point has finished and another runs in a worker, kill the tracking
    # server and that worker (SIGKILL: nothing closes its runs), then bring the server back.
    log1 = tmp_path / "sweep1.log"
    proc = _sweep(team, sweep_files, log1, "ray")
    try:
        with _as(team, team.admin) as client:
            found = []
            _wait(lambda: found.append(_running_child(client, proc)) or found[-1], 400,
                  "a finished point and one running in a worker", proc)
            victim, pid = found[-1]
            server = int((team.dir / "mlflow.pid").read_text())
            os.killpg(server, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
            time.sleep(1.0)
            restarted = team.script("start")
            assert restarted.returncode == 0, restarted.stderr
            assert int((team.dir / "mlflow.pid").read_text()) != server
        out1 = _finish(proc, log1, 600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "after 2 attempts" in out1, out1[-3000:]          # the dead worker's point was redone
    assert "FAILED" not in out1, out1[-3000:]

    # Sweep 2, resumed with the local executor (where a point ran is not in its key): every
    # point is found FINISHED in the store and reused.
    log2 = tmp_path / "sweep2.log"
    out2 = _finish(_sweep(team, sweep_files, log2, "local"), log2, 300)
    assert out2.count("(reused prune+eval)") == N_PRUNED and out2.count("(reused eval)") == 1, out2[-3000:]

    with _as(team, team.admin) as client:
        exp = client.get_experiment_by_name(EXPERIMENT)
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        stage = lambda r: r.data.tags.get(schema.TAG_STAGE)  # noqa: E731
        finished = {}
        for r in runs:
            if stage(r) in (schema.STAGE_PRUNE, schema.STAGE_EVAL) and r.info.status == "FINISHED":
                finished.setdefault((stage(r), r.data.tags[schema.TAG_SEARCH_POINT]), []).append(r)
        prunes = [v for (st, _), v in finished.items() if st == schema.STAGE_PRUNE]
        evals = [v for (st, _), v in finished.items() if st == schema.STAGE_EVAL]
        assert len(prunes) == N_PRUNED and len(evals) == N_PRUNED + 1
        assert all(len(v) == 1 for v in finished.values()), "exactly one FINISHED child per point and stage"
        assert all(schema.M_ACHIEVED_RATIO in v[0].data.metrics for v in prunes)
        assert all(schema.ppl_metric("demo") in v[0].data.metrics for v in evals)
        assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"], "no RUNNING run"
        key = victim.data.tags[schema.TAG_SEARCH_POINT]
        closed = client.get_run(victim.info.run_id)
        assert closed.info.status == "FAILED" and closed.data.tags[schema.TAG_FAILURE] == schema.REASON_KILLED
        assert claims.point_state(claims.list_registries(client, exp.experiment_id), key).latest >= 1, \
            "the dead worker's claim was taken over"
        searches = [r for r in runs if stage(r) == schema.STAGE_SEARCH]
        assert len(searches) == 2 and all(r.info.status == "FINISHED" for r in searches)
        assert all(r.data.metrics.get("search/live_completed") == N_PRUNED + 1 for r in searches)
        secrets_ = {team.admin[1], team.worker[1], team.reader[1]}
        for r in runs:
            values = set(r.data.params.values()) | set(r.data.tags.values())
            assert not values & secrets_, "a password was logged"

    # The read-only user runs the cross-model analysis on the team store.
    report = tmp_path / "report"
    analysed = subprocess.run([sys.executable, "-m", "analysis.cross_model", "--experiments", EXPERIMENT,
                               "--output_dir", str(report)], env=team.client_env(team.reader), cwd=str(REPO),
                              capture_output=True, text=True, timeout=300)
    assert analysed.returncode == 0, analysed.stderr[-3000:]
    assert any(report.iterdir()), "the analysis wrote its reports"
    assert team.reader[1] not in analysed.stdout + analysed.stderr

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
