"""Against a real `mlflow server` on loopback: credentials never reach the store or the console,
an outage mid-run loses nothing; and an unreachable server fails a run in seconds."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from prune_entry import evaluate, prune
from tracking import connect, runs, schema, spool

URI_PASSWORD = "S3cretPw0rd"
ENV_PASSWORD = "Hunter2SecretValue"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` (SQLite backend, proxied artifacts) in its own process group."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None
        self.db, self.artifacts = root / "server.db", root / "artifacts"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> None:
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        env.pop("MLFLOW_TRACKING_URI", None)
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.db}",
             "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"], env=env, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def _server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("server"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def server(_server, tmp_path, monkeypatch):
    """A running server (one per module); the client env points at it with credentials in the URI
    and the env, and a fresh experiment."""
    srv = _server
    if srv.proc is None:
        srv.start()
    uri = f"http://alice:{URI_PASSWORD}@127.0.0.1:{srv.port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ENV_PASSWORD)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"server-test-{tmp_path.name}")
    monkeypatch.setenv("GQAPRUNE_SPOOL", str(tmp_path / "spool"))
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                        ("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")):
        monkeypatch.setenv(name, value)   # what connect sets; restored after the test
    import mlflow
    mlflow.set_tracking_uri(uri)
    yield srv
    while mlflow.active_run():
        mlflow.end_run()
    connect.forget()


def prune_args(model, text_file, *extra):
    return ["--model", str(model), "--calibration_dataset", str(text_file), "--taylor_num_samples", "4",
            "--taylor_seq_len", "16", "--reconstruct", "none", *extra]


@pytest.mark.slow
def test_credentials_never_reach_the_store_or_the_console(server, saved_tiny_model, text_file, capsys,
                                                          caplog, tmp_path):
    model = saved_tiny_model("llama", 8, 2)
    assert prune.main(prune_args(model, text_file)) == 0                    # logs a model dir too
    assert evaluate.main(["--model_uri", "0" * 32]) == 2                    # names the store in its error
    with pytest.raises(RuntimeError):
        with runs.tracked_run("eval"):
            runs.log_params({"source": os.environ["MLFLOW_TRACKING_URI"]})
            raise RuntimeError(f"lost {os.environ['MLFLOW_TRACKING_URI']} ({ENV_PASSWORD})")
    out = capsys.readouterr()
    client = MlflowClient()
    exp = client.get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"])
    statuses = sorted(r.info.status for r in client.search_runs([exp.experiment_id]))
    assert statuses == ["FAILED", "FAILED", "FINISHED"]
    failed = [r for r in client.search_runs([exp.experiment_id]) if r.info.status == "FAILED"]
    assert all("http://***@127.0.0.1" in r.data.tags[schema.TAG_FAILURE] for r in failed)
    assert f"http://***@127.0.0.1:{server.port}" in out.out                 # where_to_look, redacted
    server.stop()                                                           # flush the DB file
    texts = {"stdout": out.out.encode(), "stderr": out.err.encode(),
             "log": "\n".join(r.getMessage() for r in caplog.records).encode()}
    for path in [server.db, *server.artifacts.rglob("*"), *(tmp_path / "spool").rglob("*")]:  # whole store
        if path.is_file():
            texts[str(path)] = path.read_bytes()
    assert len([p for p in texts if "artifacts" in p]) >= 5                 # the model dir was grepped
    for secret in (URI_PASSWORD, ENV_PASSWORD):
        leaks = [where for where, data in texts.items() if secret.encode() in data]
        assert leaks == [], f"{secret} found in {leaks}"


@pytest.mark.slow
def test_a_server_outage_mid_run_loses_nothing(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GQAPRUNE_STORE_RETRY_S", "1")
    model = tmp_path / "pruned"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    with runs.tracked_run("prune") as r:
        run_id = r.info.run_id
        runs.log_metrics({"loss": 1.0}, step=0)
        server.stop()
        t0 = time.monotonic()
        runs.log_metrics({"loss": 0.5}, step=1)
        runs.log_dir(model, schema.A_PRUNED_MODEL)
        runs.log_json({"ratio": 0.2}, "metrics.json")
        assert time.monotonic() - t0 < 30                                   # bounded, then spooled
    uri = runs.tracking_uri()
    assert [op.kind for op in spool.pending(uri, run_id)] == ["metrics", "artifact", "artifact", "terminate"]
    assert str(spool.store_dir(uri)) in capsys.readouterr().err
    server.start()
    assert spool.replay_all(uri).failed == {}
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss")) == [(0, 1.0), (1, 0.5)]
    paths = {a.path for a in client.list_artifacts(run_id)}
    assert {schema.A_PRUNED_MODEL, "metrics.json"} <= paths


def test_an_unreachable_server_fails_the_run_in_seconds(monkeypatch, capsys, saved_tiny_model, text_file):
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://bob:{URI_PASSWORD}@127.0.0.1:{port}")
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                 "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"):
        monkeypatch.setenv(name, os.environ.get(name, "2" if "RETRIES" in name else "1"))
    t0 = time.monotonic()
    assert prune.main(prune_args(saved_tiny_model("llama", 8, 2), text_file)) == 2
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert elapsed < 10, elapsed
    assert f"the tracking server http://***@127.0.0.1:{port} is not reachable" in err
    assert URI_PASSWORD not in err
    connect.forget()
