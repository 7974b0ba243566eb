"""Sparsity methods through the prune entry point (and eval, search): what gets logged, the saved
checkpoint, and bad input -> one line, exit 2, run FAILED."""
import os

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from gqaprune import checkpoint
from gqaprune.sparsity import measure, nm_check, overall_sparsity
from prune_entry import evaluate, prune, search
from tracking import schema, store


def last_run(stage=schema.STAGE_PRUNE):
    client = MlflowClient()
    exp = client.get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"])
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    return next(r for r in runs if r.data.tags.get(schema.TAG_STAGE) == stage)


@pytest.fixture
def env(tracking_store, saved_tiny_model, text_file):
    model_dir = saved_tiny_model("llama", 8, 2)
    base = ["--model", str(model_dir), "--calibration_dataset", str(text_file), "--taylor_num_samples", "8",
            "--taylor_seq_len", "16"]
    return model_dir, text_file, lambda *args: prune.main([*base, *map(str, args)])


def test_wanda_end_to_end_logs_sparsity_and_saves_a_normal_checkpoint(env):
    model_dir, text_file, run_prune = env
    assert run_prune("--method", "wanda", "--sparsity", "0.5") == 0
    run = last_run()
    m, p, t = run.data.metrics, run.data.params, run.data.tags
    assert run.info.status == "FINISHED" and t[schema.TAG_METHOD] == "wanda"
    assert t[schema.TAG_RATIO_KIND] == schema.RATIO_SPARSITY and p[schema.P_SPARSITY] == "0.5"
    assert m[schema.M_ACHIEVED_SPARSITY] == pytest.approx(0.5, abs=1e-3) and m[schema.M_TARGET_SPARSITY] == 0.5
    assert schema.layer_metric(schema.M_LAYER_SPARSITY, 2) in m and m[schema.M_CALIB_FORWARDS] > 0
    assert m[schema.M_PARAMS_AFTER] == m[schema.M_PARAMS_BEFORE]           # zeros inside, shapes unchanged
    assert p["damping"] == "0.01" and p[schema.P_CALIBRATION_RESOLVED] == str(text_file)
    names = set(store.artifact_paths(run.info.run_id))    # the pruned model is an MLflow Model
    assert {schema.A_SPARSITY_LAYERS, schema.A_SPARSITY_PROJECTIONS, schema.A_SPARSITY_FIG,
            schema.A_SPARSITY_PROVENANCE, schema.A_PRUNED_MODEL} <= names and schema.A_PLAN not in names
    local = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/{schema.A_PRUNED_MODEL}")
    model = checkpoint.load_model(local)
    assert overall_sparsity(measure(model)) == pytest.approx(m[schema.M_ACHIEVED_SPARSITY])
    # eval reports the sparsity next to perplexity
    assert evaluate.main(["--model_uri", run.info.run_id, "--ppl_datasets", f"c={text_file}", "--ppl_seq_len", "16",
                          "--tasks", "none", "--speed", "false"]) == 0
    ev = last_run(schema.STAGE_EVAL)
    assert ev.data.metrics[schema.M_MODEL_SPARSITY] == pytest.approx(0.5, abs=1e-3)
    assert schema.ppl_metric("c") in ev.data.metrics


def test_sparsegpt_2_4_holds_the_pattern_and_structured_knobs_are_not_applied(env, capsys):
    model_dir, _, run_prune = env
    assert run_prune("--method", "sparsegpt", "--sparsity_pattern", "2:4", "--reconstruct", "none") == 0
    run = last_run()
    assert run.data.metrics[schema.M_NM_VIOLATIONS] == 0 and run.data.metrics[schema.M_NM_GROUPS] > 0
    assert "reconstruct" in run.data.tags[schema.TAG_NOT_APPLIED]
    assert "does not read reconstruct (read by structured pruning)" in capsys.readouterr().out
    local = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/{schema.A_PRUNED_MODEL}")
    assert nm_check(checkpoint.load_model(local), 2, 4).violations == 0


@pytest.mark.parametrize("args,message", [
    (["--method", "wanda", "--sparsity", "1.0"], "sparsity 1.0 is outside [0, 1)"),
    (["--method", "wanda"], "needs a target sparsity"),
    (["--method", "wanda", "--sparsity_pattern", "4:4"], "needs 0 < N < M"),
    (["--method", "wanda", "--sparsity_pattern", "2:5"], "does not divide the input dimension"),
    (["--method", "block_hybrid", "--sparsity_pattern", "2:4", "--block_size", "12"], "does not divide layer"),
    (["--method", "block_hybrid", "--sparsity_pattern", "2:4", "--block_size", "8", "--tier_fractions",
      "0.3,0.3,0.3"], "sum to"),
    (["--method", "wanda", "--sparsity", "0.5", "--pruning_ratio", "0.3"], "pruning_ratio applies to structured"),
    (["--method", "taylor", "--sparsity", "0.5"], "sparsity applies to the sparsity methods"),
    (["--method", "wanda", "--sparsity", "0.5", "--sparse_format", "compressed"], "sparse_format=dense"),
    (["--method", "wanda", "--sparsity", "0.5", "--damping", "-1"], "damping must be a finite number >= 0"),
])
def test_bad_input_exits_2_and_fails_the_run(env, capsys, args, message):
    _, _, run_prune = env
    assert run_prune(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1] and "Traceback" not in "\n".join(err)
    run = last_run()
    assert run.info.status == "FAILED" and message in run.data.tags[schema.TAG_FAILURE]


def test_search_sweeps_sparsity_beside_structured_methods(env):
    model_dir, text_file, _ = env
    sweep = search.parse(["--models", str(model_dir), "--methods", "taylor,wanda", "--ratios", "0.3,0.5",
                          "--prune_args", f"--calibration_dataset {text_file} --reconstruct none"])
    by = {(p.method, p.ratio): p.prune for p in sweep.points}
    assert by[("taylor", 0.3)].structured.pruning_ratio == 0.3 and by[("taylor", 0.3)].sparsity.sparsity is None
    assert by[("wanda", 0.5)].sparsity.sparsity == 0.5 and by[("wanda", 0.5)].structured.pruning_ratio == 0.2
    assert by[("wanda", 0.5)].structured.reconstruction.reconstruct == "lstsq"     # not applied: the default
    assert len({p.key for p in sweep.points}) == 4
