"""analysis.query / analysis.cross_model: joined results table and cross-model reports.

Most tests read a store of fabricated prune / finetune / eval runs, logged through tracking.runs
with the schema's names and tags exactly as the entry points log them; one test runs the real
prune and eval entry points on a tiny saved model.
"""
import math
import os
import uuid

import pytest
from mlflow.tracking import MlflowClient

from analysis import cross_model, query
from tracking import runs, schema

PROTO = "wiki [test], 128-token non-overlapping windows, BOS-prefixed"
PROTO_2048 = PROTO.replace("128", "2048")
MODELS = {  # alias -> (family, variant, path), as gqaprune.models' built-in aliases
    "Llama": ("Llama", "Base", "meta-llama/Meta-Llama-3-8B"),
    "Llama-Instruct": ("Llama", "Instruct", "meta-llama/Meta-Llama-3-8B-Instruct"),
    "Qwen": ("Qwen", "Base", "Qwen/Qwen2.5-7B"),
}


def model_tags(alias: str) -> dict:
    family, variant, path = MODELS[alias]
    return {schema.TAG_MODEL_ALIAS: alias, schema.TAG_MODEL_FAMILY: family,
            schema.TAG_MODEL_VARIANT: variant, schema.TAG_MODEL_PATH: path}


def prune_run(alias, method, ratio, *, fail=False, search=None, **params) -> str:
    """A prune run as prune_entry.prune logs it (tags, the params used here, two metrics)."""
    tags = {**model_tags(alias), schema.TAG_METHOD: method}
    if search:
        tags[schema.TAG_SEARCH_RUN] = search
    try:
        with runs.tracked_run(schema.STAGE_PRUNE, tags=tags) as r:
            runs.log_params({"model": alias, "method": method, schema.P_PRUNING_RATIO: ratio,
                             schema.P_RECONSTRUCT: "lstsq", "taylor_variant": "vector", "seed": 0,
                             "device": "auto", **params})
            runs.log_metrics({schema.M_ACHIEVED_RATIO: float(ratio) + 0.001,
                              schema.M_PARAMS_AFTER: 1000 * (1 - float(ratio))})
            if fail:
                raise RuntimeError("prune crashed after logging")
    except RuntimeError:
        pass
    return r.info.run_id


def finetune_run(prune_id: str, alias: str, lora_r: int = 8) -> str:
    """A finetune run: source_run_id -> the prune run, model/method tags copied from it."""
    tags = {**model_tags(alias), schema.TAG_METHOD: "taylor", schema.TAG_SOURCE_RUN: prune_id,
            schema.TAG_SOURCE_URI: prune_id}
    with runs.tracked_run(schema.STAGE_FINETUNE, tags=tags) as r:
        runs.log_params({"model_uri": prune_id, "lora_r": lora_r, "epochs": 1, "checkpoint_dir": "/tmp/x"})
        runs.log_metrics({schema.M_FT_VAL_LOSS_AFTER: 2.0})
    return r.info.run_id


def eval_run(alias, source=None, *, ppl=None, mean=None, piqa=None, protocol=PROTO, seq_len=128,
             fail=False) -> str:
    """An eval run as prune_entry.evaluate logs it (source_run_id set when it evaluated a run)."""
    tags = model_tags(alias)
    if source:
        tags[schema.TAG_SOURCE_RUN] = source
    params = {"model_uri": source or alias, schema.P_PPL_SEQ_LEN: seq_len, schema.P_NUM_FEWSHOT: 0,
              schema.P_ACC_CONVENTION: "literature", schema.P_LIMIT: None, "batch_size": 8,
              schema.P_PPL_RUN: "wiki", schema.P_PPL_PROTOCOL.format(dataset="wiki"): protocol}
    metrics = {schema.ppl_metric("wiki"): ppl, schema.M_MODEL_PARAMS: 1234}
    if mean is not None:
        params.update({schema.P_TASKS_RUN: "piqa,hellaswag", schema.P_TASK_MEASURES: "piqa=acc,hellaswag=acc_norm"})
        metrics.update({schema.M_ZS_MEAN: mean, schema.task_metric("piqa", "acc"): piqa,
                        schema.task_metric("hellaswag", "acc_norm"): 2 * mean - piqa})
    try:
        with runs.tracked_run(schema.STAGE_EVAL, tags=tags) as r:
            runs.log_params(params)
            runs.log_metrics(metrics)
            if fail:
                raise RuntimeError("eval crashed")
    except RuntimeError:
        pass
    return r.info.run_id


@pytest.fixture(scope="module")
def paper(_session_store):
    """Three models, dense / pruned / pruned+LoRA, a duplicated configuration, failed runs."""
    exp = f"paper-{uuid.uuid4().hex[:8]}"
    ids = {"experiment": exp}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", _session_store)
        mp.setenv("MLFLOW_EXPERIMENT_NAME", exp)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        ids["llama_dense"] = eval_run("Llama", ppl=10.0, mean=0.60, piqa=0.70)
        ids["llama_t2"] = prune_run("Llama", "taylor", 0.2)
        ids["llama_t2_eval"] = eval_run("Llama", ids["llama_t2"], ppl=12.5, mean=0.54, piqa=0.66)
        ids["llama_t4"] = prune_run("Llama", "taylor", 0.4)
        eval_run("Llama", ids["llama_t4"], ppl=20.0, mean=0.45, piqa=0.60)
        ids["llama_m2"] = prune_run("Llama", "magnitude", 0.2)
        eval_run("Llama", ids["llama_m2"], ppl=15.0, mean=0.48, piqa=0.62)
        ids["llama_ft"] = finetune_run(ids["llama_t2"], "Llama")
        ids["llama_ft_eval"] = eval_run("Llama", ids["llama_ft"], ppl=11.0, mean=0.57, piqa=0.68)
        eval_run("Llama-Instruct", ppl=8.0, mean=0.64, piqa=0.72)
        for ratio, ppl in ((0.2, 12.0), (0.4, 16.0)):
            eval_run("Llama-Instruct", prune_run("Llama-Instruct", "taylor", ratio), ppl=ppl, mean=0.5, piqa=0.6)
        eval_run("Qwen", ppl=5.0, mean=0.70, piqa=0.80)
        # the same configuration pruned twice (spelled differently) and evaluated twice: latest wins
        ids["qwen_old"] = eval_run("Qwen", prune_run("Qwen", "taylor", 0.2), ppl=7.0, mean=0.6, piqa=0.7)
        ids["qwen_prune"] = prune_run("Qwen", "taylor", ".20", seed="0.0", device="cpu")
        ids["qwen_new"] = eval_run("Qwen", ids["qwen_prune"], ppl=6.0, mean=0.63, piqa=0.75)
        # failed runs never reach a table: a failed eval, and an eval of a failed prune run
        ids["failed_eval"] = eval_run("Qwen", prune_run("Qwen", "magnitude", 0.2), ppl=99.0, fail=True)
        ids["failed_prune"] = prune_run("Qwen", "random", 0.2, fail=True)
        ids["eval_of_failed"] = eval_run("Qwen", ids["failed_prune"], ppl=50.0)
    return ids


def test_runs_frame_one_row_per_run(tracking_store, paper):
    frame = query.runs_frame([paper["experiment"]])
    assert len(frame) == 21 and set(frame["status"]) == {"FINISHED"}
    assert frame.columns[:5].tolist() == ["run_id", "stage", "status", "experiment", "start_time"]
    row = frame.set_index("run_id").loc[paper["llama_ft"]]
    assert (row["stage"], row["source_run_id"], row["model_alias"], row["family"], row["variant"]) == (
        "finetune", paper["llama_t2"], "Llama", "Llama", "Base")
    assert row["params.lora_r"] == "8" and row["metrics.val_loss_after"] == 2.0
    failed = query.runs_frame(paper["experiment"], include_failed=True)
    assert len(failed) == 23 and set(failed.loc[failed["status"] == "FAILED", "run_id"]) == {
        paper["failed_eval"], paper["failed_prune"]}


def test_results_table_joins_stages_and_keeps_latest(tracking_store, paper):
    notes = []
    table = query.results_table([paper["experiment"]], notes=notes)
    assert len(table) == 10
    key = table.set_index(["model_alias", "method", "pruning_ratio", "stage"])
    dense = key.loc[("Llama", "dense", 0.0, "dense")]
    assert (dense["ppl/wiki"], dense["achieved_ratio"], dense["reconstruct"], dense["params_after"]) == (10.0, 0.0, "-", 1234)
    pruned = key.loc[("Llama", "taylor", 0.2, "pruned")]
    assert (pruned["ppl/wiki"], pruned["prune_run_id"], pruned["eval_run_id"]) == (12.5, paper["llama_t2"], paper["llama_t2_eval"])
    assert pruned["achieved_ratio"] == pytest.approx(0.201) and pruned["params_after"] == pytest.approx(800)
    assert pruned["reconstruct"] == "lstsq" and pruned["family"] == "Llama" and pruned["variant"] == "Base"
    assert (pruned["zeroshot/mean_acc"], pruned["piqa/acc"], pruned["hellaswag/acc_norm"]) == pytest.approx((0.54, 0.66, 0.42))
    assert (pruned["ppl_seq_len"], pruned["num_fewshot"], pruned["acc_convention"]) == (128, "0", "literature")
    assert pruned["ppl_protocol/wiki"] == PROTO and pruned["task_measures"] == "piqa=acc,hellaswag=acc_norm"
    lora = key.loc[("Llama", "taylor", 0.2, "pruned+LoRA")]
    assert (lora["ppl/wiki"], lora["prune_run_id"], lora["finetune_run_id"], lora["eval_run_id"]) == (
        11.0, paper["llama_t2"], paper["llama_ft"], paper["llama_ft_eval"])
    assert sorted(table["stage"].unique()) == ["dense", "pruned", "pruned+LoRA"]
    qwen = key.loc[("Qwen", "taylor", 0.2, "pruned")]
    assert (qwen["ppl/wiki"], qwen["n_evals"], qwen["eval_run_id"], qwen["prune_run_id"]) == (
        6.0, 2, paper["qwen_new"], paper["qwen_prune"])
    assert key["n_evals"].drop(("Qwen", "taylor", 0.2, "pruned")).eq(1).all()
    # failed runs: neither the failed eval nor the eval of a failed prune run
    assert not {paper["failed_eval"], paper["eval_of_failed"], paper["qwen_old"]} & set(table["eval_run_id"])
    assert ("Qwen", "magnitude", 0.2, "pruned") not in key.index
    assert notes == [f"eval run {paper['eval_of_failed']} left out: its prune run {paper['failed_prune']} is FAILED"]
    # row order: family, Base before Instruct, dense first, method, ratio, stage
    assert table[["model_alias", "method", "pruning_ratio", "stage"]].head(5).values.tolist() == [
        ["Llama", "dense", 0.0, "dense"], ["Llama", "magnitude", 0.2, "pruned"], ["Llama", "taylor", 0.2, "pruned"],
        ["Llama", "taylor", 0.2, "pruned+LoRA"], ["Llama", "taylor", 0.4, "pruned"]]


def test_include_failed_keeps_failed_runs(tracking_store, paper):
    table = query.results_table(paper["experiment"], include_failed=True)
    assert {paper["failed_eval"], paper["eval_of_failed"]} <= set(table["eval_run_id"])


def test_pivot_values_and_relative_change(tracking_store, paper):
    table = query.results_table([paper["experiment"]])
    p = cross_model.pivot(table, "ppl/wiki")
    assert p.values.index.names == ["method", "pruning_ratio", "stage"]
    assert list(p.values.columns) == ["Llama", "Llama-Instruct", "Qwen"]
    assert p.values.index.tolist() == [("dense", 0.0, "dense"), ("magnitude", 0.2, "pruned"),
                                       ("taylor", 0.2, "pruned"), ("taylor", 0.2, "pruned+LoRA"),
                                       ("taylor", 0.4, "pruned")]
    expected = {("dense", 0.0, "dense"): [10.0, 8.0, 5.0], ("magnitude", 0.2, "pruned"): [15.0, None, None],
                ("taylor", 0.2, "pruned"): [12.5, 12.0, 6.0], ("taylor", 0.2, "pruned+LoRA"): [11.0, None, None],
                ("taylor", 0.4, "pruned"): [20.0, 16.0, None]}
    for row, vals in expected.items():
        got = [None if math.isnan(v) else v for v in p.values.loc[row]]
        assert got == vals, row
    assert p.relative.loc[("taylor", 0.2, "pruned")].tolist() == pytest.approx([25.0, 50.0, 20.0])
    assert p.relative.loc[("taylor", 0.2, "pruned+LoRA"), "Llama"] == pytest.approx(10.0)
    assert p.relative.loc[("dense", 0.0, "dense")].tolist() == [0.0, 0.0, 0.0]
    assert p.runs.loc[("taylor", 0.2, "pruned"), "Qwen"] == paper["qwen_new"]
    assert p.protocols == {"": PROTO}
    assert any("n_evals > 1" in n for n in p.notes)
    acc = cross_model.pivot(table, "zeroshot/mean_acc")
    assert acc.relative.loc[("taylor", 0.2, "pruned"), "Llama"] == pytest.approx(-10.0)
    assert "0-shot" in acc.protocols[""] and "piqa=acc,hellaswag=acc_norm" in acc.protocols[""]


def last_analysis_run():
    client = MlflowClient()
    exp = client.get_experiment_by_name(schema.ANALYSIS_EXPERIMENT)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]


def test_cli_writes_markdown_latex_csv_figures(tracking_store, paper, tmp_path, capsys):
    out = tmp_path / "reports"
    assert cross_model.main(["--experiments", paper["experiment"], "--metric", "ppl/wiki,zeroshot/mean_acc",
                             "--output_dir", str(out)]) == 0
    md = (out / "cross_model_ppl_wiki.md").read_text()
    assert "| method | ratio | stage | Llama | Llama-Instruct | Qwen |" in md
    assert "| taylor | 0.20 | pruned | 12.50 (+25.0%) | 12.00 (+50.0%) | 6.00 (+20.0%) |" in md
    assert "| taylor | 0.20 | pruned+LoRA | 11.00 (+10.0%) | – | – |" in md
    assert "| dense | 0.00 | dense | 10.00 | 8.00 | 5.00 |" in md
    assert f"Protocol: {PROTO}." in md and "Perplexity on wiki (lower is better)" in md
    tex = (out / "cross_model_ppl_wiki.tex").read_text()
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"taylor & 0.20 & pruned+LoRA & 11.00 (+10.0\%) & -- & -- \\" in tex
    assert r"method & pruning\_ratio" not in tex and r"method & ratio & stage & Llama & Llama-Instruct & Qwen \\" in tex
    assert "128-token non-overlapping windows, BOS-prefixed" in tex
    acc_md = (out / "cross_model_zeroshot_mean_acc.md").read_text()
    assert "| taylor | 0.20 | pruned | 0.5400 (-10.0%) |" in acc_md and "0-shot" in acc_md
    csv = (out / "cross_model_ppl_wiki.csv").read_text().splitlines()
    assert csv[0] == "method,pruning_ratio,stage,Llama,Llama-Instruct,Qwen" and "taylor,0.2,pruned,12.5,12.0,6.0" in csv
    assert "taylor,0.2,pruned,25.0,50.0,20.0" in (out / "cross_model_ppl_wiki_relative.csv").read_text()
    assert {"cross_model_ppl_wiki.png", "base_vs_instruct_ppl_wiki.png", "results_table.csv"} <= {
        f.name for f in out.iterdir()}
    printed = capsys.readouterr().out
    assert "== ppl/wiki ==" in printed and "12.50 (+25.0%)" in printed
    run = last_analysis_run()
    assert run.info.status == "FINISHED" and run.data.tags[schema.TAG_STAGE] == schema.STAGE_ANALYSIS
    logged = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"cross_model_ppl_wiki.md", "cross_model_ppl_wiki.tex", "cross_model_ppl_wiki.csv",
            "cross_model_ppl_wiki_relative.csv", "cross_model_ppl_wiki.png", "base_vs_instruct_ppl_wiki.png",
            "cross_model_zeroshot_mean_acc.md", schema.A_RESULTS_TABLE} <= logged
    assert paper["qwen_new"] in run.data.tags[schema.TAG_COMPARED_RUNS]


@pytest.mark.parametrize("argv, message", [
    (["--experiments", "no-such-experiment"], "unknown experiment(s) no-such-experiment"),
    (["--metric", "ppl/c4"], "no eval run in the selection has metric ppl/c4"),
    (["--no_such_flag", "1"], "unrecognized arguments"),
])
def test_bad_input_exit_2_and_failed_run(tracking_store, paper, capsys, argv, message):
    argv = argv if argv[0] == "--experiments" else ["--experiments", paper["experiment"], *argv]
    assert cross_model.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    if "metric" in message:
        assert "ppl/wiki" in err and "zeroshot/mean_acc" in err   # lists the available names
    run = last_analysis_run()
    assert run.info.status == "FAILED" and message in run.data.tags[schema.TAG_FAILURE]


def test_empty_store_is_a_user_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    assert cross_model.main([]) == 2
    assert "no finished eval runs in the store" in capsys.readouterr().err
    assert last_analysis_run().info.status == "FAILED"


def test_protocols_and_settings_split_rows(tracking_store):
    """Two ppl protocols never share a cell (relative change only within one); two taylor
    variants at the same ratio become a `setting` level, on every model's taylor rows."""
    exp = os.environ["MLFLOW_EXPERIMENT_NAME"]
    eval_run("Llama", ppl=10.0)
    eval_run("Llama", ppl=9.0, protocol=PROTO_2048, seq_len=2048)
    vec = prune_run("Llama", "taylor", 0.2)
    eval_run("Llama", vec, ppl=12.0)
    eval_run("Llama", vec, ppl=10.8, protocol=PROTO_2048, seq_len=2048)
    eval_run("Llama", prune_run("Llama", "taylor", 0.2, taylor_variant="element"), ppl=14.0)
    eval_run("Qwen", prune_run("Qwen", "taylor", 0.2), ppl=6.0)
    table = query.results_table([exp])
    assert sorted(table["setting"]) == ["", "", "taylor_variant=element", "taylor_variant=vector",
                                        "taylor_variant=vector", "taylor_variant=vector"]
    p = cross_model.pivot(table, "ppl/wiki")
    assert p.values.index.names == ["method", "pruning_ratio", "stage", "setting", "protocol"]
    assert p.protocols == {"P1": PROTO_2048, "P2": PROTO} or p.protocols == {"P1": PROTO, "P2": PROTO_2048}
    short = {v: k for k, v in p.protocols.items()}
    assert p.values.loc[("taylor", 0.2, "pruned", "taylor_variant=vector", short[PROTO]), "Llama"] == 12.0
    assert p.relative.loc[("taylor", 0.2, "pruned", "taylor_variant=vector", short[PROTO_2048]), "Llama"] == pytest.approx(20.0)
    assert p.relative.loc[("taylor", 0.2, "pruned", "taylor_variant=element", short[PROTO]), "Llama"] == pytest.approx(40.0)
    assert p.values.loc[("taylor", 0.2, "pruned", "taylor_variant=vector", short[PROTO]), "Qwen"] == 6.0
    assert math.isnan(p.relative.loc[("taylor", 0.2, "pruned", "taylor_variant=vector", short[PROTO]), "Qwen"])
    assert any("no dense eval for Qwen" in n for n in p.notes)
    md = cross_model.markdown(p)
    assert f"Protocol {short[PROTO_2048]}: {PROTO_2048}." in md


def test_source_runs_in_other_experiments_are_joined(tracking_store, monkeypatch):
    """An eval logged elsewhere (e.g. compare's nested evals) still finds its prune run; the
    sweep that made the prune run is named."""
    pid = prune_run("Qwen", "magnitude", 0.3, search="a" * 32)
    other = f"other-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", other)
    eid = eval_run("Qwen", pid, ppl=9.0)
    row = query.results_table([other]).iloc[0]
    assert (row["stage"], row["method"], row["pruning_ratio"], row["prune_run_id"], row["eval_run_id"]) == (
        "pruned", "magnitude", 0.3, pid, eid)
    assert row["search_run_id"] == "a" * 32


def test_latex_escapes_special_characters():
    assert cross_model.latex_escape("a_b 50% & #1 – x") == r"a\_b 50\% \& \#1 -- x"


def test_end_to_end_prune_finetune_eval_entry_points(tracking_store, saved_tiny_model, text_file, tmp_path):
    """The real entry points: dense eval, eval of a prune run, and finetune's eval_after child
    join into dense / pruned / pruned+LoRA rows."""
    from prune_entry import evaluate, finetune, prune
    model = saved_tiny_model("llama", 8, 2)
    exp = os.environ["MLFLOW_EXPERIMENT_NAME"]
    fast = ["--ppl_datasets", f"corpus={text_file}", "--ppl_seq_len", "16", "--tasks", "none",
            "--speed", "false", "--device", "cpu"]
    assert prune.main(["--model", str(model), "--method", "taylor", "--pruning_ratio", "0.25",
                       "--reconstruct", "none", "--calibration_dataset", str(text_file),
                       "--taylor_num_samples", "4", "--taylor_seq_len", "16", "--device", "cpu"]) == 0
    prune_row = query.runs_frame([exp]).iloc[-1]
    assert evaluate.main(["--model_uri", str(model), *fast]) == 0
    assert evaluate.main(["--model_uri", prune_row["run_id"], *fast]) == 0
    assert finetune.main(["--model_uri", prune_row["run_id"], "--dataset", str(text_file), "--max_steps", "2",
                          "--seq_len", "16", "--batch_size", "2", "--device", "cpu", "--checkpoint_dir",
                          str(tmp_path / "ckpt"), "--eval_after", "true", "--eval_args", " ".join(fast)]) == 0
    frame = query.runs_frame([exp]).set_index("run_id")
    evals = frame[frame["stage"] == "eval"]
    ft_id = frame.index[frame["stage"] == "finetune"][0]
    table = query.results_table([exp]).set_index("stage")
    assert list(table.index) == ["dense", "pruned", "pruned+LoRA"]
    pruned, dense, lora = table.loc["pruned"], table.loc["dense"], table.loc["pruned+LoRA"]
    assert (lora["prune_run_id"], lora["finetune_run_id"], lora["method"], lora["pruning_ratio"]) == (
        prune_row["run_id"], ft_id, "taylor", 0.25)
    assert lora["eval_run_id"] == MlflowClient().get_run(ft_id).data.tags[schema.TAG_FT_EVAL_RUN]
    assert pruned["prune_run_id"] == prune_row["run_id"] and pd_none(dense["prune_run_id"])
    assert (pruned["method"], pruned["pruning_ratio"], pruned["reconstruct"]) == ("taylor", 0.25, "none")
    assert pruned["achieved_ratio"] == prune_row["metrics.achieved_ratio"]
    assert pruned["params_after"] == prune_row["metrics.params_after"] < dense["params_after"]
    assert pruned["model_alias"] == dense["model_alias"] == model.name
    assert (pruned["family"], pruned["variant"]) == ("Llama", "Base")
    for row in (pruned, dense, lora):
        assert row["ppl/corpus"] == evals.loc[row["eval_run_id"], "metrics.ppl/corpus"]
        assert row["ppl_protocol/corpus"].startswith("corpus [test], 16-token non-overlapping windows, no BOS")
    p = cross_model.pivot(query.results_table([exp]), "ppl/corpus")
    assert p.relative.loc[("taylor", 0.25, "pruned"), model.name] == pytest.approx(
        100 * (pruned["ppl/corpus"] / dense["ppl/corpus"] - 1))


def pd_none(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def test_results_table_details_carry_prune_params_and_diagnosis(tracking_store):
    """details=True: the prune run's params (dict), its gradient diagnosis and the eval's ppl order."""
    pid = prune_run("Llama", "taylor", 0.2, taylor_seq_len=64)
    MlflowClient().log_metric(pid, schema.M_GRAD_NORM_RATIO, 3.5)
    eval_run("Llama", pid, ppl=12.0, mean=0.5, piqa=0.6)
    table = query.results_table(os.environ["MLFLOW_EXPERIMENT_NAME"], details=True)
    row = table.iloc[0]
    assert row[query.PRUNE_PARAMS]["taylor_seq_len"] == "64" and "model" not in row[query.PRUNE_PARAMS]
    assert row[schema.M_GRAD_NORM_RATIO] == 3.5 and pd_none(row[schema.M_GRAD_MEAN_RATIO])
    assert row[schema.P_PPL_RUN] == "wiki"
    assert schema.M_GRAD_NORM_RATIO not in query.metric_names(table)        # not a pivot metric
    assert query.PRUNE_PARAMS not in query.results_table(os.environ["MLFLOW_EXPERIMENT_NAME"])
