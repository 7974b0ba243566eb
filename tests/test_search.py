"""The search entry point on a tiny saved model: nested children, summary, resume, failures, dry run."""
import os
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from gqaprune.errors import UserError
from prune_entry import search
from tracking import schema

REPO = Path(__file__).resolve().parents[1]


def experiment_runs(stage=None):
    client = MlflowClient()
    exp = client.get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"])
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    return [r for r in runs if stage is None or r.data.tags.get(schema.TAG_STAGE) == stage]


def last_search():
    return experiment_runs(schema.STAGE_SEARCH)[-1]


def summary_of(run) -> pd.DataFrame:
    path = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/{schema.A_SEARCH_SUMMARY}")
    return pd.read_csv(path)


@pytest.fixture
def sweep_args(saved_tiny_model, text_file):
    """Flags of a fast sweep on a tiny Llama (8 heads / 2 KV, 3 layers); extra flags appended."""
    model = saved_tiny_model("llama", 8, 2)
    prune_args = (f"--calibration_dataset {text_file} --taylor_num_samples 4 --taylor_seq_len 16 "
                  f"--batch_size 4 --reconstruct none")
    eval_args = f"--ppl_datasets corpus={text_file} --ppl_seq_len 16 --tasks none --speed false"

    def make(*extra, methods="taylor,magnitude", ratios="0.2,0.35", eval_on=True):
        args = ["--models", str(model), "--methods", methods, "--ratios", ratios,
                "--prune_args", prune_args, "--eval", str(eval_on).lower(), "--eval_args", eval_args]
        return args + [str(e) for e in extra]
    return make


def test_sweep_nests_children_and_summarises_then_resumes(tracking_store, sweep_args, capsys):
    assert search.main(sweep_args()) == 0
    parent = last_search()
    assert parent.info.status == "FINISHED"
    prunes, evals = experiment_runs(schema.STAGE_PRUNE), experiment_runs(schema.STAGE_EVAL)
    assert len(prunes) == 4 and len(evals) == 4
    for r in prunes + evals:
        assert r.info.status == "FINISHED"
        assert r.data.tags[schema.TAG_PARENT_RUN] == parent.info.run_id
        assert r.data.tags[schema.TAG_SEARCH_RUN] == parent.info.run_id
    keys = {r.data.tags[schema.TAG_SEARCH_POINT] for r in prunes}
    assert len(keys) == 4
    # every eval run evaluates the pruned model of the prune run with the same point key
    by_key = {r.data.tags[schema.TAG_SEARCH_POINT]: r for r in prunes}
    for e in evals:
        assert e.data.tags[schema.TAG_SOURCE_RUN] == by_key[e.data.tags[schema.TAG_SEARCH_POINT]].info.run_id

    frame = summary_of(parent)
    assert len(frame) == 4
    assert list(frame[["method", "pruning_ratio"]].itertuples(index=False, name=None)) == [
        ("taylor", 0.2), ("taylor", 0.35), ("magnitude", 0.2), ("magnitude", 0.35)]
    assert set(frame["status"]) == {"finished"}
    ppl = schema.ppl_metric("corpus")
    for row in frame.itertuples(index=False):
        child = MlflowClient().get_run(row.prune_run_id)
        assert getattr(row, schema.M_ACHIEVED_RATIO) == child.data.metrics[schema.M_ACHIEVED_RATIO]
        assert getattr(row, schema.M_PARAMS_AFTER) == child.data.metrics[schema.M_PARAMS_AFTER]
        assert abs(getattr(row, schema.M_ACHIEVED_RATIO) - row.pruning_ratio) < 0.06
        assert frame.loc[frame.eval_run_id == row.eval_run_id, ppl].item() == \
            MlflowClient().get_run(row.eval_run_id).data.metrics[ppl]
    assert parent.data.metrics[schema.M_SEARCH_POINTS] == 4
    assert parent.data.params[schema.P_SWEEP.format(name="methods")] == "taylor,magnitude"
    assert parent.data.metrics[schema.M_SEARCH_FINISHED] == 4
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id)}
    assert {schema.A_SEARCH_PLAN, schema.A_SEARCH_SUMMARY, schema.A_SEARCH_SUMMARY_MD,
            schema.A_SEARCH_FIG} <= artifacts
    assert "[4/4]" in capsys.readouterr().out

    # The same sweep again: nothing is pruned or evaluated, the results are reused.
    assert search.main(sweep_args()) == 0
    again = last_search()
    assert again.info.run_id != parent.info.run_id and again.info.status == "FINISHED"
    assert len(experiment_runs(schema.STAGE_PRUNE)) == 4 and len(experiment_runs(schema.STAGE_EVAL)) == 4
    reused = summary_of(again)
    assert set(reused["status"]) == {"reused"} and set(reused["resumed"]) == {"prune+eval"}
    pd.testing.assert_frame_equal(reused.drop(columns=["status", "resumed"]),
                                  frame.drop(columns=["status", "resumed"]))
    assert again.data.metrics[schema.M_SEARCH_REUSED] == 4

    # resume false: everything runs again
    assert search.main(sweep_args("--resume", "false", ratios="0.2", methods="magnitude")) == 0
    assert len(experiment_runs(schema.STAGE_PRUNE)) == 5


def test_interrupted_sweep_continues_where_it_stopped(tracking_store, sweep_args):
    # a first sweep that stopped after its prune runs (eval off) and covered one ratio only
    assert search.main(sweep_args(ratios="0.2", eval_on=False)) == 0
    first = {r.data.tags[schema.TAG_SEARCH_POINT]: r.info.run_id for r in experiment_runs(schema.STAGE_PRUNE)}
    assert len(first) == 2 and not experiment_runs(schema.STAGE_EVAL)
    assert search.main(sweep_args(ratios="0.2,0.35")) == 0
    frame = summary_of(last_search())
    done = frame[frame.pruning_ratio == 0.2]
    assert set(done["resumed"]) == {"prune"} and set(done["status"]) == {"finished"}
    assert set(done["prune_run_id"]) == set(first.values())      # prune reused, eval run now
    new = frame[frame.pruning_ratio == 0.35]
    assert new["resumed"].isna().all() and set(new["status"]) == {"finished"}
    assert len(experiment_runs(schema.STAGE_PRUNE)) == 4 and len(experiment_runs(schema.STAGE_EVAL)) == 4


def test_failing_point_is_reported_and_the_others_run(tracking_store, sweep_args, capsys):
    assert search.main(sweep_args(methods="magnitude", ratios="0.3,0.97", eval_on=False)) == 0
    parent = last_search()
    assert parent.info.status == "FINISHED"
    frame = summary_of(parent)
    assert list(frame["status"]) == ["finished", "failed"]
    failed = frame.iloc[1]
    assert "too high" in failed["error"] and pd.isna(failed[schema.M_ACHIEVED_RATIO])
    child = MlflowClient().get_run(failed["prune_run_id"])
    assert child.info.status == "FAILED" and "too high" in child.data.tags[schema.TAG_FAILURE]
    assert child.data.tags[schema.TAG_SEARCH_POINT] == failed["search_point"]
    assert parent.data.metrics[schema.M_SEARCH_FAILED] == 1
    assert "FAILED prune: pruning_ratio 0.97 is too high" in capsys.readouterr().out


def test_failed_eval_is_reported_and_resume_keeps_the_prune_run(tracking_store, sweep_args, text_file):
    bad = sweep_args(methods="magnitude", ratios="0.3")
    bad[bad.index("--eval_args") + 1] += " --tasks no_such_task_xyz"
    assert search.main(bad) == 2                      # the only point failed
    frame = summary_of(last_search())
    assert frame["status"].tolist() == ["failed"] and frame["error"][0].startswith("eval: ")
    evals = experiment_runs(schema.STAGE_EVAL)
    assert [r.info.status for r in evals] == ["FAILED"]
    assert evals[0].data.tags[schema.TAG_SEARCH_POINT] == frame["search_point"][0]
    assert search.main(sweep_args(methods="magnitude", ratios="0.3")) == 0
    fixed = summary_of(last_search())
    assert fixed["resumed"].tolist() == ["prune"] and fixed["prune_run_id"][0] == frame["prune_run_id"][0]
    assert len(experiment_runs(schema.STAGE_PRUNE)) == 1


def test_stop_on_error_and_all_failed(tracking_store, sweep_args, capsys):
    code = search.main(sweep_args("--stop_on_error", "true", methods="magnitude", ratios="0.97,0.3",
                                  eval_on=False))
    assert code == 2
    parent = last_search()
    assert parent.info.status == "FAILED" and "stop_on_error" in parent.data.tags[schema.TAG_FAILURE]
    assert len(experiment_runs(schema.STAGE_PRUNE)) == 1
    assert list(summary_of(parent)["status"]) == ["failed", "not run"]

    assert search.main(sweep_args(methods="magnitude", ratios="0.97", eval_on=False)) == 2
    parent = last_search()
    assert parent.info.status == "FAILED"
    assert parent.data.tags[schema.TAG_FAILURE].startswith("all 1 points failed: 'llama-8-2 magnitude 0.97'")
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: all 1 points failed")


@pytest.mark.parametrize("extra,message", [
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--ratios", "0.2,1.5"], "pruning ratio 1.5 is outside (0, 1)"),
    (["--ratios", "0"], "pruning ratio 0 is outside (0, 1)"),
    (["--grid", '{"no_such_param": [1, 2]}'], "unknown prune parameter 'no_such_param' in grid"),
    (["--grid", '{"pruning_ratio": [0.1]}'], "'pruning_ratio' in grid: it is an axis"),
    (["--grid", '{"reconstruct": ["none", "weird"]}'], "sweep point"),
    (["--prune_args", "--output_dir /tmp/x"], "'output_dir' cannot be set"),
    (["--eval_args", "--bogus_flag 1"], "eval_args: eval: unrecognized arguments"),
    (["--eval_args", "--ppl_seq_len 0"], "eval_args: ppl_seq_len must be >= 2, got 0"),
    (["--config", "/no/such/sweep.yaml"], "sweep config '/no/such/sweep.yaml' not found"),
    (["--models", "NoSuchModel"], "unknown model 'NoSuchModel'"),
    (["--eval_args", "--ppl_datasets wikitext2"], "perplexity dataset 'wikitext2' is on the Hugging Face hub"),
    (["--not_a_flag", "1"], "unrecognized arguments"),
])
def test_bad_input_fails_before_any_work(tracking_store, sweep_args, capsys, extra, message):
    assert search.main(sweep_args(*extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    parent = last_search()
    assert parent.info.status == "FAILED" and message in parent.data.tags[schema.TAG_FAILURE]
    assert experiment_runs(schema.STAGE_PRUNE) == [] and experiment_runs(schema.STAGE_EVAL) == []


def test_dry_run_lists_points(tracking_store, sweep_args, capsys):
    grid = '{"reconstruct": ["none", "lstsq"]}'
    assert search.main(sweep_args("--grid", grid, "--dry_run", "true")) == 0
    out = capsys.readouterr().out
    parent = last_search()
    assert parent.info.status == "FINISHED" and "dry run: 8 point(s)" in out
    assert out.count("| taylor | 0.35 | lstsq |") == 1 and out.count("| magnitude |") == 4
    assert experiment_runs(schema.STAGE_PRUNE) == []
    plan = mlflow.artifacts.load_dict(f"runs:/{parent.info.run_id}/{schema.A_SEARCH_PLAN}")
    assert len(plan) == 8 and len({p["search_point"] for p in plan}) == 8
    assert plan[1]["grid"] == {"reconstruct": "lstsq"} and plan[1]["prune_args"][-2:] == ["--reconstruct", "lstsq"]


def test_point_key_is_a_hash_of_resolved_settings(sweep_args):
    """Spelling a default or a ratio differently is the same point (so resume finds it)."""
    base = search.parse(sweep_args(ratios="0.2", methods="taylor"))
    same = search.parse(sweep_args("--grid", '{"seed": [0], "damping": [0.05]}', ratios="0.20", methods="taylor"))
    other = search.parse(sweep_args("--grid", '{"seed": [1]}', ratios="0.2", methods="taylor"))
    assert base.points[0].key == same.points[0].key != other.points[0].key
    assert base.points[0].eval_key == other.points[0].eval_key


@pytest.mark.parametrize("text,expected", [
    ("--a 1 --b=x y", None),
    ("--a 1 --b=2", {"a": "1", "b": "2"}),
    ('--task_corpus "ts=/a b.txt" --limit 0.5', {"task_corpus": "ts=/a b.txt", "limit": "0.5"}),
    ("--a", None),
])
def test_flag_strings(text, expected):
    if expected is None:
        with pytest.raises(UserError):
            search._flags(text, "prune_args")
    else:
        assert search._flags(text, "prune_args") == expected


def test_command_line_overrides_config(tmp_path, sweep_args):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump({"methods": ["random"], "ratios": [0.1, 0.5], "grid": {"seed": [0, 1]},
                                   "eval": False, "prune_args": {"seed": 3, "reconstruct": "bias"}}))
    sweep = search.parse(["--config", str(cfg), *sweep_args(ratios="0.3", eval_on=False)[:6]])
    assert sweep.config.ratios == (0.3,) and sweep.config.methods == ("taylor", "magnitude")
    assert sweep.config.grid == {"seed": ("0", "1")} and "seed" not in sweep.config.prune_args
    assert sweep.config.prune_args["reconstruct"] == "bias" and len(sweep.points) == 4
    assert not sweep.config.eval and sweep.config.resume and not sweep.config.stop_on_error


def test_demo_eval_auto_means_the_demo_data():
    flags = search.eval_flags_for("demo", {"speed": "false"}, None)
    assert flags == {"speed": "false", "ppl_datasets": "demo", "tasks": "demo_continuation,demo_cloze"}
    assert search.eval_flags_for("Llama", {"tasks": "auto"}, None) == {"tasks": "auto"}


@pytest.mark.parametrize("name,points", [("demo.yaml", 8), ("six_models.yaml", 54)])
def test_shipped_configs_validate(name, points):
    sweep = search.parse(["--config", str(REPO / "configs" / "sweeps" / name), "--dry_run", "true"])
    assert len(sweep.points) == points and sweep.config.eval and sweep.config.resume
    assert all(p.eval_argv for p in sweep.points)
    if name == "demo.yaml":
        assert {p.method for p in sweep.points} == {"taylor", "magnitude", "random", "layerwise"}
        assert "demo" in sweep.points[0].eval_argv
    else:
        assert len({p.model for p in sweep.points}) == 6 and {p.ratio for p in sweep.points} == {0.2, 0.3, 0.4}


def test_mlproject_entry_passes_every_flag():
    entry = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]["search"]
    flags = {a.dest for a in search.build_parser()._actions if a.dest != "help"}
    assert set(entry["parameters"]) == flags
    assert all(f"{{{f}}}" in entry["command"] for f in flags)


def test_hub_data_offline_fails_before_the_first_point(tracking_store, capsys):
    """The GPU config on an offline machine stops at once (tests run with HF_*_OFFLINE=1)."""
    code = search.main(["--config", str(REPO / "configs" / "sweeps" / "six_models.yaml")])
    assert code == 2
    err = capsys.readouterr().err
    assert "calibration dataset(s) wikitext2 are on the Hugging Face hub" in err
    assert last_search().info.status == "FAILED" and experiment_runs(schema.STAGE_PRUNE) == []
