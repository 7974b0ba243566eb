"""The prune entry point with layerwise / blockwise / conditioned taylor: what gets logged,
importance reuse through runs:/ URIs, the printed verdict, and bad input -> exit 2 + FAILED."""
import json
import os

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import make_tiny_model, make_word_tokenizer
from gqaprune.structured.layer_importance import compute_layer_importance
from prune_entry import prune
from tracking import schema

SMALL = ["--taylor_num_samples", "8", "--taylor_seq_len", "16", "--importance_samples", "4",
         "--save_model", "false", "--reconstruct", "none"]


def last_run():
    client = MlflowClient()
    exp = client.get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"])
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])[0]


def artifact_json(run, name):
    return json.loads(open(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/{name}")).read())


@pytest.fixture
def env(tracking_store, saved_tiny_model, text_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # the store's default artifact root is ./mlruns
    model_dir = saved_tiny_model("llama", 8, 2, layers=4)
    return lambda *args: prune.main(["--model", str(model_dir), "--calibration_dataset", str(text_file),
                                     *SMALL, *map(str, args)])


def test_layerwise_logs_importance_rates_and_diagnosis(env, capsys):
    assert env("--method", "layerwise", "--pruning_ratio", "0.3", "--pruning_strategy", "inverse",
               "--alpha", "2") == 0
    run = last_run()
    m, t = run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED"
    assert abs(m[schema.M_ACHIEVED_RATIO] - 0.3) < 0.01
    names = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {schema.A_LAYER_IMPORTANCE, schema.A_LAYER_RATES, schema.A_LAYER_RATES_FIG,
            schema.A_GRAD_DIAGNOSIS, schema.A_GRAD_DIAGNOSIS_FIG, schema.A_GRAD_VERDICT,
            schema.A_LAYER_SUMMARY, schema.A_LAYER_SUMMARY_FIG, schema.A_PLAN} <= names
    for i in range(4):
        assert 0.15 - 1e-9 <= m[schema.layer_metric(schema.M_LAYER_TARGET_RATE, i)] <= 0.5 + 1e-9
        assert schema.layer_metric(schema.M_LAYER_IMPORTANCE, i) in m
        assert m[schema.layer_metric(schema.M_LAYER_GRAD_NORM, i)] > 0
    for key in (schema.M_GRAD_NORM_RATIO, schema.M_GRAD_MEAN_RATIO, schema.M_MEAN_RATIO):
        assert m[key] >= 1.0
    assert m[schema.M_NUM_EXTREME_LAYERS] == 0 and t[schema.TAG_EXTREME_LAYERS] == "none"
    imp = artifact_json(run, schema.A_LAYER_IMPORTANCE)
    assert imp["num_layers"] == 4 and imp["method"] == "removal" and len(imp["layer"]) == 4
    assert imp["details"]["calibration"]["num_samples"] == 4
    diag = artifact_json(run, schema.A_GRAD_DIAGNOSIS)
    assert diag["verdict"].startswith("Gradient diagnosis:") and len(diag["layers"]) == 4
    out = capsys.readouterr().out
    assert "per-layer pruning rates (target -> achieved)" in out and "Gradient diagnosis:" in out
    assert run.data.params["pruning_strategy"] == "inverse" and run.data.params["alpha"] == "2.0"


def test_reused_importance_config_gives_the_same_plan(env, capsys):
    assert env("--method", "blockwise", "--pruning_ratio", "0.25") == 0
    first = last_run()
    uri = f"runs:/{first.info.run_id}/{schema.A_LAYER_IMPORTANCE}"
    assert env("--method", "blockwise", "--pruning_ratio", "0.25", "--importance_config", uri,
               "--skip_importance_analysis", "true") == 0
    second = last_run()
    assert "reusing removal importance" in capsys.readouterr().out
    assert artifact_json(second, schema.A_PLAN)["layers"] == artifact_json(first, schema.A_PLAN)["layers"]
    assert second.data.metrics[schema.M_IMPORTANCE_TIME] == 0.0
    assert second.data.tags[schema.TAG_IMPORTANCE_SOURCE] == uri
    assert schema.M_LAYER_BLOCK_TARGET_RATE.format(layer=0, block="attn") in second.data.metrics


def test_conditioned_taylor_records_conditioning(env):
    assert env("--method", "taylor", "--pruning_ratio", "0.3", "--normalization", "log",
               "--clip_low", "5", "--clip_high", "95", "--temperature", "1", "--tau", "0.5") == 0
    run = last_run()
    diag = artifact_json(run, schema.A_GRAD_DIAGNOSIS)
    assert diag["conditioning"] == {"normalization": "log", "clip_low": 5.0, "clip_high": 95.0,
                                    "temperature": 1.0, "tau": 0.5}
    assert len(diag["block_correction"]) == 4
    assert artifact_json(run, schema.A_PLAN)["provenance"]["conditioning"]["normalization"] == "log"


def test_extreme_pruning_prints_verdict_with_remedy(tracking_store, tmp_path, text_file, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = make_tiny_model("llama", 8, 2, layers=4)
    with torch.no_grad():   # layer 2 writes 1000x less into the residual: tiny gradients and scores
        for p in model.model.layers[2].parameters():
            if p.dim() == 2:
                p.mul_(1e-3)
    model.save_pretrained(tmp_path / "skewed")
    make_word_tokenizer(tmp_path / "skewed")
    args = ["--model", str(tmp_path / "skewed"), "--calibration_dataset", str(text_file), *SMALL,
            "--method", "taylor", "--pruning_ratio", "0.4"]
    assert prune.main(args) == 0
    out = capsys.readouterr().out
    run = last_run()
    assert "EXTREME PRUNING" in out and "layer 2 (" in out and "normalization=log" in out
    assert "2" in run.data.tags[schema.TAG_EXTREME_LAYERS].split(",")
    assert run.data.metrics[schema.M_NUM_EXTREME_LAYERS] >= 1
    assert run.data.metrics[schema.M_GRAD_MEAN_RATIO] > 100
    # the suggested remedy removes the extreme pruning
    assert prune.main(args + ["--normalization", "log"]) == 0
    assert last_run().data.metrics[schema.M_NUM_EXTREME_LAYERS] == 0


@pytest.mark.parametrize("args,message", [
    (["--method", "layerwise", "--pruning_strategy", "steep"], "unknown pruning_strategy 'steep'"),
    (["--normalization", "l2"], "unknown normalization 'l2'"),
    (["--method", "layerwise", "--min_pruning_rate", "0.6", "--max_pruning_rate", "0.5"],
     "greater than max_pruning_rate"),
    (["--method", "layerwise", "--pruning_ratio", "0.1"], "min_pruning_rate 0.15 removes at least"),
    (["--method", "blockwise", "--pruning_ratio", "0.6"], "max_pruning_rate 0.5 removes at most"),
    (["--temperature", "-1"], "temperature must be"),
    (["--tau", "-0.5"], "tau must be"),
    (["--clip_low", "50", "--clip_high", "40"], "clip percentiles"),
    (["--importance_method", "gradient"], "unknown importance_method"),
    (["--importance_samples", "0"], "importance_samples must be >= 1"),
    (["--method", "layerwise", "--skip_importance_analysis", "true"], "no importance_config to reuse"),
    (["--method", "layerwise", "--importance_config", "/no/such.json"], "not found"),
    (["--alpha", "-1"], "alpha must be"),
])
def test_bad_input_exits_2_and_fails_the_run(env, capsys, args, message):
    assert env(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    run = last_run()
    assert run.info.status == "FAILED" and message in run.data.tags[schema.TAG_FAILURE]


@pytest.mark.parametrize("other,message", [
    (dict(family="mistral", layers=3), "is for 4 layers but the model has 3"),
    (dict(family="llama", layers=4, seed=1), "was measured on model"),     # same shapes, other model
])
def test_importance_config_of_another_model_is_refused(tracking_store, saved_tiny_model, text_file,
                                                        tmp_path, monkeypatch, capsys, other, message):
    monkeypatch.chdir(tmp_path)
    source = saved_tiny_model("llama", 8, 2, layers=4)
    ids = torch.randint(4, 97, (2, 8))
    config = compute_layer_importance(make_tiny_model("llama", 8, 2, layers=4), ids, "removal", "layer",
                                      model_name=str(source.resolve())).save(tmp_path / "imp.json")
    target = tmp_path / "other"
    make_tiny_model(other["family"], 8, 2, layers=other["layers"], seed=other.get("seed", 0)).save_pretrained(target)
    make_word_tokenizer(target)
    code = prune.main(["--model", str(target), "--calibration_dataset", str(text_file), *SMALL,
                       "--method", "layerwise", "--pruning_ratio", "0.3", "--importance_config", str(config)])
    assert code == 2
    assert message in capsys.readouterr().err
    run = last_run()
    assert run.info.status == "FAILED" and message in run.data.tags[schema.TAG_FAILURE]
