"""obs through the prune entry point: logged per-layer units and OBS errors, a checkpoint that loads,
and a plan that replays through the entry point to identical weights."""
import os

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from gqaprune import checkpoint
from prune_entry import prune, search
from tracking import schema


def last_run():
    client = MlflowClient()
    exp = client.get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"])
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])[0]


def model_of(run):
    return checkpoint.load_model(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/{schema.A_PRUNED_MODEL}"))


def test_obs_end_to_end_and_plan_replay(tracking_store, saved_tiny_model, text_file, capsys):
    model_dir = saved_tiny_model("llama", 8, 2)   # (the qwen2 fixture's word tokenizer yields no ids)
    base = ["--model", str(model_dir), "--calibration_dataset", str(text_file), "--taylor_num_samples", "8",
            "--taylor_seq_len", "16"]
    assert prune.main([*base, "--method", "obs", "--pruning_ratio", "0.3", "--reconstruct", "bias"]) == 0
    out = capsys.readouterr().out
    assert "does not read reconstruct" in out and "obs: mean relative error" in out
    run = last_run()
    m, t = run.data.metrics, run.data.tags
    assert t[schema.TAG_METHOD] == "obs" and abs(m[schema.M_ACHIEVED_RATIO] - 0.3) < 0.02
    assert m[schema.M_OBS_ERR_MEAN.format(when="after")] <= m[schema.M_OBS_ERR_MEAN.format(when="pruned")]
    assert schema.layer_metric(schema.M_OBS_REMOVED_CHANNELS, 1) in m and m[schema.M_OBS_STATS_MB] > 0
    names = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {schema.A_PLAN, schema.A_OBS_LAYERS, schema.A_OBS_PROJECTIONS, schema.A_OBS_FIG} <= names
    first = model_of(run)
    # replay the logged plan: the same windows are drawn again, the same compensation written
    assert prune.main(["--model", str(model_dir), "--calibration_dataset", str(text_file),
                       "--plan", f"runs:/{run.info.run_id}/{schema.A_PLAN}"]) == 0
    replay = last_run()
    assert replay.data.tags[schema.TAG_METHOD] == "plan"
    ids = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(model_of(replay)(ids).logits, first(ids).logits, rtol=0, atol=0)


def test_obs_is_a_sweep_method(tracking_store, saved_tiny_model, text_file):
    model_dir = saved_tiny_model("llama", 8, 2)
    sweep = search.parse(["--models", str(model_dir), "--methods", "obs,taylor", "--ratios", "0.3",
                          "--grid", '{"obs_allocation": ["uniform", "global"]}',
                          "--prune_args", f"--calibration_dataset {text_file}"])
    labels = sorted(p.label() for p in sweep.points)
    assert len(sweep.points) == 3 and any("obs_allocation=uniform" in x for x in labels)
    taylor = next(p for p in sweep.points if p.method == "taylor")
    assert taylor.grid == {} and taylor.prune.structured.obs.obs_allocation == "global"
