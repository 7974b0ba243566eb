"""When the store does not take a logging call in time, the call waits in the local spool (in
order, files linked) and is uploaded when the store answers; nothing computed is lost."""
import os

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tracking import runs, schema, spool
from tracking import schema as names


@pytest.fixture
def outage(tracking_store, tmp_path, monkeypatch):
    """A switchable store outage: while on, every store write fails like a locked SQLite file."""
    monkeypatch.setenv("GQAPRUNE_SPOOL", str(tmp_path / "spool"))
    monkeypatch.setenv("GQAPRUNE_STORE_RETRY_S", "0.2")
    monkeypatch.setattr(runs, "REPLAY_EVERY_S", 0.0)
    real, state = spool.apply, {"down": False, "refused": 0}

    def apply(client, run_id, op):
        if state["down"]:
            state["refused"] += 1
            raise MlflowException("(sqlite3.OperationalError) database is locked",
                                  error_code="TEMPORARILY_UNAVAILABLE")
        return real(client, run_id, op)
    monkeypatch.setattr(spool, "apply", apply)
    return state


def test_an_outage_mid_run_is_spooled_in_order_and_uploaded(outage, tmp_path, capsys):
    model = tmp_path / "pruned"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\0" * 1024)
    with runs.tracked_run("prune") as r:
        run_id = r.info.run_id
        runs.log_metrics({"loss": 1.0}, step=0)
        outage["down"] = True
        runs.log_metrics({"loss": 0.5}, step=1)          # retried for 0.2 s, then spooled
        runs.log_dir(model, schema.A_PRUNED_MODEL)        # queued behind it
        runs.set_tags({"method": "taylor"})
    uri = runs.tracking_uri()
    waiting = spool.pending(uri, run_id)
    assert [op.kind for op in waiting] == ["metrics", "artifact", "tags", "terminate"]
    assert waiting[-1].data == {"status": "FINISHED"}
    linked = waiting[1].local_path
    assert os.path.samefile(os.path.join(linked, "model.safetensors"), model / "model.safetensors")  # no copy
    err = capsys.readouterr().err
    assert "nothing is lost" in err and str(spool.run_dir(uri, run_id)) in err
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"     # the store has not heard yet

    outage["down"] = False
    report = spool.replay_all(uri)
    assert report.uploaded == {run_id: 4} and report.failed == {}
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["method"] == "taylor"
    history = MlflowClient().get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5)]
    assert history[1].timestamp == waiting[0].timestamp_ms              # logged when computed
    local = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/{schema.A_PRUNED_MODEL}")
    assert open(os.path.join(local, "model.safetensors"), "rb").read() == b"\0" * 1024
    assert not spool.run_dir(uri, run_id).exists()


def test_the_same_process_uploads_the_spool_when_the_store_returns(outage):
    with runs.tracked_run("finetune") as r:
        outage["down"] = True
        runs.log_metrics({"train_loss": 2.0}, step=1)
        outage["down"] = False
        runs.log_metrics({"train_loss": 1.5}, step=2)    # replays step 1 first, then logs step 2
    uri = runs.tracking_uri()
    assert not spool.has_pending(uri, r.info.run_id)
    history = MlflowClient().get_metric_history(r.info.run_id, "train_loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 2.0), (2, 1.5)]
    assert MlflowClient().get_run(r.info.run_id).info.status == "FINISHED"


def test_the_next_entry_point_uploads_what_an_earlier_process_spooled(outage):
    with runs.tracked_run("eval") as first:
        outage["down"] = True
        runs.log_metrics({"ppl/x": 7.0})
    outage["down"] = False
    with runs.tracked_run("eval"):                       # its start uploads the spool
        pass
    run = MlflowClient().get_run(first.info.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"ppl/x": 7.0}


def test_a_run_taken_for_dead_meanwhile_gets_its_real_status(outage):
    with runs.tracked_run("prune") as r:
        outage["down"] = True
        runs.log_metrics({"a": 1.0})
    run_id = r.info.run_id
    client = MlflowClient()   # a sweeper saw no heartbeat and closed it
    client.set_tag(run_id, schema.TAG_FAILURE, names.REASON_KILLED)
    client.set_tag(run_id, names.TAG_CLOSED_BY, "no heartbeat for 900 s")
    client.set_terminated(run_id, "FAILED")
    outage["down"] = False
    spool.replay_all(runs.tracking_uri())
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and schema.TAG_FAILURE not in run.data.tags


def test_a_partial_replay_resumes_after_what_was_uploaded(outage):
    with runs.tracked_run("prune") as r:
        outage["down"] = True
        runs.log_metrics({"a": 1.0}, step=1)
        runs.log_metrics({"a": 2.0}, step=2)
    uri, run_id = runs.tracking_uri(), r.info.run_id
    real = spool.apply
    calls = []

    def second_fails(client, rid, op):
        calls.append(op.kind)
        outage["down"] = len(calls) == 2
        return real(client, rid, op)
    spool.apply = second_fails
    try:
        assert spool.replay_all(uri).failed                    # op 1 in, op 2 refused
        assert [op.step for op in spool.pending(uri, run_id)][:1] == [2]
        outage["down"] = False
        assert spool.replay_all(uri).uploaded == {run_id: 2}   # step 2 + terminate, step 1 not again
    finally:
        spool.apply = real
    history = MlflowClient().get_metric_history(run_id, "a")
    assert sorted(m.step for m in history) == [1, 2]


def test_the_spool_never_holds_the_uri_in_clear(outage):
    where = spool.append("http://alice:S3cretPw@10.0.0.1:5000", "r" * 32, spool.Op("tags", {"a": "b"}))
    assert (where.parent / "store.txt").read_text().strip() == "http://***@10.0.0.1:5000"
    for path in spool.root().rglob("*"):
        assert "S3cretPw" not in str(path)
        if path.is_file():
            assert b"S3cretPw" not in path.read_bytes()
