"""search --executor ray: the real sweep (tiny saved model, prune + eval children) runs its points
as Ray tasks on a local Ray instance, each claimed in the store, children nested under the search
run although the workers have no active run; the summary and a resumed re-run read the same store.

Worker deaths, claims taken over and a tracking server restart are covered by
tests/test_team_server.py; scheduling and retries by tests/test_executors.py."""
import os

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from prune_entry import search
from tracking import claims, schema
from test_search import experiment_runs, last_search, summary_of, sweep_args  # noqa: F401 - a fixture

pytest.importorskip("ray", reason="Ray is not installed (pip install -e .[distributed])")


def test_ray_sweep_runs_points_in_workers_nested_claimed_and_resumable(tracking_store, sweep_args, capsys):
    flags = ("--executor", "ray", "--cpus_per_point", "1")
    assert search.main(sweep_args(*flags, methods="taylor,magnitude", ratios="0.3")) == 0
    parent = last_search()
    assert parent.info.status == "FINISHED"
    assert parent.data.params[schema.P_SWEEP.format(name="executor")] == "ray"
    assert parent.data.params[schema.P_SWEEP.format(name="claim_points")] == "True"   # auto: on with ray
    prunes, evals = experiment_runs(schema.STAGE_PRUNE), experiment_runs(schema.STAGE_EVAL)
    assert len(prunes) == 2 and len(evals) == 3          # 2 pruned points + 1 dense eval
    for r in prunes + evals:
        assert r.info.status == "FINISHED"
        assert r.data.tags[schema.TAG_PARENT_RUN] == parent.info.run_id    # nested without an active run
        assert r.data.tags[schema.TAG_SEARCH_RUN] == parent.info.run_id
        assert r.data.tags[schema.TAG_PID] != str(os.getpid())             # ran in a Ray worker
    # Every point (the dense eval too) was claimed once and released as done.
    registry = [r for r in experiment_runs() if r.data.tags.get(schema.TAG_STAGE) == claims.STAGE_CLAIMS]
    assert len(registry) == 1 and registry[0].info.status == "FINISHED"
    keys = {r.data.tags[schema.TAG_SEARCH_POINT] for r in prunes + evals}
    claimed = {name.split("/")[1] for name in registry[0].data.params if name.startswith("claim/")}
    assert claimed == keys
    assert sorted(v for k, v in registry[0].data.tags.items() if k.startswith("end/")) == [claims.END_DONE] * 3
    frame = summary_of(parent)
    assert frame["status"].tolist() == ["finished"] * 3
    assert frame[schema.M_ACHIEVED_RATIO].iloc[1:].between(0.25, 0.35).all()
    live = MlflowClient().get_metric_history(parent.info.run_id, "search/live_completed")
    assert max(m.value for m in live) == 3
    out = capsys.readouterr().out
    assert out.count(" on ") >= 3            # each point line names the worker that ran it

    # Resumed (locally: where a point ran does not enter its key): every point is found FINISHED
    # in the store and reused, nothing runs again.
    assert search.main(sweep_args(methods="taylor,magnitude", ratios="0.3")) == 0
    again = summary_of(last_search())
    assert again["status"].tolist() == ["reused"] * 3
    assert len(experiment_runs(schema.STAGE_PRUNE)) == 2 and len(experiment_runs(schema.STAGE_EVAL)) == 3
    assert pd.Series(again["prune_run_id"].iloc[1:]).tolist() == frame["prune_run_id"].iloc[1:].tolist()


def test_bad_executor_settings_are_one_line_errors(tracking_store, sweep_args, capsys):
    assert search.main(sweep_args("--executor", "slurm")) == 2
    assert "executor" in capsys.readouterr().err
    assert search.main(sweep_args("--executor", "ray", "--cpus_per_point", "64")) == 2
    err = capsys.readouterr().err
    assert "cpus_per_point 64 exceeds" in err and "Traceback" not in err
