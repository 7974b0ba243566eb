"""Real processes against a SQLite store: killed entry points leave no RUNNING run, concurrent first
use of a fresh store and parallel writers lose nothing, a killed sweep's children are closed by
the next sweep, and `mlflow run` stopped by Ctrl-C ends KILLED in the named experiment."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from prune_entry import prune, search
from tracking import runs, schema
from tracking import schema as names

REPO = Path(__file__).resolve().parents[1]
SLOW_PRUNE = ["--taylor_num_samples", "4000", "--taylor_seq_len", "32", "--reconstruct", "none"]
FAST_PRUNE = ["--taylor_num_samples", "4", "--taylor_seq_len", "16", "--reconstruct", "none"]


def child_env(**extra) -> dict:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return env


def spawn(args, log: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=REPO, env=kw.pop("env", None) or child_env(), stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, **kw)


def experiment_runs(name=None, client=None):
    client = client or MlflowClient()
    exp = client.get_experiment_by_name(name or os.environ["MLFLOW_EXPERIMENT_NAME"])
    return client.search_runs([exp.experiment_id]) if exp else []


def wait_for_run(pid: int, stage: str, proc: subprocess.Popen, log: Path, timeout: float = 180):
    """The RUNNING run of ``stage`` opened by process ``pid`` (polled in the store)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        for run in experiment_runs():
            if run.info.status == "RUNNING" and run.data.tags.get(names.TAG_PID) == str(pid) \
                    and run.data.tags.get(schema.TAG_STAGE) == stage:
                return run
        time.sleep(0.2)
    raise AssertionError(f"no RUNNING {stage} run of process {pid}: {log.read_text()[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_a_killed_prune_leaves_no_running_run(tracking_store, saved_tiny_model, text_file, tmp_path, sig):
    model = saved_tiny_model("llama", 8, 2)
    log = tmp_path / "prune.log"
    proc = spawn([sys.executable, "-m", "prune_entry.prune", "--model", str(model), "--calibration_dataset",
                  str(text_file), *SLOW_PRUNE, "--save_model", "false"], log)
    try:
        run = wait_for_run(proc.pid, schema.STAGE_PRUNE, proc, log)
        time.sleep(0.5)                                            # inside the scoring loop
        proc.send_signal(getattr(signal, sig))
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    client = MlflowClient()
    after = client.get_run(run.info.run_id)
    if sig == "SIGKILL":
        assert code == -signal.SIGKILL and after.info.status == "RUNNING"      # nobody could close it
        assert prune.main(["--model", str(model), "--calibration_dataset", str(text_file), *FAST_PRUNE,
                           "--save_model", "false"]) == 0                     # the next entry point
        after = client.get_run(run.info.run_id)
        assert after.info.status == "FAILED" and after.data.tags[schema.TAG_FAILURE] == names.REASON_KILLED
        assert f"process {proc.pid} on " in after.data.tags[names.TAG_CLOSED_BY]
    else:
        assert code == 128 + getattr(signal, sig), log.read_text()[-2000:]
        assert after.info.status == "KILLED" and after.data.tags[schema.TAG_FAILURE] == f"killed by {sig}"
        assert f"stopped: killed by {sig}" in log.read_text()
    assert not [r for r in experiment_runs() if r.info.status == "RUNNING"]


BARRIER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from {module} import {name} as target
    me, other = Path(sys.argv[1]), Path(sys.argv[2])
    me.touch()
    deadline = time.monotonic() + 120
    while not other.exists() and time.monotonic() < deadline:   # both imported: go together
        time.sleep(0.001)
    raise SystemExit(target(sys.argv[3:]))
""")


def run_together(tmp_path: Path, module: str, name: str, argvs: list[list[str]], env: dict) -> list[int]:
    """Start one process per argv; they call ``module.name(argv)`` at the same instant."""
    script = tmp_path / "together.py"
    script.write_text(BARRIER.format(module=module, name=name))
    procs = []
    for i, argv in enumerate(argvs):
        me, other = tmp_path / f"ready{i}", tmp_path / f"ready{1 - i}"
        procs.append(spawn([sys.executable, str(script), str(me), str(other), *argv], tmp_path / f"p{i}.log",
                           env=env))
    codes = [p.wait(timeout=300) for p in procs]
    return codes


@pytest.mark.slow
def test_two_entry_points_on_a_store_that_does_not_exist_yet(saved_tiny_model, text_file, tmp_path):
    db = tmp_path / "fresh" / "mlflow.db"
    assert not db.exists()
    env = child_env(MLFLOW_TRACKING_URI=f"sqlite:///{db}", MLFLOW_EXPERIMENT_NAME="race")
    env.pop("MLFLOW_RUN_ID", None)
    model = saved_tiny_model("llama", 8, 2)
    argv = ["--model", str(model), "--calibration_dataset", str(text_file), *FAST_PRUNE, "--save_model", "false"]
    codes = run_together(tmp_path, "prune_entry.prune", "main", [argv, argv], env)
    logs = [(tmp_path / f"p{i}.log").read_text()[-2000:] for i in range(2)]
    assert codes == [0, 0], logs
    client = MlflowClient(f"sqlite:///{db}")
    assert [e.name for e in client.search_experiments()].count("race") == 1
    (done_a, done_b) = experiment_runs("race", client)
    assert done_a.info.status == done_b.info.status == "FINISHED"
    assert set(done_a.data.metrics) == set(done_b.data.metrics)
    assert {schema.M_ACHIEVED_RATIO, schema.M_PARAMS_AFTER} <= set(done_a.data.metrics)


WRITER = textwrap.dedent("""
    from tracking import runs

    def main(argv):
        n = int(argv[0])
        with runs.tracked_run("writer", tags={"writer": argv[1]}):
            for i in range(n):
                runs.log_metrics({"a": i, "b": 2 * i}, step=i)
                if i % 10 == 0:
                    runs.set_tags({"progress": i})
                    runs.log_params({f"p{i}": i})
        return 0
""")


@pytest.mark.slow
def test_two_parallel_sqlite_writers_both_finish_with_all_their_metrics(tracking_store, tmp_path):
    (tmp_path / "writer_mod.py").write_text(WRITER)
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    n = 150
    assert run_together(tmp_path, "writer_mod", "main", [[str(n), "x"], [str(n), "y"]], env) == [0, 0]
    client = MlflowClient()
    found = experiment_runs()
    assert sorted(r.data.tags["writer"] for r in found) == ["x", "y"]
    for run in found:
        assert run.info.status == "FINISHED"
        for key, factor in (("a", 1), ("b", 2)):
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted((m.step, m.value) for m in history) == [(i, factor * i) for i in range(n)]
        assert len(run.data.params) == n // 10


@pytest.mark.slow
def test_the_next_sweep_closes_the_children_of_a_killed_sweep(tracking_store, saved_tiny_model, text_file,
                                                              tmp_path):
    model = saved_tiny_model("llama", 8, 2)
    log = tmp_path / "search.log"
    slow = " ".join(["--calibration_dataset", str(text_file), *SLOW_PRUNE])
    proc = spawn([sys.executable, "-m", "prune_entry.search", "--models", str(model), "--methods", "taylor",
                  "--ratios", "0.2", "--prune_args", slow, "--eval", "false"], log)
    try:
        child = wait_for_run(proc.pid, schema.STAGE_PRUNE, proc, log)
        proc.kill()                                                  # SIGKILL: nothing can close them
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_search = child.data.tags[schema.TAG_SEARCH_RUN]
    fast = " ".join(["--calibration_dataset", str(text_file), *FAST_PRUNE])
    assert search.main(["--models", str(model), "--methods", "magnitude", "--ratios", "0.2",
                        "--prune_args", fast, "--eval", "false"]) == 0
    client = MlflowClient()
    for run_id in (killed_search, child.info.run_id):
        run = client.get_run(run_id)
        assert run.info.status == "FAILED" and run.data.tags[schema.TAG_FAILURE] == names.REASON_KILLED
    assert not [r for r in experiment_runs() if r.info.status == "RUNNING"]
    finished = [r for r in experiment_runs() if r.info.status == "FINISHED"
                and r.data.tags.get(schema.TAG_STAGE) == schema.STAGE_PRUNE]
    assert len(finished) == 1 and finished[0].data.tags[schema.TAG_METHOD] == "magnitude"


@pytest.mark.slow
def test_ctrl_c_under_mlflow_run_ends_killed_in_the_named_experiment(tracking_store, saved_tiny_model,
                                                                     text_file, tmp_path):
    """`mlflow run` in MLflow's Default experiment: the results go to the named experiment; Ctrl-C
    (SIGINT to the terminal's process group) ends both runs KILLED, although `mlflow run` marks
    its own run FAILED after the worker exits (repaired by a helper once the launcher is gone)."""
    model = saved_tiny_model("llama", 8, 2)
    runs.use_store()   # the store exists before the launcher (MLflow's own schema set-up takes no lock)
    env = child_env()
    env.pop("MLFLOW_EXPERIMENT_NAME")            # the launcher puts its run in Default ...
    env.pop("MLFLOW_EXPERIMENT_ID", None)        # (mlflow.set_experiment in this process sets it)
    log = tmp_path / "mlflow_run.log"
    params = [f"model={model}", f"calibration_dataset={text_file}", "taylor_num_samples=4000",
              "taylor_seq_len=32", "reconstruct=none"]
    proc = spawn([sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "prune", "--env-manager", "local",
                  *[a for p in params for a in ("-P", p)]], log, env=env, start_new_session=True)
    client = MlflowClient()
    try:
        deadline, worker_run = time.monotonic() + 180, None
        while worker_run is None and time.monotonic() < deadline:   # ... the worker in 'gqaprune'
            assert proc.poll() is None, log.read_text()[-3000:]
            for run in experiment_runs(schema.DEFAULT_EXPERIMENT, client):
                if run.info.status == "RUNNING" and run.data.tags.get(names.TAG_LAUNCHER_RUN) \
                        and run.data.tags.get(names.TAG_PID):
                    launcher = client.get_run(run.data.tags[names.TAG_LAUNCHER_RUN])
                    if launcher.data.params.get("model") == str(model):
                        worker_run = run
            time.sleep(0.2)
        assert worker_run is not None, log.read_text()[-3000:]
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)                           # Ctrl-C in the terminal
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stub_id = worker_run.data.tags[names.TAG_LAUNCHER_RUN]
    deadline = time.monotonic() + 30                                 # the repair helper's turn
    while client.get_run(stub_id).info.status != "KILLED" and time.monotonic() < deadline:
        time.sleep(0.2)
    for run_id in (worker_run.info.run_id, stub_id):
        run = client.get_run(run_id)
        assert (run.info.status, run.data.tags.get(schema.TAG_FAILURE)) == ("KILLED", "killed by SIGINT")
    stub = client.get_run(stub_id)
    assert stub.info.experiment_id == names.MLFLOW_DEFAULT_EXPERIMENT_ID
    assert stub.data.tags[names.TAG_MOVED_TO] == worker_run.info.run_id
    assert client.get_run(worker_run.info.run_id).data.params["taylor_num_samples"] == "4000"  # -P values
