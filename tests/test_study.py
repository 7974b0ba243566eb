"""The study's answers: the one selection rule, search's best_config.json, analysis.consolidate,
the five analyses of analysis.cross_model, export / registry, MLflow models and dataset inputs.

Two stores:

* ``real`` (built once, in the session's store): the real ``search`` entry point on six tiny saved
  models registered as the six aliases (Llama / Qwen / Mistral x Base / Instruct) through a models
  file; taylor and magnitude at 25%, an offline zero-shot task + perplexity; then the same sweep for
  Llama alone (every point reused) and, in its own experiment, a structured and a sparsity method
  at the same ratio with every point claimed in the store (a claims-registry run). Every value the
  tools report is recomputed here from the runs themselves (MlflowClient), by the documented rule,
  not by the code under test.
* fabricated runs with controlled metrics (logged through tracking.runs exactly as the entry points
  log them), where the best of every model is known by construction: ties, missing metrics,
  several ratios, a LoRA stage, a Base without its Instruct.
"""
from __future__ import annotations

import json
import math
import os
import re
import uuid
from pathlib import Path
from statistics import mean, stdev

import mlflow
import pandas as pd
import pytest
from figure_layout import layout_problems
import yaml
from mlflow.tracking import MlflowClient

from analysis import consolidate, cross_model, figures, query, selection, study as study_mod, tables
from analysis.selection import Rule
from conftest import make_tiny_model, make_word_tokenizer
from prune_entry import evaluate, search
from tracking import claims, runs, schema, store

REPO = Path(__file__).resolve().parents[1]
ALIASES = {"Llama": ("Llama", "Base"), "Llama-Instruct": ("Llama", "Instruct"), "Qwen": ("Qwen", "Base"),
           "Qwen-Instruct": ("Qwen", "Instruct"), "Mistral": ("Mistral", "Base"),
           "Mistral-Instruct": ("Mistral", "Instruct")}
ACC, TASK = schema.M_ZS_MEAN, "c_continuation"
PPL = schema.ppl_metric("corpus")


# ------------------------------------------------------------------------------ the rule, by hand

def frame(rows):
    return pd.DataFrame(rows, columns=["model", "r", "acc", "ppl", "t"]).rename(
        columns={"acc": ACC, "ppl": "ppl/x", "t": "start"}).assign(**{schema.P_PPL_RUN: "x"})


def test_rule_highest_accuracy_ties_by_perplexity_then_first():
    f = frame([("a", 1, 0.5, 9.0, 1), ("a", 1, 0.6, 12.0, 2), ("a", 1, 0.6, 10.0, 3), ("a", 1, 0.6, 10.0, 4),
               ("b", 1, 0.7, 5.0, 1)])
    sel = selection.select(f, Rule(), ["model", "r"], order=["start"])
    a, b = sel.of(model="a"), sel.of(model="b")
    assert a.row["start"] == 3 and a.won_by == [ACC, "ppl/x"] and a.tied == 2 and a.candidates == 4
    assert b.row["start"] == 1 and b.won_by == [ACC] and b.candidates == 1
    assert any("2 configurations tied on every key" in n for n in sel.notes)


def test_rule_excludes_rows_without_the_metric_and_falls_back_to_perplexity():
    f = frame([("a", 1, None, 3.0, 1), ("a", 1, 0.4, 9.0, 2), ("b", 1, None, 8.0, 1), ("b", 1, None, 7.0, 2),
               ("c", 1, None, None, 1)])
    sel = selection.select(f, Rule(), ["model", "r"], order=["start"])
    a = sel.of(model="a")
    assert a.row["start"] == 2 and a.excluded == 1        # never best because its ACC is missing
    b = sel.of(model="b")                                  # no ACC at all in the group: perplexity
    assert b.row["start"] == 2 and b.fallback and b.won_by == ["ppl/x"]
    assert sel.of(model="c") is None and sel.missing[0][1] == f"no configuration has {ACC} or a perplexity"
    assert sel.excluded == 2 and any("2 configuration(s) without the deciding metric" in n for n in sel.notes)


def test_rule_override_and_a_metric_no_run_has():
    f = frame([("a", 1, 0.6, 12.0, 1), ("a", 1, 0.5, 8.0, 2)])
    assert selection.select(f, Rule.parse("ppl/x:min"), ["model"]).of(model="a").row["start"] == 2
    assert selection.select(f, Rule.parse("zeroshot/mean_acc:min"), ["model"]).of(model="a").row["start"] == 2
    none = selection.select(f, Rule.parse("ppl/nope:min"), ["model"])
    assert none.best == [] and "no configuration has ppl/nope" in none.notes[0]
    assert none.missing == [({"model": "a"}, "no configuration has ppl/nope (--select_by ppl/nope:min)")]
    with pytest.raises(Exception, match="is not <metric>:max or <metric>:min"):
        Rule.parse("ppl/x:lowest")


def test_best_tags_and_artifact_names_parse_back():
    tag = schema.best_run_tag("Llama-Instruct_0.2")
    assert tag == "best_run_id/Llama-Instruct_0.2" and schema.best_group_of(tag) == "Llama-Instruct_0.2"
    assert schema.best_group_of(schema.TAG_BEST_RUN) is None
    assert schema.study_artifact(schema.STUDY_BEST, "tex") == "study_best_configs.tex"
    assert schema.registered_model_name("Llama-Instruct") == "gqaprune-Llama-Instruct"
    assert schema.zeroshot_task_metrics("piqa=acc,hellaswag=acc_norm,x=None") == {
        "piqa": "piqa/acc", "hellaswag": "hellaswag/acc_norm"}


# ------------------------------------------------------------------------------ the real store

def corpus(path: Path) -> Path:
    import torch
    gen = torch.Generator().manual_seed(0)
    paras = [" ".join(f"w{i - 4}" for i in torch.randint(4, 97, (40,), generator=gen).tolist()) for _ in range(60)]
    path.write_text("\n\n".join(paras))
    return path


@pytest.fixture(scope="module")
def real(tmp_path_factory, _session_store):
    """Six tiny models as the six aliases, one search over all of them (real entry points)."""
    root = tmp_path_factory.mktemp("study")
    text = corpus(root / "corpus.txt")
    entries = {}
    for i, (alias, (family, variant)) in enumerate(ALIASES.items()):
        directory = root / alias
        make_tiny_model("llama", 8, 2, layers=2, seed=i).save_pretrained(directory)
        make_word_tokenizer(directory)
        entries[alias] = {"path": str(directory), "family": family, "variant": variant}
    models_file = root / "models.yaml"
    models_file.write_text(yaml.safe_dump(entries))
    tag = uuid.uuid4().hex[:6]
    uri, exp, sparse_exp = _session_store, f"study-{tag}", f"study-sparse-{tag}"
    prune_args = (f"--calibration_dataset {text} --taylor_seq_len 16 --taylor_num_samples 4 --batch_size 4 --reconstruct none "
                  f"--device cpu --models_file {models_file}")
    eval_args = (f"--ppl_datasets corpus={text} --ppl_seq_len 16 --tasks {TASK} --task_corpus c={text} "
                 f"--task_items 8 --task_choices 2 --speed false --device cpu")
    argv = ["--models", ",".join(ALIASES), "--methods", "taylor,magnitude", "--ratios", "0.25",
            "--prune_args", prune_args, "--eval", "true", "--eval_args", eval_args, "--eval_dense", "false"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_EXPERIMENT_NAME", exp)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            mp.setenv(var, "1")
        mp.setenv("GQAPRUNE_CACHE", os.environ.get("GQAPRUNE_CACHE", str(REPO / ".cache")))
        assert search.main(argv) == 0
        client = MlflowClient(uri)
        eid = client.get_experiment_by_name(exp).experiment_id
        first = client.search_runs([eid], f"tags.{schema.TAG_STAGE} = 'search'")[0]
        # the same sweep for one model: every point is reused; one (model, ratio) group -> best_run_id
        one = [*argv[:1], "Llama", *argv[2:]]
        assert search.main(one) == 0
        searches = client.search_runs([eid], f"tags.{schema.TAG_STAGE} = 'search'",
                                      order_by=["attributes.start_time ASC"])
        # its own experiment: a structured and a sparsity method at the same ratio 0.25, each point
        # claimed in the store first (a claims-registry run that analysis must ignore)
        mp.setenv("MLFLOW_EXPERIMENT_NAME", sparse_exp)
        sparse = ["--models", "Llama", "--methods", "magnitude,magnitude_unstructured", *argv[4:], "--claim_points", "true"]
        assert search.main(sparse) == 0
        sid = client.get_experiment_by_name(sparse_exp).experiment_id
        sparse_search = client.search_runs([sid], f"tags.{schema.TAG_STAGE} = 'search'")[0].info.run_id
    return {"uri": uri, "experiment": exp, "root": root, "text": text, "models_file": models_file,
            "search": first.info.run_id, "search_one": searches[-1].info.run_id, "eval_args": eval_args,
            "sparse_search": sparse_search, "sparse_experiment": sparse_exp}


@pytest.fixture
def in_real(real, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", real["uri"])
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", real["experiment"])
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(real["uri"])
    while mlflow.active_run():
        mlflow.end_run()
    return real


def truth(real) -> dict:
    """From the runs themselves: per alias its pruned candidates (eval run, prune run, ACC, PPL,
    start, params) and the best by the documented rule (highest ACC, lowest PPL, evaluated first)."""
    client = MlflowClient(real["uri"])
    eid = client.get_experiment_by_name(real["experiment"]).experiment_id
    evals = client.search_runs([eid], f"tags.{schema.TAG_STAGE} = 'eval' and attributes.status = 'FINISHED'")
    out = {a: [] for a in ALIASES}
    for e in evals:
        src = e.data.tags.get(schema.TAG_SOURCE_RUN)
        if not src or e.data.tags.get(schema.TAG_SEARCH_RUN) != real["search"]:
            continue        # the sweep's evals only (a later test evaluates a registered model)
        p = client.get_run(src)
        out[p.data.tags[schema.TAG_MODEL_ALIAS]].append(
            {"eval": e.info.run_id, "prune": src, "acc": e.data.metrics.get(ACC), "ppl": e.data.metrics[PPL],
             "start": e.info.start_time, "method": p.data.params[schema.P_METHOD],
             "task": e.data.metrics.get(schema.task_metric(TASK, "acc_norm")),
             "grad_norm_ratio": p.data.metrics.get(schema.M_GRAD_NORM_RATIO), "params": p.data.params})
    for alias, cands in out.items():
        ranked = sorted(cands, key=lambda c: (-round(c["acc"], 12), round(c["ppl"], 12), c["start"], c["eval"]))
        out[alias] = {"candidates": cands, "best": ranked[0], "ranked": ranked}
    return out


def test_search_best_config_matches_the_runs(in_real):
    t = truth(in_real)
    assert all(sorted(c["method"] for c in v["candidates"]) == ["magnitude", "taylor"] for v in t.values())
    doc = mlflow.artifacts.load_dict(f"runs:/{in_real['search']}/{schema.A_BEST_CONFIG}")
    assert doc[schema.P_SELECT_BY] == "auto" and "highest zeroshot/mean_acc" in doc[schema.P_SELECTION_RULE]
    assert len(doc["best"]) == 6 and doc["no_best"] == []
    tags = MlflowClient().get_run(in_real["search"]).data.tags
    assert schema.TAG_BEST_RUN not in tags                           # six groups: one tag per group
    for entry in doc["best"]:
        want = t[entry["model"]]["best"]
        assert (entry["prune_run_id"], entry["eval_run_id"]) == (want["prune"], want["eval"])
        assert tags[schema.best_run_tag(f"{entry['model']}_0.25")] == want["prune"]
        assert tags[schema.best_run_tag(f"{entry['model']}_0.25", eval_run=True)] == want["eval"]
        assert entry["metrics"][ACC] == want["acc"] and entry["metrics"][PPL] == want["ppl"]
        assert entry["metrics"][schema.task_metric(TASK, "acc_norm")] == want["task"]
        assert entry["method"] == want["method"] and entry[schema.P_PRUNING_RATIO] == 0.25
        assert entry["swept"] == {}                                  # nothing but the method varies
        assert entry["fixed"]["taylor_seq_len"] == 16 and entry["fixed"]["taylor_num_samples"] == 4
        assert entry["fixed"]["reconstruct"] == "none" and entry["fixed"]["calibration_dataset"] == str(in_real["text"])
        ranked = t[entry["model"]]["ranked"]
        tie = round(ranked[0]["acc"], 12) == round(ranked[1]["acc"], 12)
        assert entry["won_by"] == ([ACC, PPL] if tie else [ACC]) and entry["candidates"] == 2
        assert (entry["family"], entry["variant"]) == ALIASES[entry["model"]]
        assert entry["protocol"][ACC].startswith("0-shot") and "16-token" in entry["protocol"][PPL]
    one = MlflowClient().get_run(in_real["search_one"]).data.tags
    assert one[schema.TAG_BEST_RUN] == t["Llama"]["best"]["prune"]
    assert one[schema.TAG_BEST_EVAL_RUN] == t["Llama"]["best"]["eval"]


def test_search_summary_carries_tasks_and_diagnosis(in_real):
    path = mlflow.artifacts.download_artifacts(f"runs:/{in_real['search']}/{schema.A_SEARCH_SUMMARY}")
    frame = pd.read_csv(path)
    t = truth(in_real)
    by_eval = {c["eval"]: c for v in t.values() for c in v["candidates"]}
    task = schema.task_metric(TASK, "acc_norm")
    assert {task, schema.M_GRAD_NORM_RATIO, schema.M_GRAD_MEAN_RATIO, schema.M_NUM_EXTREME_LAYERS} <= set(frame)
    for _, row in frame[frame["method"] != "dense"].iterrows():
        c = by_eval[row["eval_run_id"]]
        assert row[task] == c["task"] and row[ACC] == c["acc"]
        if c["method"] == "taylor":
            assert row[schema.M_GRAD_NORM_RATIO] == c["grad_norm_ratio"] and row[schema.M_NUM_EXTREME_LAYERS] >= 0
        else:
            assert pd.isna(row[schema.M_GRAD_NORM_RATIO])
    md = mlflow.artifacts.load_text(f"runs:/{in_real['search']}/{schema.A_SEARCH_SUMMARY_MD}")
    assert "## Best configuration" in md and t["Qwen"]["best"]["prune"] in md


def latex_balanced(tex: str) -> None:
    assert tex.count(r"\begin{table}") == tex.count(r"\end{table}") == 1
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 1
    assert tex.index(r"\toprule") < tex.index(r"\midrule") < tex.index(r"\bottomrule")
    assert tex.replace(r"\{", "").replace(r"\}", "").count("{") == tex.replace(r"\{", "").replace(r"\}", "").count("}")
    spec = re.search(r"\\begin\{tabular\}\{([lr]+)\}", tex).group(1)
    body = tex[tex.index(r"\toprule"):tex.index(r"\bottomrule")]
    rows = [ln for ln in body.splitlines() if ln.endswith(r"\\") and "multicolumn" not in ln]
    assert rows and all(len(re.split(r"(?<!\\)&", ln)) == len(spec) for ln in rows)


def test_cross_model_five_analyses_match_the_runs(in_real, tmp_path):
    out = tmp_path / "reports"
    assert cross_model.main(["--experiments", in_real["experiment"], "--output_dir", str(out)]) == 0
    t = truth(in_real)
    doc = json.loads((out / schema.A_ANALYSIS_SUMMARY).read_text())
    # 1. best per model: the same configuration search chose, by the same rule
    bests = {b["model"]: b for b in doc[schema.STUDY_BEST]}
    assert set(bests) == set(ALIASES)
    for alias, b in bests.items():
        assert (b["prune_run_id"], b["eval_run_id"]) == (t[alias]["best"]["prune"], t[alias]["best"]["eval"])
    # 2. Base vs Instruct: deltas of the bests and over the three matched configurations
    for row in doc[schema.STUDY_BASE_INSTRUCT]:
        fam = row["family"]
        base, instr = t[fam]["best"], t[f"{fam}-Instruct"]["best"]
        assert row["ΔACC"] == pytest.approx(instr["acc"] - base["acc"], abs=1e-12)
        assert row["ΔPPL"] == pytest.approx(instr["ppl"] - base["ppl"], abs=1e-12)
        assert row["ΔPPL %"] == pytest.approx(100 * (instr["ppl"] - base["ppl"]) / base["ppl"])
        pairs = {c["method"]: c for c in t[fam]["candidates"]}
        pairs = [(pairs[c["method"]], c) for c in sorted(t[f"{fam}-Instruct"]["candidates"], key=lambda c: c["method"])]
        d_ppl = [i["ppl"] - b["ppl"] for b, i in pairs]
        d_acc = [i["acc"] - b["acc"] for b, i in pairs]
        assert row["matched"] == 2 and row["missing"] is None
        assert row["mean ΔPPL"] == pytest.approx(mean(d_ppl)) and row["sd ΔPPL"] == pytest.approx(stdev(d_ppl))
        assert row["mean ΔACC"] == pytest.approx(mean(d_acc)) and row["sd ΔACC"] == pytest.approx(stdev(d_acc))
    assert sorted(r["family"] for r in doc[schema.STUDY_BASE_INSTRUCT]) == ["Llama", "Mistral", "Qwen"]
    # 3. method preference: wins add up to the six models; counts and mean ranks from the runs
    prefs = {r["method"]: r for r in doc[schema.STUDY_METHODS]}
    winners = [t[a]["best"]["method"] for a in ALIASES]
    for method in ("taylor", "magnitude"):
        assert prefs[method]["wins"] == winners.count(method) and prefs[method]["models"] == 6
    ranks = {"taylor": [], "magnitude": []}
    for a in ALIASES:
        order = list(dict.fromkeys(c["method"] for c in t[a]["ranked"]))
        for m in ranks:
            ranks[m].append(order.index(m) + 1)
    assert prefs["taylor"]["mean rank"] == pytest.approx(mean(ranks["taylor"]))
    assert prefs["magnitude"]["mean rank"] == pytest.approx(mean(ranks["magnitude"]))
    # 4. winning parameter values: nothing but the method was swept here (the fabricated store
    # below checks the counts)
    assert doc[schema.STUDY_PARAMS] == [] and doc["swept"] == {"magnitude": [], "taylor": []}
    # 5. family comparison: mean of the two variants' bests
    for row in doc[schema.STUDY_FAMILIES]:
        fam = row["family"]
        assert row["models"] == 2 and row["variants"] == "Base+Instruct"
        assert row["mean best PPL"] == pytest.approx(mean([t[fam]["best"]["ppl"], t[f"{fam}-Instruct"]["best"]["ppl"]]))
        assert row["mean best ACC"] == pytest.approx(mean([t[fam]["best"]["acc"], t[f"{fam}-Instruct"]["best"]["acc"]]))
    assert doc["counts"] == {"models": 6, "models_with_best": 6, "candidates": 12, "excluded": 0}
    # every analysis: md / tex / csv, LaTeX balanced; every figure: png + pdf, not empty
    for name in schema.STUDY_ANALYSES:
        for ext in ("md", "tex", "csv"):
            assert (out / schema.study_artifact(name, ext)).stat().st_size > 0
        latex_balanced((out / schema.study_artifact(name, "tex")).read_text())
    for name in schema.STUDY_FIGURES:
        for ext in ("png", "pdf"):
            assert (out / schema.study_figure(name, ext)).stat().st_size > 1000
    csv = pd.read_csv(out / schema.study_artifact(schema.STUDY_BEST, "csv"))
    assert list(csv["model"]) == ["Llama", "Llama-Instruct", "Mistral", "Mistral-Instruct", "Qwen", "Qwen-Instruct"]
    run = MlflowClient().search_runs([MlflowClient().get_experiment_by_name(schema.ANALYSIS_EXPERIMENT).experiment_id],
                                     order_by=["attributes.start_time DESC"], max_results=1)[0]
    logged = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {schema.A_ANALYSIS_SUMMARY, schema.study_figure(schema.FIG_KEPT, "pdf"),
            schema.study_artifact(schema.STUDY_METHODS, "tex")} <= logged
    assert run.data.params[schema.P_SELECT_BY] == "auto" and run.data.metrics[schema.M_STUDY_CANDIDATES] == 12


def test_consolidate_one_model_and_all(in_real, tmp_path, capsys):
    out = tmp_path / "one"
    assert consolidate.main(["--model", "Qwen-Instruct", "--experiments", in_real["experiment"],
                             "--output_dir", str(out)]) == 0
    t = truth(in_real)["Qwen-Instruct"]
    best = json.loads((out / schema.A_GLOBAL_BEST_CONFIG).read_text())["best"]
    assert len(best) == 1 and best[0]["prune_run_id"] == t["best"]["prune"]
    comp = json.loads((out / schema.A_METHOD_COMPARISON).read_text())
    rows = {r["method"]: r for r in comp["methods"]}
    for method in ("taylor", "magnitude"):
        own = [c for c in t["candidates"] if c["method"] == method]
        mine = sorted(own, key=lambda c: (-c["acc"], c["ppl"], c["start"]))[0]
        assert rows[method]["n"] == len(own) and rows[method]["best ACC"] == mine["acc"]
        assert rows[method]["mean PPL"] == pytest.approx(mean(c["ppl"] for c in own))
        assert rows[method]["best PPL"] == mine["ppl"]
        if len(own) > 1:
            assert rows[method]["sd ACC"] == pytest.approx(stdev(c["acc"] for c in own))
        else:
            assert rows[method]["sd ACC"] is None
    results = pd.read_csv(out / f"{schema.A_MODEL_RESULTS}.csv")
    assert len(results) == 2 and results.loc[results["rank"] == 1, "prune run"].item() == t["best"]["prune"]
    assert list(results.sort_values("rank")["eval run"]) == [c["eval"] for c in t["ranked"]]
    assert schema.task_metric(TASK, "acc_norm") in results and schema.M_GRAD_NORM_RATIO in results
    latex_balanced((out / f"{schema.A_METHOD_TABLE}.tex").read_text())
    assert "global best of Qwen-Instruct at ratio 0.25" in capsys.readouterr().out
    every = tmp_path / "all"
    assert consolidate.main(["--all", "true", "--experiments", in_real["experiment"], "--output_dir", str(every)]) == 0
    for alias in ALIASES:
        doc = json.loads((every / alias / schema.A_GLOBAL_BEST_CONFIG).read_text())
        assert doc["best"][0]["prune_run_id"] == truth(in_real)[alias]["best"]["prune"]


def test_export_register_and_models_uri(in_real, tmp_path):
    from transformers import AutoModelForCausalLM

    from gqaprune import checkpoint
    t = truth(in_real)
    export = tmp_path / "best"
    args = ["--experiments", in_real["experiment"], "--metric", PPL]
    assert cross_model.main([*args, "--export_best", str(export), "--register", "true"]) == 0
    llama = export / "Llama"
    assert (llama / schema.A_PLAN).is_file() and (llama / schema.A_EVAL_RESULTS).is_file()
    assert json.loads((llama / schema.A_BEST_CONFIG).read_text())["best"][0]["prune_run_id"] == t["Llama"]["best"]["prune"]
    model = checkpoint.load_model(llama / schema.A_PRUNED_MODEL)
    AutoModelForCausalLM.from_pretrained(llama / schema.A_PRUNED_MODEL, trust_remote_code=True)
    params = MlflowClient().get_run(t["Llama"]["best"]["prune"]).data.metrics[schema.M_PARAMS_AFTER]
    assert sum(p.numel() for p in model.parameters()) == params
    client = MlflowClient()
    v1 = client.get_model_version(schema.registered_model_name("Llama"), "1")
    assert v1.run_id == t["Llama"]["best"]["prune"] and v1.tags[schema.P_METHOD] == t["Llama"]["best"]["method"]
    assert float(v1.tags[PPL]) == pytest.approx(t["Llama"]["best"]["ppl"], rel=1e-5)
    cross_model.register_best(study_mod.load([in_real["experiment"]]))   # what each --register call does
    assert client.get_model_version(schema.registered_model_name("Llama"), "2").run_id == v1.run_id
    resolved = store.resolve_model_source(f"models:/{schema.registered_model_name('Llama')}/2")
    assert resolved.source_run_id == v1.run_id and (Path(resolved.local_path) / "config.json").is_file()
    # models:/<name>/<version> evaluates, and the eval is linked to the prune run
    eval_args = in_real["eval_args"].replace(f"--tasks {TASK}", "--tasks none").split()
    assert evaluate.main(["--model_uri", f"models:/{schema.registered_model_name('Llama')}/1", *eval_args]) == 0
    exp = client.get_experiment_by_name(in_real["experiment"]).experiment_id
    last = client.search_runs([exp], order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert last.data.tags[schema.TAG_SOURCE_RUN] == t["Llama"]["best"]["prune"]
    assert last.data.metrics[PPL] == pytest.approx(t["Llama"]["best"]["ppl"], rel=1e-6)


def test_pruned_model_is_an_mlflow_model_and_data_are_dataset_inputs(in_real):
    import hashlib

    import torch
    from transformers import AutoModelForCausalLM

    from gqaprune import checkpoint, data
    from gqaprune.loading import load_model_and_tokenizer, resolve_model
    best = next(c for c in truth(in_real)["Mistral"]["candidates"] if c["method"] == "taylor")
    logged = store.logged_model_of_run(best["prune"], schema.A_PRUNED_MODEL)
    assert logged is not None and logged.params["taylor_seq_len"] == "16"
    assert store.model_artifact_of_run(best["prune"]) == schema.A_PRUNED_MODEL
    local = mlflow.artifacts.download_artifacts(f"runs:/{best['prune']}/{schema.A_PRUNED_MODEL}")
    assert (Path(local) / "MLmodel").is_file() and (Path(local) / "config.json").is_file()
    ours, hf = checkpoint.load_model(local), AutoModelForCausalLM.from_pretrained(local, trust_remote_code=True)
    ids = torch.randint(4, 97, (1, 8))
    torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=0, atol=0)
    assert isinstance(mlflow.pyfunc.load_model(f"models:/{logged.model_id}").predict(["w1 w2"]), list)
    run = MlflowClient().get_run(best["prune"])
    inputs = {d.tags[0].value if d.tags else None: d.dataset for d in run.inputs.dataset_inputs}
    calib = inputs[schema.CTX_CALIBRATION]
    spec = resolve_model("Mistral", str(in_real["models_file"]))
    _, tok = load_model_and_tokenizer(spec, torch.float32, torch.device("cpu"))
    n = int(run.data.params["taylor_num_samples"])
    windows = data.calibration_batches(tok, str(in_real["text"]), n, 16, 0)
    assert calib.name == "corpus.txt" and calib.source_type == "local"
    assert calib.digest == hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()[:36]
    ev = MlflowClient().get_run(best["eval"]).inputs.dataset_inputs
    names = {d.dataset.name: d.dataset for d in ev}
    stream = data.eval_stream(tok, str(in_real["text"]), "test")
    assert names["corpus.txt"].digest == hashlib.sha256(stream.to(torch.int64).numpy().tobytes()).hexdigest()[:36]
    assert TASK in names and names[TASK].source_type == "local"


# ------------------------------------------------------------------------------ fabricated runs

PROTO = "wiki [test], 128-token non-overlapping windows, BOS-prefixed"
SECRET_URL = "https://alice:hunter2pw@data.example/c.txt"   # a data source with credentials in it


def _tags(alias: str) -> dict:
    family, variant = ALIASES[alias]
    return {schema.TAG_MODEL_ALIAS: alias, schema.TAG_MODEL_FAMILY: family, schema.TAG_MODEL_VARIANT: variant,
            schema.TAG_MODEL_PATH: f"org/{alias}"}


def fake_prune(alias, method, ratio, **params) -> str:
    with runs.tracked_run(schema.STAGE_PRUNE, tags={**_tags(alias), schema.TAG_METHOD: method}) as r:
        runs.log_params({schema.P_MODEL: alias, schema.P_METHOD: method, schema.P_PRUNING_RATIO: ratio,
                         "taylor_seq_len": 128, "taylor_num_samples": 128, "reconstruct": "none",
                         "calibration_dataset": SECRET_URL, **params})
        runs.log_metrics({schema.M_ACHIEVED_RATIO: ratio, schema.M_PARAMS_AFTER: 1000 * (1 - ratio)})
        layers = [{"kept_kv_groups": [0], "kept_channels": list(range(3 + i))} for i in range(3)]
        runs.log_json({"original": [{"n_kv": 2, "intermediate": 6}] * 3, "layers": layers}, schema.A_PLAN)
    return r.info.run_id


def fake_eval(alias, source=None, *, ppl, acc=None, stage=schema.STAGE_EVAL) -> str:
    tags = {**_tags(alias), **({schema.TAG_SOURCE_RUN: source} if source else {})}
    params = {schema.P_MODEL_URI: source or alias, schema.P_PPL_SEQ_LEN: 128, schema.P_NUM_FEWSHOT: 0,
              schema.P_ACC_CONVENTION: "literature", schema.P_PPL_RUN: "wiki",
              schema.P_PPL_PROTOCOL.format(dataset="wiki"): PROTO}
    metrics = {schema.ppl_metric("wiki"): ppl}
    if acc is not None:
        params.update({schema.P_TASKS_RUN: "piqa", schema.P_TASK_MEASURES: "piqa=acc"})
        metrics.update({ACC: acc, schema.task_metric("piqa", "acc"): acc})
    with runs.tracked_run(stage, tags=tags) as r:
        runs.log_params(params)
        runs.log_metrics(metrics)
    return r.info.run_id


def fake_finetune(prune_id, alias) -> str:
    with runs.tracked_run(schema.STAGE_FINETUNE, tags={**_tags(alias), schema.TAG_SOURCE_RUN: prune_id}) as r:
        runs.log_params({schema.P_MODEL_URI: prune_id, "lora_r": 8})
    return r.info.run_id


def point(alias, method, ratio, ppl, acc, **params):
    pid = fake_prune(alias, method, ratio, **params)
    return pid, fake_eval(alias, pid, ppl=ppl, acc=acc)


@pytest.fixture(scope="module")
def known(_session_store):
    """Controlled metrics: the best of every group is known by construction."""
    exp = f"known-{uuid.uuid4().hex[:8]}"
    ids = {"experiment": exp}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", _session_store)
        mp.setenv("MLFLOW_EXPERIMENT_NAME", exp)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        for alias in ("Llama", "Llama-Instruct", "Qwen", "Qwen-Instruct", "Mistral"):
            fake_eval(alias, ppl=5.0, acc=0.7)                               # dense baselines
        # Llama: an ACC tie between two taylor configurations; the lower PPL (seq 64) wins
        ids["L_t64"] = point("Llama", "taylor", 0.2, 8.0, 0.60, taylor_seq_len=64)
        ids["L_t32"] = point("Llama", "taylor", 0.2, 9.0, 0.60, taylor_seq_len=32)
        ids["L_b"] = point("Llama", "blockwise", 0.2, 7.0, 0.55, taylor_seq_len=64)
        ids["L_t64_r4"] = point("Llama", "taylor", 0.4, 20.0, 0.40, taylor_seq_len=64)   # its own ratio
        ids["L_b_r4"] = point("Llama", "blockwise", 0.4, 18.0, 0.45, taylor_seq_len=32)
        ft = fake_finetune(ids["L_t32"][0], "Llama")                         # pruned+LoRA: its own stage
        ids["L_lora"] = (ids["L_t32"][0], fake_eval("Llama", ft, ppl=7.5, acc=0.62), ft)
        # Llama-Instruct: the same three configurations (matched)
        ids["LI_t64"] = point("Llama-Instruct", "taylor", 0.2, 7.0, 0.64, taylor_seq_len=64)
        ids["LI_t32"] = point("Llama-Instruct", "taylor", 0.2, 6.0, 0.66, taylor_seq_len=32)
        ids["LI_b"] = point("Llama-Instruct", "blockwise", 0.2, 6.5, 0.50, taylor_seq_len=64)
        # Qwen: the highest-PPL-free config has no ACC (excluded); blockwise wins on ACC
        ids["Q_noacc"] = point("Qwen", "taylor", 0.2, 4.0, None, taylor_seq_len=32)
        ids["Q_t"] = point("Qwen", "taylor", 0.2, 6.0, 0.50, taylor_seq_len=64)
        ids["Q_b"] = point("Qwen", "blockwise", 0.2, 9.0, 0.58, taylor_seq_len=64)
        ids["QI_t"] = point("Qwen-Instruct", "taylor", 0.2, 5.0, 0.61, taylor_seq_len=64)
        # Mistral: Base only (no Instruct model in the store)
        ids["M_t"] = point("Mistral", "taylor", 0.2, 10.0, 0.52, taylor_seq_len=32)
    return ids


@pytest.fixture
def in_known(known, tracking_store, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", known["experiment"])
    return known


def known_study(known, rule=Rule()):
    return study_mod.load([known["experiment"]], rule=rule)


def test_known_bests_per_model_ratio_and_stage(in_known):
    s = known_study(in_known)
    got = {(b.row[study_mod.MODEL], b.group[query.RATIO], b.group["stage"]): b for b in s.selection.best}
    assert {k: v.row["eval_run_id"] for k, v in got.items()} == {
        ("Llama", 0.2, "pruned"): in_known["L_t64"][1], ("Llama", 0.4, "pruned"): in_known["L_b_r4"][1],
        ("Llama", 0.2, "pruned+LoRA"): in_known["L_lora"][1], ("Llama-Instruct", 0.2, "pruned"): in_known["LI_t32"][1],
        ("Qwen", 0.2, "pruned"): in_known["Q_b"][1], ("Qwen-Instruct", 0.2, "pruned"): in_known["QI_t"][1],
        ("Mistral", 0.2, "pruned"): in_known["M_t"][1]}
    llama = got[("Llama", 0.2, "pruned")]
    assert llama.won_by == [ACC, schema.ppl_metric("wiki")] and llama.tied == 1 and llama.candidates == 3
    qwen = got[("Qwen", 0.2, "pruned")]
    assert qwen.excluded == 1 and qwen.candidates == 2 and s.selection.excluded == 1
    cfg = study_mod.best_config(s, llama).to_dict()
    assert cfg["swept"] == {"taylor_seq_len": 64} and cfg["fixed"]["taylor_num_samples"] == 128
    assert cfg["metrics"][ACC] == 0.60 and cfg["metrics"][schema.ppl_metric("wiki")] == 8.0


def test_known_five_analyses(in_known):
    s = known_study(in_known)
    t = study_mod.analyses(s)
    best = t[schema.STUDY_BEST].frame
    assert list(best["model"][best["ratio"] == 0.2][best["stage"] == "pruned"]) == [
        "Llama", "Llama-Instruct", "Mistral", "Qwen", "Qwen-Instruct"]
    assert best.loc[(best["model"] == "Llama") & (best["ratio"] == 0.2) & (best["stage"] == "pruned"),
                    "taylor_seq_len"].item() == "64"
    bi = t[schema.STUDY_BASE_INSTRUCT].frame.set_index(["family", "ratio", "stage"])
    llama = bi.loc[("Llama", 0.2, "pruned")]
    assert (llama["ACC Base"], llama["ACC Instruct"]) == (0.60, 0.66)
    assert llama["ΔACC"] == pytest.approx(0.06) and llama["ΔACC %"] == pytest.approx(10.0)
    assert llama["ΔPPL"] == pytest.approx(-2.0) and llama["ΔPPL %"] == pytest.approx(-25.0)
    # matched: taylor 64 (+0.04, -1), taylor 32 (+0.06, -3), blockwise 64 (-0.05, -0.5)
    assert llama["matched"] == 3
    assert llama["mean ΔACC"] == pytest.approx(mean([0.04, 0.06, -0.05]))
    assert llama["sd ΔACC"] == pytest.approx(stdev([0.04, 0.06, -0.05]))
    assert llama["mean ΔPPL"] == pytest.approx(mean([-1.0, -3.0, -0.5]))
    qwen = bi.loc[("Qwen", 0.2, "pruned")]
    assert qwen["ΔACC"] == pytest.approx(0.03) and qwen["matched"] == 1 and math.isnan(qwen["sd ΔACC"])
    assert qwen["mean ΔACC"] == pytest.approx(0.11)                  # the matched taylor-64 pair
    mistral = bi.loc[("Mistral", 0.2, "pruned")]
    assert math.isnan(mistral["ΔACC"]) and mistral["missing"] == "no Instruct model of family Mistral in the store"
    lr4 = bi.loc[("Llama", 0.4, "pruned")]
    assert math.isnan(lr4["ΔACC"]) and lr4["missing"] == "Llama-Instruct has no finished pruned eval at ratio 0.4"
    assert any("delta missing" in n for n in t[schema.STUDY_BASE_INSTRUCT].notes)
    prefs = t[schema.STUDY_METHODS].frame
    p2 = prefs[(prefs["ratio"] == 0.2) & (prefs["stage"] == "pruned")].set_index("method")
    assert p2.loc["taylor", "wins"] == 4 and p2.loc["blockwise", "wins"] == 1
    assert p2.loc["taylor", "models"] == 5 and p2.loc["blockwise", "models"] == 3
    assert p2.loc["blockwise", "mean rank"] == pytest.approx(mean([2, 2, 1]))
    assert p2.loc["taylor", "mean rank"] == pytest.approx(mean([1, 1, 2, 1, 1]))
    params = t[schema.STUDY_PARAMS].frame
    p2 = params[(params["ratio"] == 0.2) & (params["stage"] == "pruned")]
    assert dict(zip(p2["value"], p2["count"])) == {"32": 2, "64": 3} and set(p2["of"]) == {5}
    fam = t[schema.STUDY_FAMILIES].frame.set_index(["family", "ratio", "stage"])
    assert fam.loc[("Llama", 0.2, "pruned"), "mean best ACC"] == pytest.approx(0.63)
    assert fam.loc[("Qwen", 0.2, "pruned"), "mean best PPL"] == pytest.approx(7.0)
    assert fam.loc[("Mistral", 0.2, "pruned"), "models"] == 1
    for table in t.values():
        latex_balanced(tables.latex(table))


def test_select_by_override_changes_the_best(in_known):
    s = known_study(in_known, Rule.parse("ppl/wiki:min"))
    llama = s.best_of("org/Llama", 0.2, "pruned")
    assert llama.row["eval_run_id"] == in_known["L_b"][1] and llama.won_by == [schema.ppl_metric("wiki")]
    qwen = s.best_of("org/Qwen", 0.2, "pruned")
    assert qwen.row["eval_run_id"] == in_known["Q_noacc"][1] and qwen.excluded == 0


def test_select_by_a_metric_no_run_has_gives_partial_results(in_known, tmp_path, capsys):
    out = tmp_path / "r"
    code = cross_model.main(["--experiments", in_known["experiment"], "--select_by", "ppl/c4:min",
                             "--metric", "ppl/wiki", "--output_dir", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "no configuration has ppl/c4 (--select_by ppl/c4:min): no best is chosen" in printed
    assert (out / "cross_model_ppl_wiki.md").is_file()                      # the pivots are still there
    doc = json.loads((out / schema.A_ANALYSIS_SUMMARY).read_text())
    assert doc[schema.STUDY_BEST] == [] and len(doc["no_best"]) == 7
    assert "(no rows)" in (out / schema.study_artifact(schema.STUDY_BEST, "md")).read_text()
    # every prune run read data from a URL with credentials: no report repeats them
    written = {p.name: p.read_text() for p in out.iterdir() if p.suffix in (".csv", ".json", ".md", ".tex")}
    assert not [n for n, text in written.items() if "hunter2pw" in text] and "hunter2pw" not in printed
    assert "https://***@data.example/c.txt" in written[schema.A_RESULTS_TABLE]


def test_consolidate_bad_input(in_known, tmp_path, monkeypatch, capsys):
    assert consolidate.main(["--model", "Nope", "--experiments", in_known["experiment"]]) == 2
    err = capsys.readouterr().err
    assert "no finished eval run of model 'Nope'" in err and "Llama-Instruct" in err
    assert consolidate.main(["--experiments", in_known["experiment"]]) == 2
    assert "exactly one of --model M and --all true" in capsys.readouterr().err
    dense_only = f"dense-{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", dense_only)
    fake_eval("Qwen", ppl=5.0, acc=0.7)
    assert consolidate.main(["--model", "Qwen", "--experiments", dense_only]) == 2
    assert "has no finished pruned (or pruned+LoRA) eval run" in capsys.readouterr().err
    out = tmp_path / "dense"
    assert cross_model.main(["--experiments", dense_only, "--output_dir", str(out)]) == 0   # partial results
    assert "no pruned or pruned+LoRA eval in the selection" in capsys.readouterr().out


def inside(fig) -> None:
    """Every text, axes and legend lies inside the canvas; legend labels are unique."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    artists = [*fig.axes, *fig.legends, *fig.texts, *(t for ax in fig.axes for t in ax.texts),
               *(ax.title for ax in fig.axes), *(ax.xaxis.label for ax in fig.axes)]
    for a in artists:
        if not a.get_visible() or (hasattr(a, "get_text") and not a.get_text()):
            continue
        e = a.get_window_extent(renderer)
        assert e.x0 >= box.x0 - 1 and e.y0 >= box.y0 - 1 and e.x1 <= box.x1 + 1 and e.y1 <= box.y1 + 1, a
    for lg in fig.legends:
        labels = [t.get_text() for t in lg.get_texts()]
        assert len(labels) == len(set(labels))


def test_figures_are_drawn_inside_the_canvas(in_known):
    s = known_study(in_known)
    made = figures.study_figures(s, study_mod.analyses(s))
    assert set(made) == set(schema.STUDY_FIGURES)
    for fig in made.values():
        inside(fig)
        assert layout_problems(fig) == []
        assert sum(len(ax.patches) + len(ax.lines) + len(ax.collections) for ax in fig.axes) > 0
        figures.plt().close(fig)
    table = query.results_table([in_known["experiment"]], details=True)
    p = cross_model.pivot(table, schema.ppl_metric("wiki"))
    for fig in (cross_model.ratio_figure(p), cross_model.base_instruct_figure(p, s)):
        inside(fig)
        assert layout_problems(fig) == []
        figures.plt().close(fig)


def test_finetune_examples_digest_covers_ids_and_labels(tmp_path):
    from types import SimpleNamespace as E

    from prune_entry import inputs
    a = [E(input_ids=(1, 2, 3), labels=(-100, 2, 3))]
    b = [E(input_ids=(1, 2, 3), labels=(-100, -100, 3))]
    da, db = (inputs.examples_input("alpaca", "alpaca", x) for x in (a, b))
    assert da.digest != db.digest and da.source == "gqaprune.finetune:alpaca" and da.context == schema.CTX_TRAINING
    f = tmp_path / "train.jsonl"
    f.write_text('{"text": "x"}\n')
    local = inputs.examples_input("train.jsonl", str(f), a)
    assert local.local and local.source == str(f.resolve()) and local.profile == {"examples": 1}


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "sweeps").glob("study_*.yaml")))
def test_study_configs_are_the_study(name):
    sweep = search.parse(["--config", str(REPO / "configs" / "sweeps" / name), "--dry_run", "true"])
    cfg = sweep.config
    assert cfg.methods == ("taylor", "layerwise", "blockwise") and cfg.ratios == (0.2,) and cfg.rule == Rule()
    assert cfg.eval and cfg.eval_dense and len(cfg.models) == 1 and len(sweep.dense) == 1
    if name == "study_demo.yaml":
        assert cfg.grid == {"taylor_seq_len": ("32", "64"), "taylor_num_samples": ("4", "16")}
        assert len(sweep.points) == 12
        return
    assert cfg.models[0] in ALIASES
    assert cfg.grid == {"taylor_seq_len": ("32", "64", "128", "256"),
                        "taylor_num_samples": ("4", "64", "128", "256", "512")}
    assert len(sweep.points) == 60 and all(len(p.grid) == 2 for p in sweep.points)   # every method reads both
    assert sweep.points[0].eval.ppl.ppl_datasets.split(",")[0] == "wikitext2"


def test_study_configs_cover_the_six_models():
    models = {yaml.safe_load(p.read_text())["models"][0] for p in (REPO / "configs" / "sweeps").glob("study_*.yaml")}
    assert models == set(ALIASES) | {"demo"}


# ------------------------------------------------------------------------------ ratio kinds, claims

def test_sparsity_and_structured_are_separate_groups_and_claims_runs_are_ignored(in_real, tmp_path):
    client = MlflowClient(in_real["uri"])
    sparse_exp = in_real["sparse_experiment"]
    sid = client.get_experiment_by_name(sparse_exp).experiment_id
    every = client.search_runs([sid], run_view_type=3)
    registry = [r for r in every if r.data.tags.get(schema.TAG_STAGE) == claims.STAGE_CLAIMS]
    assert registry and all(r.data.tags.get(claims.TAG_REGISTRY) == "true" for r in registry)
    frame = query.runs_frame([sparse_exp], include_failed=True)
    assert not set(r.info.run_id for r in registry) & set(frame["run_id"])
    assert set(frame["stage"]) == {schema.STAGE_SEARCH, schema.STAGE_PRUNE, schema.STAGE_EVAL}
    assert len(frame) == len(every) - len(registry)
    # the joined table: each prune run's target and achieved value of its own kind
    table = query.results_table([sparse_exp])
    assert len(table) == 2
    for _, row in table.iterrows():
        prune = client.get_run(row["prune_run_id"])
        kind = prune.data.tags[schema.TAG_RATIO_KIND]
        assert row[query.RATIO_KIND] == kind
        if kind == schema.RATIO_SPARSITY:
            assert row["method"] == "magnitude_unstructured"
            assert row[query.RATIO] == prune.data.metrics[schema.M_TARGET_SPARSITY] == 0.25
            assert row[query.ACHIEVED] == prune.data.metrics[schema.M_ACHIEVED_SPARSITY]
        else:
            assert row["method"] == "magnitude" and kind == schema.RATIO_STRUCTURED
            assert row[query.RATIO] == float(prune.data.params[schema.P_PRUNING_RATIO]) == 0.25
            assert row[query.ACHIEVED] == prune.data.metrics[schema.M_ACHIEVED_RATIO]
    # one best per kind, never one compared with the other: in the search and in the study
    doc = mlflow.artifacts.load_dict(f"runs:/{in_real['sparse_search']}/{schema.A_BEST_CONFIG}")
    assert sorted((b["method"], b["ratio_kind"]) for b in doc["best"]) == [
        ("magnitude", schema.RATIO_STRUCTURED), ("magnitude_unstructured", schema.RATIO_SPARSITY)]
    assert all(b["candidates"] == 1 for b in doc["best"])
    tags = client.get_run(in_real["sparse_search"]).data.tags
    assert {schema.best_run_tag("Llama_0.25"), schema.best_run_tag("Llama_0.25_sparsity")} <= set(tags)
    s = study_mod.load([sparse_exp])
    assert s.groups() == [(0.25, schema.LABEL_PRUNED, schema.RATIO_STRUCTURED),
                          (0.25, schema.LABEL_PRUNED, schema.RATIO_SPARSITY)]
    best = study_mod.best_configs(s)
    assert list(best.frame[study_mod.KIND_COLUMN]) == [schema.RATIO_STRUCTURED, schema.RATIO_SPARSITY]
    assert schema.RATIO_KINDS[schema.RATIO_SPARSITY] in best.caption
    assert schema.RATIO_KINDS[schema.RATIO_STRUCTURED] in best.caption


def test_tables_state_the_protocol_and_the_standard_errors(in_real):
    client = MlflowClient(in_real["uri"])
    table = query.results_table([in_real["experiment"]], details=True)
    s = study_mod.build(table, Rule())
    best = study_mod.best_configs(s)
    task = schema.task_metric(TASK, "acc_norm")
    for _, row in best.frame.iterrows():
        metrics = client.get_run(row["eval run"]).data.metrics
        se = metrics[schema.stderr_metric(task)]           # lm-eval's standard error, one task
        assert row["± ACC"] == pytest.approx(se, rel=1e-12)
    cap = best.caption
    assert f"{TASK}=acc_norm" in cap and "0-shot" in cap and "corpus" in cap and "16-token" in cap
    assert "± ACC = standard error" in cap and schema.RATIO_KINDS[schema.RATIO_STRUCTURED] in cap
    md = tables.markdown(best)
    assert f"±{row['± ACC']:.4f}" in md
    # the best_config protocol also counts the windows and tokens scored, from the eval run
    b = s.selection.best[0]
    proto = study_mod.best_config(s, b).protocol[PPL]
    m = client.get_run(b.row["eval_run_id"]).data.metrics
    windows = int(m[schema.dataset_metric(schema.M_PPL_WINDOWS, "corpus")])
    tokens = int(m[schema.dataset_metric(schema.M_PPL_TOKENS, "corpus")])
    assert proto.endswith(f"{windows:,} windows, {tokens:,} tokens scored") and windows > 0
    p = cross_model.pivot(table, ACC)
    header, body = cross_model.grid(p)
    assert all("±" in cell for r in body for cell in r[len(p.values.index.names):] if cell != "–")
    assert "± = standard error" in cross_model.caption(p)


def test_an_empty_store_is_named_without_its_credentials(tmp_path, monkeypatch, capsys):
    """An empty store: one line naming it (the tracking URI redacted), exit 2, for both tools."""
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cr3t-pw-42")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 's3cr3t-pw-42' / 'mlflow.db'}")
    (tmp_path / "s3cr3t-pw-42").mkdir()
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    assert cross_model.store_label().endswith("/***/mlflow.db")
    assert cross_model.main([]) == 2
    err = capsys.readouterr().err
    assert "no finished eval runs in the store sqlite:///" in err and "s3cr3t-pw-42" not in err
    assert consolidate.main(["--all", "true"]) == 2
    assert "no finished eval runs in the store" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:pw1234567@tracking.example:5000")
    assert cross_model.store_label() == "http://***@tracking.example:5000"
