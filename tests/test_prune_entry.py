"""The prune entry point end to end on tiny models, with a temporary MLflow store."""
import os

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from gqaprune import checkpoint
from prune_entry import prune
from tracking import schema, store


def last_run():
    client = MlflowClient()
    exp = client.get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"])
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])[0]


def run_prune(*args):
    return prune.main([str(a) for a in args])


@pytest.fixture
def model_dir(saved_tiny_model):
    return saved_tiny_model("llama", 8, 2)


def test_prune_logs_everything(tracking_store, model_dir, text_file, tmp_path):
    code = run_prune("--model", model_dir, "--method", "taylor", "--pruning_ratio", "0.3",
                     "--calibration_dataset", text_file, "--taylor_num_samples", 8,
                     "--taylor_seq_len", 16)
    assert code == 0
    run = last_run()
    assert run.info.status == "FINISHED"
    m, p, t = run.data.metrics, run.data.params, run.data.tags
    assert t[schema.TAG_STAGE] == "prune" and t[schema.TAG_METHOD] == "taylor"
    assert t[schema.TAG_MODEL_FAMILY] == "Llama" and t[schema.TAG_MODEL_VARIANT] == "Base"
    assert p["pruning_ratio"] == "0.3" and p["taylor_num_samples"] == "8"
    assert abs(m[schema.M_ACHIEVED_RATIO] - 0.3) < 0.05
    assert m[schema.M_PARAMS_AFTER] < m[schema.M_PARAMS_BEFORE]
    assert 0 < m[schema.M_ACHIEVED_TOTAL_RATIO] < m[schema.M_ACHIEVED_RATIO]
    assert schema.layer_metric(schema.M_LAYER_KEPT, 2) in m
    client = MlflowClient()
    names = set(store.artifact_paths(run.info.run_id))   # the pruned model is an MLflow Model
    assert {schema.A_PLAN, schema.A_LAYER_SUMMARY, schema.A_LAYER_SUMMARY_FIG,
            schema.A_PRUNED_MODEL} <= names
    # The logged model loads and has the pruned parameter count.
    local = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/{schema.A_PRUNED_MODEL}")
    model = checkpoint.load_model(local)
    assert sum(p.numel() for p in model.parameters()) == m[schema.M_PARAMS_AFTER]

    # Replaying the logged plan gives the same model.
    code = run_prune("--model", model_dir, "--plan", f"runs:/{run.info.run_id}/{schema.A_PLAN}")
    assert code == 0
    replay = last_run()
    assert replay.data.tags[schema.TAG_METHOD] == "plan"
    local2 = mlflow.artifacts.download_artifacts(f"runs:/{replay.info.run_id}/{schema.A_PRUNED_MODEL}")
    ids = torch.randint(0, 97, (1, 8))
    torch.testing.assert_close(checkpoint.load_model(local2)(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("args,message", [
    (["--model", "NoSuchModel"], "unknown model 'NoSuchModel'"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--pruning_ratio", "0"], "pruning_ratio must be in (0, 1)"),
    (["--pruning_ratio", "1.5"], "pruning_ratio must be in (0, 1)"),
    (["--pruning_ratio", "0.97", "--method", "magnitude"], "too high"),
    (["--layer_start", "2", "--layer_end", "9", "--method", "magnitude"], "out of bounds"),
    (["--calibration_dataset", "/no/such/file.txt"], "unknown calibration_dataset"),
    (["--taylor_variant", "weird"], "unknown taylor_variant"),
    (["--plan", "/no/plan.json"], "plan 'no/plan.json' not found".replace("no/", "/no/")),
    (["--calibration_dataset", "wikitext2"], "cannot be reached"),
    (["--bogus_flag", "1"], "unrecognized arguments"),
])
def test_bad_input_fails_cleanly(tracking_store, model_dir, capsys, args, message):
    base = ["--model", model_dir, "--taylor_num_samples", "2", "--taylor_seq_len", "8"]
    code = run_prune(*(base + args))
    assert code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    # One error line, last (progress bars may precede it), no traceback.
    assert lines[-1].startswith("error: ") and message in lines[-1]
    assert sum(line.startswith("error:") for line in lines) == 1
    assert "Traceback" not in err
    run = last_run()
    assert run.info.status == "FAILED"
    assert message in run.data.tags[schema.TAG_FAILURE]


def test_hub_model_offline_fails_cleanly(tracking_store, capsys):
    assert run_prune("--model", "some-org/not-downloaded-model") == 2
    err = capsys.readouterr().err
    assert "could not be fetched from the Hugging Face hub (offline)" in err
    assert last_run().info.status == "FAILED"


def test_unsupported_architecture(tracking_store, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel
    from tests.conftest import make_word_tokenizer
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=97)).save_pretrained(tmp_path)
    make_word_tokenizer(tmp_path)
    assert run_prune("--model", tmp_path, "--method", "magnitude") == 2
    assert "unsupported architecture 'gpt2'" in capsys.readouterr().err
    assert last_run().info.status == "FAILED"


def test_model_dir_without_config(tracking_store, tmp_path, capsys):
    assert run_prune("--model", tmp_path) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_models_file_overrides_alias(tracking_store, model_dir, tmp_path):
    aliases = tmp_path / "models.yaml"
    aliases.write_text(f"Llama:\n  path: {model_dir}\n")
    assert run_prune("--model", "Llama", "--models_file", aliases, "--method", "magnitude",
                     "--reconstruct", "none", "--save_model", "false") == 0
    tags = last_run().data.tags
    assert tags[schema.TAG_MODEL_ALIAS] == "Llama" and tags[schema.TAG_MODEL_FAMILY] == "Llama"
    assert tags[schema.TAG_MODEL_PATH] == str(model_dir)
