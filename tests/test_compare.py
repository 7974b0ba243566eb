"""analysis.compare: report contents from eval runs in the store, and evaluating given models."""
import json
import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from analysis import compare
from prune_entry import compare as entry_compare
from gqaprune import data
from gqaprune.evaluation import zeroshot
from gqaprune.evaluation.speed import ModelFacts, SpeedResult
from prune_entry import evaluate
from tracking import runs, schema


@pytest.fixture(scope="module", autouse=True)
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare_store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("GQAPRUNE_CACHE", str(root / "cache"))
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        data.hub_reachable.cache_clear()
        yield root
    data.hub_reachable.cache_clear()


PROTO = "wiki [test], 128-token non-overlapping windows, BOS-prefixed"


def fake_eval(uri, ppl, piqa, hella_norm, params, disk_mb, prefill, decode, protocol=PROTO) -> str:
    """An eval run logged through the eval entry point's own logging functions."""
    raw = {"piqa": {"acc,none": piqa, "acc_norm,none": piqa + 0.01},
           "hellaswag": {"acc,none": hella_norm - 0.05, "acc_norm,none": hella_norm}}
    with runs.tracked_run(schema.STAGE_EVAL) as r:
        runs.log_params({"model_uri": uri, schema.P_ACC_CONVENTION: "literature", "num_fewshot": 0, "limit": None})
        evaluate.log_perplexity({"wiki": {"ppl": ppl, "nll": math.log(ppl), "tokens": 1000,
                                          "protocol_text": protocol}})
        evaluate.log_zeroshot(zeroshot.summarize(raw), "t")
        evaluate.log_speed(ModelFacts(params, 4 * params, int(disk_mb * 2**20)),
                           SpeedResult(prefill, decode, 1000 / decode, 500.0, 128, 64, 1, 3, "cpu", "float32"))
    return r.info.run_id


def rows_by_name(cmp):
    return {r["name"]: r for r in cmp["rows"]}


def test_report_from_stored_eval_runs(tmp_path, capsys):
    a = fake_eval("dense", 10.0, 0.70, 0.40, 1000, 2.0, 1000.0, 100.0)
    b = fake_eval("pruned", 12.5, 0.63, 0.38, 800, 1.6, 1250.0, 125.0)
    assert compare.main(["--original", a, "--pruned", b, "--labels", "dense,taylor20",
                         "--output_dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / schema.A_COMPARE_JSON).read_text())
    cmp = report["comparisons"][0]
    rows = rows_by_name(cmp)
    assert (cmp["original"], cmp["pruned"]) == ("dense", "taylor20")
    assert rows["ppl wiki"]["difference"] == pytest.approx(2.5)
    assert rows["ppl wiki"]["relative_pct"] == pytest.approx(25.0)
    assert rows["piqa (acc)"]["relative_pct"] == pytest.approx(-10.0)
    assert rows["hellaswag (acc_norm)"]["difference"] == pytest.approx(-0.02)
    assert rows["mean accuracy"]["original"] == pytest.approx(0.55)
    assert rows["mean accuracy"]["pruned"] == pytest.approx(0.505)
    assert rows["parameters"]["relative_pct"] == pytest.approx(-20.0)
    assert rows["decode tokens/s"]["relative_pct"] == pytest.approx(25.0)
    assert rows["latency ms/token"]["relative_pct"] == pytest.approx(-20.0)
    assert rows["weights in memory (MB)"]["original"] == pytest.approx(4000 / 2**20)
    assert "peak memory (MB)" not in rows                        # CPU: process RSS, not compared
    assert cmp["ppl_degradation"] == {"wiki": pytest.approx(1.25)}
    assert cmp["param_reduction"] == pytest.approx(0.2)
    assert cmp["warnings"] == []
    md = (tmp_path / schema.A_COMPARE_MD).read_text()
    assert "| ppl wiki | 10.0000 | 12.5000 | +2.5000 | +25.00% |" in md
    assert "| parameters | 1,000 | 800 | -200 | -20.00% |" in md
    assert f"- perplexity wiki: {PROTO}" in md
    out = capsys.readouterr().out
    assert "PPL degradation wiki: x1.250 (+25.0%)" in out and "parameter reduction: 20.00%" in out
    # The analysis run holds the reports and links the compared eval runs.
    runs.setup()
    client = MlflowClient()
    exp = client.get_experiment_by_name(schema.ANALYSIS_EXPERIMENT)
    run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert run.data.tags[schema.TAG_STAGE] == schema.STAGE_ANALYSIS and run.info.status == "FINISHED"
    assert run.data.tags[schema.TAG_COMPARED_RUNS] == f"{a},{b}"
    assert run.data.metrics["pruned_0/ppl_ratio/wiki"] == pytest.approx(1.25)
    assert {x.path for x in client.list_artifacts(run.info.run_id)} >= {
        schema.A_COMPARE_JSON, schema.A_COMPARE_MD, schema.A_COMPARE_FIG}


def test_different_protocols_are_flagged():
    a = fake_eval("dense", 10.0, 0.7, 0.4, 1000, 2.0, 1000.0, 100.0)
    b = fake_eval("pruned", 12.0, 0.6, 0.3, 800, 1.6, 1000.0, 100.0, protocol=PROTO.replace("128", "2048"))
    cmp = compare.compare(compare.summary_of_run(compare.store.get_run(a)),
                          compare.summary_of_run(compare.store.get_run(b)))
    assert rows_by_name(cmp)["ppl wiki"]["note"] == "protocols differ"
    assert cmp["warnings"][0].startswith("ppl wiki: protocols differ")
    assert "[protocols differ]" in compare.terminal_table(cmp)


def test_bad_inputs_exit_2(capsys):
    assert compare.main(["--original", "f" * 32, "--pruned", "e" * 32]) == 2
    assert "run 'ffffffffffffffffffffffffffffffff' not found" in capsys.readouterr().err
    assert compare.main(["--original", "x", "--pruned", "y", "--labels", "a"]) == 2
    assert compare.main(["--pruned", "y", "--no_such_flag", "1"]) == 2


# ---- evaluating models: a prune run's output against the model it was pruned from ----------

def save_tiny(out, intermediate):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", *"abcdefghijklmnopqrstuvwxyz.,"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=intermediate,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=128, bos_token_id=1, eos_token_id=2)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_compare_evaluates_models_from_a_prune_run(tmp_path):
    dense, small = save_tiny(tmp_path / "dense", 64), save_tiny(tmp_path / "small", 32)
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join("the cat sat on the mat, and the dog ran." for _ in range(30)))
    runs.setup()
    with runs.tracked_run(schema.STAGE_PRUNE, tags={schema.TAG_METHOD: "taylor"}) as prune:
        runs.log_params({"model": str(dense)})
        runs.log_dir(small, schema.A_PRUNED_MODEL)
    eval_flags = ["--tasks", "none", "--ppl_datasets", f"t={text}", "--ppl_seq_len", "16", "--speed", "false"]
    assert entry_compare.main(["--pruned", prune.info.run_id, "--output_dir", str(tmp_path / "rep"), *eval_flags]) == 0
    report = json.loads((tmp_path / "rep" / schema.A_COMPARE_JSON).read_text())
    assert report["original"]["model_uri"] == str(dense)          # found through the prune run
    assert report["pruned"][0]["source_run_id"] == prune.info.run_id
    n_dense = report["original"]["model"][schema.M_MODEL_PARAMS]
    n_small = report["pruned"][0]["model"][schema.M_MODEL_PARAMS]
    assert n_dense - n_small == 3 * 16 * 32                      # gate/up/down lost 32 channels
    assert report["comparisons"][0]["param_reduction"] == pytest.approx(1 - n_small / n_dense)
    # Both evaluations are nested eval runs of the analysis run, readable from the store.
    client = MlflowClient()
    children = [client.get_run(s["run_id"]) for s in [report["original"], *report["pruned"]]]
    parents = {c.data.tags[schema.TAG_PARENT_RUN] for c in children}
    assert len(parents) == 1 and all(c.data.tags[schema.TAG_STAGE] == "eval" for c in children)
    assert client.get_run(parents.pop()).data.tags[schema.TAG_STAGE] == schema.STAGE_ANALYSIS
