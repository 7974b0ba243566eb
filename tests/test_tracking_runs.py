"""tracking.runs against a temporary store: every run closes, dead runs are found and closed,
both launchers land in one experiment, logging helpers keep their artifact names, secrets stay out."""
import json
import os
import signal
import time

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from gqaprune.errors import UserError
from tracking import liveness, runs, schema
from tracking import schema as names

from test_tracking_liveness import dead_process, linux_only


def experiment_id() -> str:
    return MlflowClient().get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"]).experiment_id


def all_runs(exp_id=None):
    return MlflowClient().search_runs([exp_id or experiment_id()], order_by=["attributes.start_time ASC"])


def test_a_run_carries_its_process(tracking_store):
    with runs.tracked_run("prune") as r:
        tags = MlflowClient().get_run(r.info.run_id).data.tags
    me = liveness.current()
    assert tags[names.TAG_PID] == str(os.getpid()) and tags[names.TAG_HOST] == me.host
    assert tags[names.TAG_PID_START] == me.start and tags[names.TAG_MACHINE] == me.machine
    assert abs(int(tags[names.TAG_HEARTBEAT]) - time.time()) < 60


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_in_a_child_closes_the_child_and_its_parent_killed(tracking_store, sig):
    with pytest.raises(liveness.Stopped):
        with runs.tracked_run("search"):
            with runs.tracked_run("prune", nested=True):
                os.kill(os.getpid(), sig)
                time.sleep(5)
    parent, child = all_runs()
    reason = f"killed by {signal.Signals(sig).name}"
    for r in (parent, child):
        assert r.info.status == "KILLED" and r.data.tags[schema.TAG_FAILURE] == reason
    assert child.data.tags[schema.TAG_PARENT_RUN] == parent.info.run_id
    assert mlflow.active_run() is None


def test_entry_point_exits_128_plus_the_signal(tracking_store, capsys):
    def body(_):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert runs.entry_point("prune", lambda: None, body) == 128 + signal.SIGTERM
    assert "killed by SIGTERM" in capsys.readouterr().err
    (run,) = all_runs()
    assert run.info.status == "KILLED"


def test_failure_reasons_are_redacted(tracking_store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "Hunter2Secret")
    with pytest.raises(UserError):
        with runs.tracked_run("eval"):
            raise UserError("could not fetch from http://alice:pw0rd@10.1.1.1:5000 (Hunter2Secret)", "fix it")
    (run,) = all_runs()
    reason = run.data.tags[schema.TAG_FAILURE]
    assert run.info.status == "FAILED"
    assert reason == "could not fetch from http://***@10.1.1.1:5000 (***); fix it"


def _open_run_of(process: liveness.ProcessId, exp_id: str, stage="prune", heartbeat=None, **extra):
    """A RUNNING run as the given process would have left it."""
    tags = {schema.TAG_STAGE: stage, **liveness.identity_tags(process), **extra}
    if heartbeat is not None:
        tags[names.TAG_HEARTBEAT] = str(int(heartbeat))
    return MlflowClient().create_run(exp_id, tags=tags)


@linux_only
def test_close_stale_runs(tracking_store):
    exp = runs.setup()
    me = liveness.current()
    dead = _open_run_of(dead_process(), exp)
    alive = _open_run_of(me, exp)                                                  # this process
    remote_fresh = _open_run_of(liveness.ProcessId("node7", 1, "1", "b:p"), exp, heartbeat=time.time())
    remote_stale = _open_run_of(liveness.ProcessId("node7", 2, "1", "b:p"), exp, heartbeat=time.time() - 3600)
    foreign = MlflowClient().create_run(exp)                                       # not ours: no tags
    # mlflow run marked its run FAILED when the worker died, without a reason
    orphan = _open_run_of(dead_process(), exp)
    MlflowClient().set_terminated(orphan.info.run_id, "FAILED")
    # a run we closed KILLED that mlflow run then turned FAILED
    flipped = _open_run_of(me, exp, **{schema.TAG_FAILURE: "killed by SIGINT"})
    MlflowClient().set_terminated(flipped.info.run_id, "FAILED")

    closed = runs.close_stale_runs(exp)
    assert set(closed) == {dead.info.run_id, remote_stale.info.run_id, orphan.info.run_id}
    get = MlflowClient().get_run
    for r in (dead, remote_stale, orphan):
        run = get(r.info.run_id)
        assert run.info.status == "FAILED" and run.data.tags[schema.TAG_FAILURE] == names.REASON_KILLED
        assert "closed by process" in run.data.tags[names.TAG_CLOSED_BY]
    assert "is gone" in get(dead.info.run_id).data.tags[names.TAG_CLOSED_BY]
    assert "no heartbeat" in get(remote_stale.info.run_id).data.tags[names.TAG_CLOSED_BY]
    # a dead run ends at its last heartbeat, not when it was found
    stale = get(remote_stale.info.run_id)
    assert stale.info.end_time == int(stale.data.tags[names.TAG_HEARTBEAT]) * 1000
    for r in (alive, remote_fresh, foreign):
        assert get(r.info.run_id).info.status == "RUNNING"
    assert get(flipped.info.run_id).info.status == "KILLED"
    assert runs.close_stale_runs(exp) == []                                        # idempotent


@linux_only
def test_the_next_run_in_the_experiment_closes_a_dead_one(tracking_store):
    exp = runs.setup()
    dead = _open_run_of(dead_process(), exp, stage="search")
    child = _open_run_of(dead_process(), exp, **{schema.TAG_PARENT_RUN: dead.info.run_id})
    with runs.tracked_run("search"):
        pass
    get = MlflowClient().get_run
    assert [get(r.info.run_id).info.status for r in (dead, child)] == ["FAILED", "FAILED"]
    assert not [r for r in all_runs() if r.info.status == "RUNNING"]


@linux_only
def test_close_if_dead(tracking_store):
    exp = runs.setup()
    dead, alive = _open_run_of(dead_process(), exp), _open_run_of(liveness.current(), exp)
    assert runs.close_if_dead(dead.info.run_id) is True
    assert runs.close_if_dead(dead.info.run_id) is False                           # already closed
    assert runs.close_if_dead(alive.info.run_id) is False


def test_a_reopened_heartbeat_revives_a_run_taken_for_dead(tracking_store):
    with runs.tracked_run("prune") as r:
        run_id = r.info.run_id
        client = MlflowClient()
        client.set_tag(run_id, schema.TAG_FAILURE, names.REASON_KILLED)           # as a sweeper would
        client.set_tag(run_id, names.TAG_CLOSED_BY, "no heartbeat for 400 s")
        client.set_terminated(run_id, "FAILED")
        runs._beat(run_id)
        run = client.get_run(run_id)
        assert run.info.status == "RUNNING" and schema.TAG_FAILURE not in run.data.tags
        assert run.data.tags[names.TAG_CLOSED_BY].startswith("reopened")
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"


# ---- one experiment whichever launcher -----------------------------------------------------

@pytest.fixture
def launcher(tracking_store, monkeypatch):
    """A run as `mlflow run` creates it before starting our worker (MLFLOW_RUN_ID in the env)."""
    monkeypatch.setattr(liveness, "die_with_parent", lambda: None)  # keep the test process's PDEATHSIG

    def make(experiment_id: str):
        run = MlflowClient().create_run(experiment_id, tags={"mlflow.project.entryPoint": "search",
                                                             "mlflow.source.name": "file:///x/gqaprune",
                                                             "mlflow.source.git.repoURL":
                                                                 "https://bob:ghp_t0ken@github.com/x/y"})
        MlflowClient().log_param(run.info.run_id, "models", "demo")              # a -P value
        monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
        monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
        return run
    return make


def test_mlflow_run_in_default_lands_in_the_named_experiment(launcher):
    runs.use_store()
    stub = launcher(names.MLFLOW_DEFAULT_EXPERIMENT_ID)
    with pytest.raises(UserError):
        with runs.tracked_run("search") as r:
            runs.log_params({"models": "demo,normalised", "methods": "taylor"})
            raise UserError("all points failed", "see the summary")
    (run,) = all_runs()
    assert run.info.run_id == r.info.run_id != stub.info.run_id
    assert run.info.status == "FAILED" and run.data.tags[schema.TAG_FAILURE] == "all points failed; see the summary"
    assert run.data.tags[names.TAG_LAUNCHER_RUN] == stub.info.run_id
    assert run.data.tags["mlflow.project.entryPoint"] == "search"
    assert run.data.tags["mlflow.source.git.repoURL"] == "https://***@github.com/x/y"
    assert run.data.params == {"models": "demo", "methods": "taylor"}            # the typed -P value wins
    moved = MlflowClient().get_run(stub.info.run_id)
    assert moved.info.status == "FAILED" and moved.data.tags[schema.TAG_FAILURE] == "all points failed; see the summary"
    assert moved.data.tags[names.TAG_MOVED_TO] == run.info.run_id
    assert moved.data.tags[names.TAG_MOVED_TO_EXPERIMENT] == os.environ["MLFLOW_EXPERIMENT_NAME"]
    assert run.info.run_id in moved.data.tags[names.TAG_NOTE]
    assert moved.data.tags["mlflow.source.git.repoURL"] == "https://***@github.com/x/y"
    assert "MLFLOW_RUN_ID" not in os.environ


def test_mlflow_run_in_a_named_experiment_logs_to_its_own_run(launcher):
    exp = runs.setup()
    own = launcher(exp)
    with runs.tracked_run("search") as r:
        pass
    assert r.info.run_id == own.info.run_id
    (run,) = all_runs()
    assert run.info.status == "FINISHED" and names.TAG_LAUNCHER_RUN not in run.data.tags


def test_experiment_name_resolution(monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team-a")
    assert runs.experiment_name("gqaprune-analysis") == "gqaprune-analysis"
    assert runs.experiment_name() == "team-a"
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "0")
    assert runs.experiment_name() == schema.DEFAULT_EXPERIMENT


def test_a_deleted_experiment_is_a_user_error(tracking_store):
    exp = runs.setup()
    MlflowClient().delete_experiment(exp)
    with pytest.raises(UserError, match="is deleted.*mlflow experiments restore"):
        runs.setup()


# ---- logging helpers ---------------------------------------------------------------------

def test_logging_helpers_write_the_same_names_and_values(tracking_store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "Hunter2Secret")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    from gqaprune.plots import plt
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    ax.set_title("a line")
    with runs.tracked_run("prune") as r:
        runs.log_params({"a": 1, "b": None, "uri": "http://u:p@h:1"})
        runs.log_params({"a": 2})                                                 # kept as first logged
        runs.log_metrics({"ppl/wiki text": 3.5, "skip": None}, step=2)
        runs.set_tags({"method": "taylor", "note": "Hunter2Secret"})
        runs.log_json({"x": [1, 2]}, "plan.json")
        runs.log_text("hello", "sub/dir/notes.txt")
        runs.log_table(pd.DataFrame({"c": [1, 2]}), "table.csv")
        runs.log_figure(fig, "fig.png")
        runs.log_dir(model_dir, "pruned_model")
        runs.log_file(model_dir / "config.json", "extra")
    run = MlflowClient().get_run(r.info.run_id)
    assert {k: run.data.params[k] for k in ("a", "b", "uri")} == {"a": "1", "b": "none", "uri": "http://***@h:1"}
    assert run.data.metrics == {"ppl/wiki text": 3.5}
    (m,) = MlflowClient().get_metric_history(r.info.run_id, "ppl/wiki text")
    assert m.step == 2
    assert run.data.tags["method"] == "taylor" and run.data.tags["note"] == "***"
    local = mlflow.artifacts.download_artifacts(run_id=r.info.run_id)
    files = sorted(str(p.relative_to(local)) for p in __import__("pathlib").Path(local).rglob("*") if p.is_file())
    assert files == ["extra/config.json", "fig.png", "plan.json", "pruned_model/config.json",
                     "sub/dir/notes.txt", "table.csv"]
    assert json.loads(open(f"{local}/plan.json").read()) == {"x": [1, 2]}
    assert open(f"{local}/sub/dir/notes.txt").read() == "hello"
    assert pd.read_csv(f"{local}/table.csv")["c"].tolist() == [1, 2]
