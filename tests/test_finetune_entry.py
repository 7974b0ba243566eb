"""The `finetune` entry point in-process: artifacts, links, resume after a kill, bad input -> exit 2."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import make_tiny_model, make_word_tokenizer
from gqaprune import checkpoint
from gqaprune import finetune as ft
from gqaprune.sparsity import SparsityConfig, sparsify, weight_masks
from gqaprune.structured.plan import LayerPlan, PruningPlan
from gqaprune.structured.surgery import apply_plan
from gqaprune.structured.units import model_shapes
from prune_entry import finetune as entry
from tracking import runs, schema, store


@pytest.fixture
def pruned_dir(tmp_path):
    """A non-uniformly pruned tiny Qwen2 (8 heads / 2 KV) saved in remote-code form + tokenizer."""
    model = make_tiny_model("qwen2", 8, 2, layers=3)
    shapes = model_shapes(model)
    apply_plan(model, PruningPlan("tiny", "manual", 0.3, shapes,
                                  [LayerPlan([0, 1], list(range(40))), LayerPlan([1], list(range(30))),
                                   LayerPlan([0], list(range(20)))]))
    out = tmp_path / "pruned"
    assert checkpoint.save_model(model, make_word_tokenizer(tmp_path / "tok"), out)["format"] == "remote_code"
    return out


@pytest.fixture
def alpaca_file(tmp_path):
    gen = torch.Generator().manual_seed(0)

    def words(n):
        return " ".join(f"w{i}" for i in torch.randint(0, 90, (n,), generator=gen).tolist())
    # outputs follow a learnable pattern, so a few steps lower the validation loss
    recs = [{"instruction": words(5), "input": words(3) if i % 2 else "",
             "output": " ".join(f"w{i % 3 + j}" for j in range(4))} for i in range(40)]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    return path


def last_run(client=None):
    client = client or MlflowClient()
    exp = client.get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"])
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]


def history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def args(model, dataset, ckpt, *extra):
    return ["--model_uri", str(model), "--dataset", str(dataset), "--checkpoint_dir", str(ckpt),
            "--seq_len", "96", "--batch_size", "4", "--lora_r", "4", "--learning_rate", "5e-3",
            "--progress", "false", *extra]


def test_pruned_model_end_to_end_logs_curves_adapter_and_loadable_merged_model(
        tracking_store, pruned_dir, alpaca_file, tmp_path):
    from transformers import AutoModelForCausalLM
    assert entry.main(args(pruned_dir, alpaca_file, tmp_path / "ck", "--epochs", "2")) == 0
    client = MlflowClient()
    run = last_run(client)
    assert run.info.status == "FINISHED"
    assert run.data.tags[schema.TAG_STAGE] == "finetune"
    assert run.data.tags[schema.TAG_FT_FORM] == "instruction" and run.data.tags[schema.TAG_FT_TEMPLATE] == "alpaca"
    assert run.data.tags[schema.TAG_CHECKPOINT_FORMAT] == "remote_code"
    m = run.data.metrics
    # 36 records after holding out every 10th; 5% validation -> 2; 34 train / 4 per step -> 9 steps x 2
    assert (m["train_examples"], m["val_examples"], m["train_steps"]) == (34, 2, 18)
    assert [s for s, _ in history(client, run.info.run_id, "train_loss")] == list(range(1, 19))
    assert [s for s, _ in history(client, run.info.run_id, "val_loss")] == [0, 9, 18]
    assert m["val_loss_after"] < m["val_loss_before"]
    lrs = [v for _, v in history(client, run.info.run_id, "lr")]
    assert lrs[0] == pytest.approx(5e-3) and lrs[-1] == pytest.approx(5e-3 / 17)  # 1 warmup step, then linear decay over 17
    top = set(store.artifact_paths(run.info.run_id))   # the merged model is an MLflow Model
    assert {"lora_adapter", "finetuned_model", "finetune_curves.png", "finetune_history.csv",
            "prompt_template.json", "finetune_example.txt"} <= top
    assert store.logged_model_of_run(run.info.run_id, schema.A_FINETUNED_MODEL) is not None
    # the examples trained and validated on are the run's dataset inputs (34 train, 2 validation)
    used = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs if d.tags}
    assert json.loads(used[schema.CTX_TRAINING].profile)["examples"] == 34
    assert json.loads(used[schema.CTX_EVALUATION].profile)["examples"] == 2
    local = store.download_artifact(run.info.run_id, schema.A_FINETUNED_MODEL, tmp_path / "dl")
    ids = torch.randint(4, 97, (1, 7))
    ours = checkpoint.load_model(local).eval()
    theirs = AutoModelForCausalLM.from_pretrained(local, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-6)
    adapter_cfg = client.download_artifacts(run.info.run_id, "lora_adapter/adapter_config.json", str(tmp_path / "ad"))
    adapter = json.loads(open(adapter_cfg).read())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert not any((tmp_path / "ck").iterdir())   # a finished run leaves no checkpoint behind
    # a dense (structurally pruned) model merges as before: no mask taken, nothing re-zeroed
    assert run.data.tags[schema.TAG_FT_MASK_KEPT] == "false" and m[schema.M_FT_MASK_REZEROED] == 0
    assert m[schema.M_FT_BASE_SPARSITY] == m[schema.M_FT_MERGED_SPARSITY] == 0


def test_from_prune_run_links_the_source_and_evaluates_as_child(tracking_store, saved_tiny_model, text_file, tmp_path):
    from prune_entry import prune
    model_dir = saved_tiny_model("llama", 8, 2)
    assert prune.main(["--model", str(model_dir), "--method", "magnitude", "--pruning_ratio", "0.3",
                       "--calibration_dataset", str(text_file)]) == 0
    prune_run = last_run()
    eval_args = f"--tasks none --speed false --ppl_datasets {text_file} --ppl_seq_len 32"
    assert entry.main(args(prune_run.info.run_id, text_file, tmp_path / "ck", "--max_steps", "3",
                           "--eval_after", "true", "--eval_args", eval_args)) == 0
    client = MlflowClient()
    runs_ = client.search_runs([prune_run.info.experiment_id], order_by=["attributes.start_time ASC"])
    ft_run = next(r for r in runs_ if r.data.tags[schema.TAG_STAGE] == "finetune")
    tags = ft_run.data.tags
    assert tags[schema.TAG_SOURCE_RUN] == prune_run.info.run_id
    assert tags[schema.TAG_MODEL_ALIAS] == prune_run.data.tags[schema.TAG_MODEL_ALIAS]
    assert tags[schema.TAG_METHOD] == "magnitude" and tags[schema.TAG_FT_FORM] == "text"
    child = client.get_run(tags[schema.TAG_FT_EVAL_RUN])
    assert child.data.tags[schema.TAG_PARENT_RUN] == ft_run.info.run_id
    assert child.data.tags[schema.TAG_SOURCE_RUN] == ft_run.info.run_id
    assert child.info.status == "FINISHED" and ft_run.info.status == "FINISHED"


@pytest.mark.parametrize("extra,dataset,match", [
    ([], "bad", "lacks field 'output'"),
    ([], "empty", "empty"),
    (["--target_modules", "q,c_attn"], "ok", "c_attn not found"),
    (["--model_uri", "runs:/0123456789abcdef0123456789abcdef/pruned_model"], "ok", "could not fetch"),
    (["--model_uri", "no-such-model"], "ok", "unknown model"),
    (["--lora_r", "0"], "ok", "lora_r must be >= 1"),
    (["--seq_len", "1000"], "ok", "seq_len 1000 exceeds the model's 128 positions"),
    (["--template", "qa"], "ok", "template 'qa' does not fit instruction"),
    ([], "alpaca", "not reachable"),
    (["--resume", "true"], "ok", "no checkpoint"),
    (["--eval_after", "true", "--eval_args", "--bogus 1"], "ok", "unrecognized"),
    (["--no_such_flag", "1"], "ok", "unrecognized"),
    (["--keep_mask", "maybe"], "ok", "unknown keep_mask 'maybe'"),
    (["--data_dir", "/no/such/dir"], "ok", "is not a folder"),
])
def test_bad_input_exits_2_and_fails_the_run(tracking_store, pruned_dir, alpaca_file, tmp_path, capsys,
                                            extra, dataset, match):
    files = {"bad": tmp_path / "bad.jsonl", "empty": tmp_path / "empty.jsonl", "ok": alpaca_file}
    files["bad"].write_text(json.dumps({"instruction": "w1", "input": ""}))
    files["empty"].write_text("")
    argv = args(pruned_dir, files.get(dataset, dataset), tmp_path / "ck") + extra
    assert entry.main(argv) == 2
    assert "error:" in capsys.readouterr().err
    run = last_run()
    assert run.info.status == "FAILED"
    assert re.search(match, run.data.tags[schema.TAG_FAILURE])


def test_killed_run_resumes_from_its_last_checkpoint_in_a_new_run(
        tracking_store, pruned_dir, alpaca_file, tmp_path, monkeypatch):
    common = ["--epochs", "2", "--checkpoint_every", "2", "--lora_dropout", "0.1"]
    assert entry.main(args(pruned_dir, alpaca_file, tmp_path / "ref", *common)) == 0
    client = MlflowClient()
    ref = last_run(client)

    real = runs.log_metrics
    state = {"killed": False}

    def kill_at_step_5(metrics, step=None):
        if step == 5 and "train_loss" in metrics and not state["killed"]:
            state["killed"] = True
            raise KeyboardInterrupt
        real(metrics, step)
    monkeypatch.setattr(runs, "log_metrics", kill_at_step_5)
    assert entry.main(args(pruned_dir, alpaca_file, tmp_path / "ck", *common)) == 130
    killed = last_run(client)
    assert killed.info.status == "KILLED"
    assert entry.main(args(pruned_dir, alpaca_file, tmp_path / "ck", *common)) == 0
    resumed = last_run(client)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags[schema.TAG_FT_RESUMED_FROM] == killed.info.run_id
    assert resumed.data.tags[schema.TAG_FT_RESUMED_STEP] == "4"
    assert resumed.data.tags[schema.TAG_FT_CONFIG_KEY] == ref.data.tags[schema.TAG_FT_CONFIG_KEY]
    for key in ("train_loss", "lr", "val_loss"):
        assert history(client, resumed.info.run_id, key) == history(client, ref.info.run_id, key)



@pytest.mark.parametrize("argv,source,dataset,key", [
    # keys written by the entry point before the config tree (same settings -> same checkpoint dir)
    ([], (None, "demo", None, "demo", "demo"), "demo", "7a68f0b73451d536"),
    ("--lora_r 4 --lora_alpha 8 --learning_rate 5e-3 --epochs 2 --finetune_samples 10 --max_steps 7 "
     "--template alpaca --dtype float32 --seq_len 96 --gradient_checkpointing true --checkpoint_every 3 "
     "--progress false --train_on_prompt true --weight_decay 0.01 --target_modules attn".split(),
     ("/tmp/x", "runs:/abc/pruned_model", "abc", "/tmp/x", "Llama"), "alpaca", "7dcdbbbed88cd993"),
])
def test_config_key_is_stable_for_identical_settings(argv, source, dataset, key):
    local, name, run_id, load_from, alias = source
    src = entry.Source(store.Resolved(local, name, run_id), load_from, alias, {})
    assert ft.config_key(entry.trajectory_settings(entry.parse(argv), src, dataset)) == key
    moved = entry.parse(argv + ["--keep_mask", "false", "--checkpoint_dir", "/elsewhere", "--device", "cpu"])
    assert ft.config_key(entry.trajectory_settings(moved, src, dataset)) == key


@pytest.fixture
def sparse_dir(tmp_path):
    """A tiny Llama made 50% sparse (magnitude, per row) and saved as a normal checkpoint + tokenizer."""
    model = make_tiny_model("llama", 8, 2, layers=2)
    sparsify(model, None, SparsityConfig(method="magnitude_unstructured", sparsity=0.5), progress=False)
    out = tmp_path / "sparse"
    checkpoint.save_model(model, make_word_tokenizer(tmp_path / "tok"), out)
    return out, weight_masks(model)


@pytest.mark.parametrize("keep_mask", ["auto", "false"])
def test_sparse_model_keeps_its_zero_pattern_through_finetune_and_merge(
        tracking_store, sparse_dir, text_file, tmp_path, keep_mask):
    model_dir, masks = sparse_dir
    assert entry.main(args(model_dir, text_file, tmp_path / "ck", "--max_steps", "3", "--seq_len", "32",
                           "--keep_mask", keep_mask)) == 0
    client = MlflowClient()
    run = last_run(client)
    m, tags = run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED" and run.data.params["keep_mask"] == keep_mask
    assert m[schema.M_FT_BASE_SPARSITY] == pytest.approx(0.5, abs=0.01)
    local = store.download_artifact(run.info.run_id, schema.A_FINETUNED_MODEL, tmp_path / "dl")
    after = weight_masks(checkpoint.load_model(local))
    if keep_mask == "auto":   # detected as sparse: the mask is re-applied after the merge
        assert tags[schema.TAG_FT_MASK_KEPT] == "true"
        assert all(torch.equal(after[k], masks[k]) for k in masks)
        assert m[schema.M_FT_MERGED_SPARSITY] == m[schema.M_FT_BASE_SPARSITY]
        assert m[schema.M_FT_MASK_REZEROED] > 0 and schema.M_FT_VAL_LOSS_MERGED in m
    else:                     # the plain merge: W + s B A is dense again
        assert tags[schema.TAG_FT_MASK_KEPT] == "false"
        assert m[schema.M_FT_MERGED_SPARSITY] < 0.01 and m[schema.M_FT_MASK_REZEROED] == 0
        assert schema.M_FT_VAL_LOSS_MERGED not in m


def test_hub_dataset_from_a_local_copy_offline(tracking_store, pruned_dir, tmp_path, monkeypatch):
    """dataset=alpaca on a machine without the hub: the data dir's copy (fetch_data's layout)."""
    import datasets.config as dcfg
    import local_copies as lc
    monkeypatch.setattr(dcfg, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(dcfg, "HF_HUB_OFFLINE", True)
    lc.write_alpaca(tmp_path / "data")
    assert entry.main(args(pruned_dir, "alpaca", tmp_path / "ck", "--max_steps", "2", "--data_dir",
                           str(tmp_path / "data"), "--cache_dir", str(tmp_path / "hf"))) == 0
    run = last_run()
    assert run.info.status == "FINISHED" and run.data.tags[schema.TAG_FT_FORM] == "instruction"
    assert run.data.params[schema.P_FT_DATASET_SOURCE].startswith("yahma/alpaca-cleaned [train] (local copy")
    assert (run.data.metrics["train_examples"], run.data.metrics["val_examples"]) == (9, 1)
    protocol = run.data.params[schema.P_FT_VAL_PROTOCOL]   # what val_ppl is, beside eval's ppl
    assert "over the response tokens of the 1 held-out examples (val_fraction 0.05)" in protocol
    assert "template alpaca" in protocol and "not comparable to eval's ppl/<dataset>" in protocol
    where, sha = schema.data_params("yahma/alpaca-cleaned")
    assert run.data.params[where] == str(tmp_path / "data" / "yahma" / "alpaca-cleaned") and len(run.data.params[sha]) == 16
