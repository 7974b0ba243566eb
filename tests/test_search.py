"""The search entry point on a tiny saved model: nested children, dense baselines, summary, resume,
failures, dry run, and the sweep's results as read back by analysis.query / analysis.cross_model."""
import os
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from analysis import cross_model, query
from gqaprune.errors import UserError
from prune_entry import evaluate, prune, search
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
    assert len(prunes) == 4 and len(evals) == 5               # 4 pruned points + 1 dense eval
    for r in prunes + evals:
        assert r.info.status == "FINISHED"
        assert r.data.tags[schema.TAG_PARENT_RUN] == parent.info.run_id
        assert r.data.tags[schema.TAG_SEARCH_RUN] == parent.info.run_id
    keys = {r.data.tags[schema.TAG_SEARCH_POINT] for r in prunes}
    assert len(keys) == 4
    # every eval run but the dense one evaluates the pruned model of the prune run with its point key
    by_key = {r.data.tags[schema.TAG_SEARCH_POINT]: r for r in prunes}
    dense = [e for e in evals if schema.TAG_SOURCE_RUN not in e.data.tags]
    assert len(dense) == 1 and dense[0].data.tags[schema.TAG_SEARCH_POINT] not in by_key
    for e in evals:
        if e is not dense[0]:
            assert e.data.tags[schema.TAG_SOURCE_RUN] == by_key[e.data.tags[schema.TAG_SEARCH_POINT]].info.run_id
    assert len({e.data.tags[schema.TAG_SEARCH_EVAL_KEY] for e in evals}) == 1   # same eval flags

    frame = summary_of(parent)
    assert len(frame) == 5
    assert list(frame[["method", "pruning_ratio"]].itertuples(index=False, name=None)) == [
        ("dense", 0.0), ("taylor", 0.2), ("taylor", 0.35), ("magnitude", 0.2), ("magnitude", 0.35)]
    assert set(frame["status"]) == {"finished"}
    ppl = schema.ppl_metric("corpus")
    base = frame.iloc[0]
    base_run = MlflowClient().get_run(base["eval_run_id"])
    assert base[schema.M_ACHIEVED_RATIO] == 0.0 and pd.isna(base["prune_run_id"])
    assert base[schema.M_PARAMS_AFTER] == base_run.data.metrics[schema.M_MODEL_PARAMS]
    assert base[ppl] == base_run.data.metrics[ppl]
    assert (frame[schema.M_PARAMS_AFTER].iloc[1:] < base[schema.M_PARAMS_AFTER]).all()
    for row in frame.iloc[1:].itertuples(index=False):
        child = MlflowClient().get_run(row.prune_run_id)
        assert getattr(row, schema.M_ACHIEVED_RATIO) == child.data.metrics[schema.M_ACHIEVED_RATIO]
        assert getattr(row, schema.M_PARAMS_AFTER) == child.data.metrics[schema.M_PARAMS_AFTER]
        assert abs(getattr(row, schema.M_ACHIEVED_RATIO) - row.pruning_ratio) < 0.06
        assert frame.loc[frame.eval_run_id == row.eval_run_id, ppl].item() == \
            MlflowClient().get_run(row.eval_run_id).data.metrics[ppl]
    assert parent.data.metrics[schema.M_SEARCH_POINTS] == 4
    assert parent.data.params[schema.P_SWEEP.format(name="methods")] == "taylor,magnitude"
    assert parent.data.metrics[schema.M_SEARCH_FINISHED] == 4
    assert parent.data.metrics[schema.M_SEARCH_DENSE] == 1 and parent.data.metrics[schema.M_SEARCH_DENSE_FAILED] == 0
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id)}
    assert {schema.A_SEARCH_PLAN, schema.A_SEARCH_SUMMARY, schema.A_SEARCH_SUMMARY_MD,
            schema.A_SEARCH_FIG} <= artifacts
    assert "[5/5]" in capsys.readouterr().out

    # The same sweep again: nothing is pruned or evaluated, the results are reused.
    assert search.main(sweep_args()) == 0
    again = last_search()
    assert again.info.run_id != parent.info.run_id and again.info.status == "FINISHED"
    assert len(experiment_runs(schema.STAGE_PRUNE)) == 4 and len(experiment_runs(schema.STAGE_EVAL)) == 5
    reused = summary_of(again)
    assert set(reused["status"]) == {"reused"} and reused["resumed"].tolist() == ["eval"] + ["prune+eval"] * 4
    pd.testing.assert_frame_equal(reused.drop(columns=["status", "resumed"]),
                                  frame.drop(columns=["status", "resumed"]))
    assert again.data.metrics[schema.M_SEARCH_REUSED] == 4

    # resume false: everything runs again (the dense eval too)
    assert search.main(sweep_args("--resume", "false", ratios="0.2", methods="magnitude")) == 0
    assert len(experiment_runs(schema.STAGE_PRUNE)) == 5 and len(experiment_runs(schema.STAGE_EVAL)) == 7


def test_interrupted_sweep_continues_where_it_stopped(tracking_store, sweep_args):
    # a first sweep that stopped after its prune runs (eval off) and covered one ratio only
    assert search.main(sweep_args(ratios="0.2", eval_on=False)) == 0
    first = {r.data.tags[schema.TAG_SEARCH_POINT]: r.info.run_id for r in experiment_runs(schema.STAGE_PRUNE)}
    assert len(first) == 2 and not experiment_runs(schema.STAGE_EVAL)
    assert search.main(sweep_args(ratios="0.2,0.35")) == 0
    frame = summary_of(last_search())
    assert frame["method"].iloc[0] == "dense" and frame["status"].iloc[0] == "finished"
    done = frame[frame.pruning_ratio == 0.2]
    assert set(done["resumed"]) == {"prune"} and set(done["status"]) == {"finished"}
    assert set(done["prune_run_id"]) == set(first.values())      # prune reused, eval run now
    new = frame[frame.pruning_ratio == 0.35]
    assert new["resumed"].isna().all() and set(new["status"]) == {"finished"}
    assert len(experiment_runs(schema.STAGE_PRUNE)) == 4 and len(experiment_runs(schema.STAGE_EVAL)) == 5


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


def test_failed_eval_is_reported_and_resume_keeps_the_prune_run(tracking_store, sweep_args, text_file,
                                                                monkeypatch):
    """An eval that fails at run time (a typo in a task name fails before any point: see below)."""
    def broken(*args, **kwargs):
        raise UserError("corpus no_such_task_xyz vanished", "put it back")
    with monkeypatch.context() as m:
        m.setattr(evaluate, "run_perplexity", broken)
        assert search.main(sweep_args(methods="magnitude", ratios="0.3")) == 2   # the point and the dense eval
    frame = summary_of(last_search())
    assert frame["status"].tolist() == ["failed", "failed"]
    assert all(e.startswith("eval: ") and "no_such_task_xyz" in e for e in frame["error"])
    evals = experiment_runs(schema.STAGE_EVAL)
    assert [r.info.status for r in evals] == ["FAILED", "FAILED"]
    assert [r.data.tags[schema.TAG_SEARCH_POINT] for r in evals] == frame["search_point"].tolist()
    assert [r.info.run_id for r in evals] == frame["eval_run_id"].tolist()
    assert search.main(sweep_args(methods="magnitude", ratios="0.3")) == 0
    fixed = summary_of(last_search())
    assert fixed["resumed"].isna().iloc[0] and fixed["resumed"].iloc[1] == "prune"
    assert fixed["prune_run_id"][1] == frame["prune_run_id"][1]
    assert len(experiment_runs(schema.STAGE_PRUNE)) == 1


def test_unknown_task_fails_before_the_first_point(tracking_store, sweep_args, capsys):
    bad = sweep_args(methods="magnitude", ratios="0.3")
    bad[bad.index("--eval_args") + 1] += " --tasks no_such_task_xyz"
    assert search.main(bad) == 2
    assert "unknown task 'no_such_task_xyz'" in capsys.readouterr().err
    assert last_search().info.status == "FAILED" and experiment_runs(schema.STAGE_PRUNE) == []


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
    assert "dry run: 8 point(s) + 1 dense eval(s), nothing pruned, no run created" in out
    assert out.count("| taylor | 0.35 | lstsq |") == 1 and out.count("| magnitude |") == 4
    assert out.count("| dense | 0.0 |") == 1 and "| 1 | llama-8-2 | dense |" in out   # listed first
    assert experiment_runs() == []                     # a dry run creates no run
    plan = search._plan_dict(search.parse(sweep_args("--grid", grid)))
    assert len(plan) == 9 and len({p["search_point"] for p in plan}) == 9
    assert [p["dense"] for p in plan] == [False] * 8 + [True] and plan[8]["prune_args"] == []
    assert plan[8]["eval_args"] == plan[0]["eval_args"] and plan[8]["search_eval_key"] == plan[0]["search_eval_key"]
    assert plan[1]["grid"] == {"reconstruct": "lstsq"} and plan[1]["prune_args"][-2:] == ["--reconstruct", "lstsq"]
    assert search.main(sweep_args("--dry_run", "true", "--ratios", "2")) == 2     # bad input: still no run
    assert experiment_runs() == []


def test_point_key_is_a_hash_of_resolved_settings(sweep_args):
    """Spelling a default or a ratio differently is the same point (so resume finds it)."""
    base = search.parse(sweep_args(ratios="0.2", methods="taylor"))
    same = search.parse(sweep_args("--grid", '{"seed": [0], "damping": [0.05]}', ratios="0.20", methods="taylor"))
    other = search.parse(sweep_args("--grid", '{"seed": [1]}', ratios="0.2", methods="taylor"))
    assert base.points[0].key == same.points[0].key != other.points[0].key
    assert base.points[0].eval_key == other.points[0].eval_key
    # the dense eval: one per model, keyed by model path + eval flags only
    assert len(base.dense) == 1 and base.dense[0].key == other.dense[0].key != base.points[0].key
    argv = sweep_args(ratios="0.2", methods="taylor")
    argv[argv.index("--eval_args") + 1] += " --ppl_seq_len 8"
    longer = search.parse(argv)
    assert longer.dense[0].key != base.dense[0].key and longer.dense[0].eval_key == longer.points[0].eval_key


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
    assert not sweep.config.eval_dense and sweep.dense == []     # no eval, no dense eval


def test_demo_eval_auto_means_the_demo_data():
    flags = search.eval_flags_for("demo", {"speed": "false"}, None)
    assert flags == {"speed": "false", "ppl_datasets": "demo", "tasks": "demo_continuation,demo_cloze"}
    assert search.eval_flags_for("Llama", {"tasks": "auto"}, None) == {"tasks": "auto"}


@pytest.mark.parametrize("name,points", [("demo.yaml", 8), ("six_models.yaml", 54)])
def test_shipped_configs_validate(name, points):
    sweep = search.parse(["--config", str(REPO / "configs" / "sweeps" / name), "--dry_run", "true"])
    assert len(sweep.points) == points and sweep.config.eval and sweep.config.resume
    assert all(p.eval is not None for p in sweep.points)
    assert [d.model for d in sweep.dense] == list(sweep.config.models)
    assert all(d.dense and d.method == "dense" and d.ratio == 0.0 and d.prune is None for d in sweep.dense)
    if name == "demo.yaml":
        assert {p.method for p in sweep.points} == {"taylor", "magnitude", "random", "layerwise"}
        assert sweep.points[0].eval.ppl.ppl_datasets == "demo"
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


def test_dense_baseline_reads_back_in_analysis(tracking_store, sweep_args):
    """1 model x 1 method x 1 ratio with eval: the store holds a dense and a pruned eval that
    analysis.query joins as two rows of one model and cross_model turns into a relative change."""
    model = sweep_args()[1]
    assert search.main(sweep_args(methods="magnitude", ratios="0.3")) == 0
    frame = summary_of(last_search())
    dense_run = MlflowClient().get_run(frame["eval_run_id"][0])
    assert dense_run.data.params["model_uri"] == model                  # the model as given
    assert dense_run.data.tags[schema.TAG_RUN_NAME] == "eval-llama-8-2-dense"
    assert dense_run.data.tags[schema.TAG_SEARCH_POINT] == frame["search_point"][0]

    table = query.results_table(os.environ["MLFLOW_EXPERIMENT_NAME"])
    assert table["method"].tolist() == ["dense", "magnitude"]
    assert table["stage"].tolist() == [schema.LABEL_DENSE, schema.LABEL_PRUNED]
    assert table["model_path"].nunique() == 1 and table["search_run_id"].notna().all()
    assert table["eval_run_id"].tolist() == frame["eval_run_id"].tolist()
    ppl = schema.ppl_metric("corpus")
    assert table[ppl].tolist() == frame[ppl].tolist()
    assert table["params_after"].tolist() == frame[schema.M_PARAMS_AFTER].tolist()
    piv = cross_model.pivot(table, ppl)
    assert piv.notes == [] and piv.values.shape == (2, 1)
    d, p = frame[ppl].tolist()
    rel = piv.relative.iloc[:, 0].tolist()
    assert rel[0] == 0.0 and rel[1] == pytest.approx(100 * (p - d) / d)

    # eval flags changed: both evals re-run, the prune run is reused; eval_dense false: no dense eval
    longer = sweep_args(methods="magnitude", ratios="0.3")
    longer[longer.index("--eval_args") + 1] += " --ppl_seq_len 8"
    assert search.main(longer) == 0
    assert summary_of(last_search())["resumed"].fillna("").tolist() == ["", "prune"]
    assert search.main(sweep_args("--eval_dense", "false", methods="magnitude", ratios="0.3")) == 0
    off = summary_of(last_search())
    assert off["method"].tolist() == ["magnitude"] and last_search().data.metrics[schema.M_SEARCH_DENSE] == 0
    assert len(experiment_runs(schema.STAGE_EVAL)) == 4 and len(experiment_runs(schema.STAGE_PRUNE)) == 1


def test_failed_dense_eval_is_reported_and_does_not_stop_the_sweep(tracking_store, sweep_args, monkeypatch, capsys):
    """The dense eval gets a flag its parser refuses; with stop_on_error the pruned point still runs,
    and the FAILED child carries its point's tags (set at its start, before parsing)."""
    model, real = sweep_args()[1], evaluate.run_child

    def dense_breaks(model_uri, config=None, extra_tags=None, overrides=None, parent_run_id=None):
        return real(model_uri, config, extra_tags, {"ppl_seq_len": "0"} if model_uri == model else overrides,
                    parent_run_id)

    monkeypatch.setattr(search.evaluate, "run_child", dense_breaks)
    assert search.main(sweep_args("--stop_on_error", "true", methods="magnitude", ratios="0.3")) == 0
    parent = last_search()
    frame = summary_of(parent)
    assert parent.info.status == "FINISHED" and frame["status"].tolist() == ["failed", "finished"]
    assert frame["error"][0].startswith("eval: ppl_seq_len must be >= 2, got 0")
    assert pd.isna(frame[schema.M_ACHIEVED_RATIO][0]) and pd.isna(frame[schema.M_PARAMS_AFTER][0])
    child = MlflowClient().get_run(frame["eval_run_id"][0])
    assert child.info.status == "FAILED" and child.data.tags[schema.TAG_SEARCH_POINT] == frame["search_point"][0]
    assert child.data.tags[schema.TAG_SEARCH_RUN] == parent.info.run_id
    assert parent.data.metrics[schema.M_SEARCH_DENSE_FAILED] == 1 and parent.data.metrics[schema.M_SEARCH_FAILED] == 0
    out = capsys.readouterr().out
    assert "[1/2] llama-8-2 dense: FAILED eval: ppl_seq_len must be >= 2" in out
    assert "1 point(s) failed: 'llama-8-2 dense'" in out


def test_killed_child_carries_its_point_tags(tracking_store, sweep_args, monkeypatch):
    """Ctrl-C inside a prune child: the child ends KILLED already tagged with its point."""
    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(prune, "run", interrupted)
    assert search.main(sweep_args(methods="magnitude", ratios="0.3", eval_on=False)) == 130
    parent, (child,) = last_search(), experiment_runs(schema.STAGE_PRUNE)
    assert parent.info.status == "KILLED" and child.info.status == "KILLED"
    point = search.parse(sweep_args(methods="magnitude", ratios="0.3", eval_on=False)).points[0]
    assert child.data.tags[schema.TAG_SEARCH_POINT] == point.key
    assert child.data.tags[schema.TAG_SEARCH_RUN] == parent.info.run_id
