"""Local dataset copies (data dir): resolution, provenance, lm-eval's own task definitions on
them, WikiText2 perplexity and mixed calibration from them, the literature's perplexity
protocol, and fetch_data's plan. Everything runs offline (tests/conftest.py sets HF_*_OFFLINE).
"""
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

import local_copies as lc
from conftest import make_tiny_model, make_word_tokenizer
from gqaprune import data
from gqaprune.datadir import DataDir, DatasetRef, content_hash
from gqaprune.errors import UserError
from gqaprune.evaluation import zeroshot
from gqaprune.evaluation.perplexity import PplProtocol, perplexity


@pytest.fixture(scope="module", autouse=True)
def offline_module():
    """Module-scoped fixtures run before conftest's per-test offline switch: go offline first,
    also in already-imported datasets / huggingface_hub (they read the flags at import)."""
    import datasets.config as dcfg
    import huggingface_hub.constants as hcfg
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        for mod, attr in ((dcfg, "HF_HUB_OFFLINE"), (dcfg, "HF_DATASETS_OFFLINE"), (hcfg, "HF_HUB_OFFLINE")):
            mp.setattr(mod, attr, True)
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory, offline_module):
    """One data dir with every copy the tests read."""
    r = tmp_path_factory.mktemp("data")
    lc.write_standard_tasks(r)
    for write in (lc.write_gsm8k, lc.write_squad_v2, lc.write_wikitext, lc.write_ptb, lc.write_c4,
                  lc.write_squad, lc.write_alpaca):
        write(r)
    return r


@pytest.fixture(scope="module")
def dd(root, tmp_path_factory):
    return DataDir(root, tmp_path_factory.mktemp("hf_cache"))


@pytest.fixture(scope="module")
def manager():
    return zeroshot.task_manager([], with_defaults=True)


# ---- resolution: every layout a copy may have ------------------------------------------------

@pytest.mark.parametrize("ref,folder,layout,builder,splits", [
    (DatasetRef("allenai/ai2_arc", "ARC-Easy"), "allenai/ai2_arc", "hub files", "parquet",
     {"train", "validation", "test"}),                                     # README configs
    (DatasetRef("allenai/openbookqa", "main"), "allenai/openbookqa/main", "hub files", "parquet",
     {"train", "validation", "test"}),                                     # one folder per config
    (DatasetRef("baber/piqa"), "baber/piqa", "save_to_disk", "arrow", {"train", "validation", "test"}),
    (DatasetRef("Rowan/hellaswag"), "Rowan/hellaswag", "hub files", "json", {"train", "validation", "test"}),
    (DatasetRef("allenai/winogrande", "winogrande_xl"), "allenai/winogrande/winogrande_xl", "save_to_disk",
     "arrow", {"train", "validation", "test"}),
    (data.WIKITEXT2, "Salesforce/wikitext", "hub files", "parquet", {"train", "validation", "test"}),
    (data.PTB, "ptb-text-only/ptb_text_only/penn_treebank", "hub files", "parquet",
     {"train", "validation", "test"}),                                     # parquet export layout
    (data.C4["validation"], "allenai/c4", "hub files", "json", {"validation"}),   # single json.gz file
    (DatasetRef("yahma/alpaca-cleaned"), "yahma/alpaca-cleaned", "hub files", "json", {"train"}),
])
def test_copies_resolve_by_hub_id(root, ref, folder, layout, builder, splits):
    copy = DataDir(root).find(ref)
    assert (copy.origin, copy.path, copy.layout, copy.builder) == ("local", str(root / folder), layout, builder)
    assert set(copy.splits) == splits
    assert all(Path(f).is_file() and str(root) in f for f in copy.files())


def test_arc_configs_read_only_their_own_files(root):
    easy = DataDir(root).find(DatasetRef("allenai/ai2_arc", "ARC-Easy"))
    assert easy.files("test") == [str(root / "allenai/ai2_arc/ARC-Easy/test-00000-of-00001.parquet")]


def test_content_hash_is_by_content_and_relative_path(root, tmp_path):
    ref = DatasetRef("yahma/alpaca-cleaned")
    f = root / "yahma/alpaca-cleaned/alpaca_data_cleaned.json"
    want = hashlib.sha256(f"yahma/alpaca-cleaned/alpaca_data_cleaned.json\0"
                          f"{hashlib.sha256(f.read_bytes()).hexdigest()}\n".encode()).hexdigest()[:16]
    assert DataDir(root).find(ref).sha256 == want
    moved = tmp_path / "elsewhere"
    lc.write_alpaca(moved)                                   # same bytes, other folder: same hash
    assert DataDir(moved).find(ref).sha256 == want
    g = moved / "yahma/alpaca-cleaned/alpaca_data_cleaned.json"
    g.write_text(g.read_text().replace("w8", "w9"))
    assert DataDir(moved).find(ref).sha256 != want
    assert content_hash([g], moved) == DataDir(moved).find(ref).sha256


def test_missing_copy_fails_at_once_naming_the_expected_path(tmp_path):
    empty = DataDir(tmp_path)
    with pytest.raises(UserError, match=rf"no local copy of allenai/ai2_arc \[ARC-Easy\] at "
                                        rf"{tmp_path}/allenai/ai2_arc/ARC-Easy .*fetch_data"):
        empty.require(DatasetRef("allenai/ai2_arc", "ARC-Easy"))
    with pytest.raises(UserError, match=rf"Salesforce/wikitext \[wikitext-2-raw-v1\] at "
                                        rf"{tmp_path}/Salesforce/wikitext/wikitext-2-raw-v1"):
        data.load_texts("wikitext2", "test", data_dir=empty)
    with pytest.raises(UserError, match=rf"{tmp_path}/allenai/c4/en/c4-train.00000-of-01024.json.gz"):
        data.calibration_batches(None, "mixed:c4,wikitext2", 2, 8, 0, data_dir=empty)
    with pytest.raises(UserError, match=r"ptb_text_only \[penn_treebank\] cannot be reached \(offline.*--data_dir"):
        DataDir().require(data.PTB)


def test_data_dir_from_flag_or_env(tmp_path, monkeypatch):
    monkeypatch.delenv("GQAPRUNE_DATA_DIR", raising=False)
    assert DataDir.from_env().root is None
    monkeypatch.setenv("GQAPRUNE_DATA_DIR", str(tmp_path))
    assert DataDir.from_env().root == tmp_path.resolve()
    assert DataDir.from_env(tmp_path / "..", cache_dir=tmp_path).root == tmp_path.parent.resolve()
    with pytest.raises(UserError, match=r"data dir '.*/nope' \(--data_dir\) is not a folder"):
        DataDir.from_env(tmp_path / "nope")
    monkeypatch.setenv("GQAPRUNE_DATA_DIR", str(tmp_path / "gone"))
    with pytest.raises(UserError, match=r"\(\$GQAPRUNE_DATA_DIR\) is not a folder"):
        DataDir.from_env()


def test_cache_dir_receives_the_datasets_cache(root, tmp_path):
    DataDir(root, tmp_path / "hf").load(data.WIKITEXT2, "validation")
    assert any((tmp_path / "hf").rglob("*.arrow"))


def test_missing_split_names_the_copy(dd):
    with pytest.raises(UserError, match=r"local copy .*yahma/alpaca-cleaned .* no split 'test' \(it has train\)"):
        dd.load(DatasetRef("yahma/alpaca-cleaned"), "test")


# ---- lm-eval's own task definitions on the local copies --------------------------------------

@pytest.fixture(scope="module")
def standard_run(dd, manager, tmp_path_factory):
    tok = make_word_tokenizer(tmp_path_factory.mktemp("tok"))
    model = make_tiny_model("llama", 8, 2, vocab=97)
    sources = zeroshot.check_tasks(manager, list(zeroshot.STANDARD_TASKS), dd)
    res = zeroshot.evaluate_tasks(model, tok, list(zeroshot.STANDARD_TASKS), manager, batch_size=8, data_dir=dd)
    return sources, res


@pytest.mark.parametrize("task", zeroshot.STANDARD_TASKS)
def test_standard_task_runs_on_its_local_copy(standard_run, root, task):
    sources, res = standard_run
    by = {s.task: s for s in res.scores}
    s = by[task]
    assert s.n_samples == lc.EVAL_ROWS[task]
    assert s.measure == ("acc_norm" if task in zeroshot.NORM_TASKS else "acc")
    if task in ("boolq", "winogrande"):              # lm-eval defines acc only for these
        assert s.acc_norm is None and 0.0 <= s.acc <= 1.0
    if task in lc.LENGTH_DECIDED:
        # Gold = shortest choice in all rows but the last: acc (summed log-likelihood) is exactly
        # (n-1)/n; acc_norm per byte as explained in local_copies.LENGTH_DECIDED.
        acc, acc_norm = lc.LENGTH_DECIDED[task](lc.EVAL_ROWS[task])
        assert (s.acc, s.acc_norm) == (pytest.approx(acc), pytest.approx(acc_norm))
    src = {x.task: x for x in res.sources}[task]
    assert src.copy is not None and src.copy.origin == "local" and str(root) in src.copy.path
    assert src.copy.sha256 and src.copy.sha256 == {x.task: x for x in sources}[task].copy.sha256


def test_mean_covers_the_seven(standard_run, dd):
    _, res = standard_run
    assert len(res.scores) == len(res.accuracy) == 7 and res.generative == []
    assert res.mean == pytest.approx(sum(s.score for s in res.scores) / 7)
    # lm-eval read the copies with datasets' local builders, caching into the given cache_dir.
    builders = {p.relative_to(dd.cache_dir).parts[0] for p in dd.cache_dir.rglob("*.arrow")}
    assert {"parquet", "json", "arrow"} <= builders


def test_missing_task_copy_offline_names_the_expected_path(manager, tmp_path):
    with pytest.raises(UserError, match=rf"task 'piqa' needs baber/piqa: no local copy at {tmp_path}/baber/piqa"):
        zeroshot.check_tasks(manager, ["piqa"], DataDir(tmp_path))


def test_task_refs_come_from_lm_eval_definitions(manager):
    refs = zeroshot.task_refs(manager, ["arc_challenge", "boolq", "squadv2", "gsm8k", "ai2_arc"])
    assert refs["arc_challenge"] == DatasetRef("allenai/ai2_arc", "ARC-Challenge")   # via include:
    assert refs["boolq"] == DatasetRef("aps/super_glue", "boolq")
    assert refs["squadv2"] == DatasetRef("lighteval/squad_v2")                      # Python task class
    assert refs["gsm8k"] == DatasetRef("openai/gsm8k", "main")
    assert refs["ai2_arc"] is None                                                   # a tag


# ---- generative tasks: reported beside, never averaged -----------------------------------------

def answer_model_and_tokenizer():
    """A bigram Llama that answers every GSM8K prompt with '#### 2' and stops.

    Attention and MLP outputs are zeroed (residual = embedding); embeddings are one-hot, so the
    logits depend on the current token only: 'Answer:' -> '####' -> '2' -> '</s>'.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    words = ["<unk>", "<s>", "</s>", "<pad>", "Question:", "Answer:", "####", "2", "3"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<pad>")
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = LlamaForCausalLM(cfg).eval()
    succ = {w: "</s>" for w in words} | {"Answer:": "####", "####": "2"}
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(len(words), 16))
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for w, nxt in succ.items():
            model.lm_head.weight[words.index(nxt), words.index(w)] = 10.0
    return model, tok


def test_gsm8k_exact_match_from_local_copy_never_in_the_mean(dd, manager):
    model, tok = answer_model_and_tokenizer()
    res = zeroshot.evaluate_tasks(model, tok, ["gsm8k", "boolq"], manager, batch_size=4, data_dir=dd)
    # test answers are 2, 3, 4 (rows i + 2): the model's '#### 2' matches the first only.
    g = {x.task: x for x in res.generative}["gsm8k"]
    assert g.exact_match == pytest.approx(1 / 3) and g.n_samples == 3 and g.f1 is None
    assert g.metrics["exact_match,flexible-extract"] == pytest.approx(1 / 3)
    assert [s.task for s in res.accuracy] == ["boolq"] and res.mean == res.accuracy[0].score
    assert {s.task: s.measure for s in res.scores} == {"gsm8k": None, "boolq": "acc"}
    assert {x.task: x for x in res.sources}["gsm8k"].copy.layout == "hub files"


def test_squadv2_python_task_reads_the_local_copy(dd, manager):
    specs, sources = zeroshot.task_specs(manager, ["squadv2"], dd)
    task = specs[0]
    assert type(task).__mro__[1].__name__ == "SQuAD2"            # lm-eval's own class, data hook only
    docs = list(task.validation_docs())
    assert [d["id"] for d in docs] == ["v0", "v1", "v2"]
    assert task.doc_to_target(docs[0]) == " w93" and task.doc_to_target(docs[1]) == " unanswerable"
    assert sources[0].copy.layout == "save_to_disk"
    # Its metric is an `evaluate` module, not cached on this offline machine: fail before generating.
    with pytest.raises(UserError, match=r"task 'squadv2' is scored with the `evaluate` metric 'squad_v2'.*"
                                        r"HF_MODULES_CACHE"):
        zeroshot.check_tasks(manager, ["squadv2"], dd)


def test_summarize_keeps_generative_metrics_apart():
    results = {"piqa": {"acc,none": 0.6, "acc_norm,none": 0.62},
               "squadv2": {"exact,none": 31.0, "f1,none": 35.5, "HasAns_exact,none": 20.0, "alias": "squadv2"},
               "gsm8k": {"exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": 0.01,
                         "exact_match,flexible-extract": 0.2}}
    res = zeroshot.summarize(results, {"gsm8k": {"effective": 50}})
    assert [s.task for s in res.accuracy] == ["piqa"] and res.mean == 0.6
    assert [s.task for s in res.scores] == ["piqa", "squadv2", "gsm8k"]     # measure None: not averaged
    g = {x.task: x for x in res.generative}
    assert (g["squadv2"].exact_match, g["squadv2"].f1) == (31.0, 35.5)
    assert (g["gsm8k"].exact_match, g["gsm8k"].f1, g["gsm8k"].n_samples) == (0.1, None, 50)
    assert g["gsm8k"].row()["exact_match,flexible-extract"] == 0.2
    assert res.to_dict()["generative"][0]["task"] == "squadv2"


# ---- perplexity and calibration from local copies ---------------------------------------------

def test_wikitext2_perplexity_from_the_local_copy(dd, tmp_path):
    tok = make_word_tokenizer(tmp_path / "tok")
    stream = data.eval_stream(tok, "wikitext2", "test", data_dir=dd)
    rows = [r["text"] for r in dd.load(data.WIKITEXT2, "test")]
    assert rows == lc.wikitext_lines(40, seed=2)
    want = tok("\n\n".join(rows), add_special_tokens=False)["input_ids"]
    assert stream.tolist() == want
    model = make_tiny_model("llama", 8, 2, vocab=97)
    res = perplexity(model, stream, PplProtocol("wikitext2", "test", seq_len=64), show_progress=False)
    assert res.windows == math.ceil(len(want) / 64) and res.tokens == len(want) - res.windows
    assert 60 < res.ppl < 140                         # a random model over a 97-word vocabulary
    (copy,) = data.check_source("wikitext2", "test", dd)
    assert copy.origin == "local" and copy.path.endswith("Salesforce/wikitext") and len(copy.sha256) == 16


def plain_loop_ppl(model, stream, seq_len):
    """The literature's loop: non-overlapping windows, each ``model(x, labels=x)``, no BOS."""
    nll, n = 0.0, 0
    for b in range(0, stream.numel(), seq_len):
        x = stream[b: b + seq_len][None]
        if x.shape[1] < 2:
            break
        with torch.no_grad():
            loss = model(input_ids=x, labels=x).loss
        nll += float(loss) * (x.shape[1] - 1)
        n += x.shape[1] - 1
    return math.exp(nll / n), n


@pytest.mark.parametrize("T,seq_len", [(96, 16), (101, 16), (40, 40)])
def test_default_perplexity_is_the_plain_window_loop(T, seq_len):
    model = make_tiny_model("llama", 8, 2, vocab=97)
    stream = torch.randint(4, 97, (T,), generator=torch.Generator().manual_seed(T))
    proto = PplProtocol("hand-made", seq_len=seq_len, batch_size=3)
    assert proto.bos is False and "no BOS" in proto.describe()
    got = perplexity(model, stream, proto, bos_id=1, show_progress=False)
    want, n = plain_loop_ppl(model, stream, seq_len)
    assert got.tokens == n and got.ppl == pytest.approx(want, rel=1e-5)


def test_mixed_calibration_from_local_copies(dd, tmp_path):
    tok = make_word_tokenizer(tmp_path / "tok")
    texts = data.load_texts("mixed:wikitext2,squad", "train", data_dir=dd)
    wiki = "\n\n".join(r["text"] for r in dd.load(data.WIKITEXT2, "train"))
    squad = [f"{r['context']}\n{r['question']}" for r in dd.load(data.SQUAD, "train")]
    budget = min(len(wiki), sum(map(len, squad)))
    assert texts[0] == wiki[:budget] and texts[1:] == squad     # squad is the smaller part: all of it
    ids = data.calibration_batches(tok, "mixed:wikitext2,squad", 4, 16, seed=0, data_dir=dd)
    assert ids.shape == (4, 16) and (ids[:, 0] == tok.bos_token_id).all()
    copies = data.check_source("mixed:wikitext2,squad", "train", dd)
    assert [c.ref.repo for c in copies] == ["Salesforce/wikitext", "rajpurkar/squad"]
    assert all(c.origin == "local" and c.sha256 for c in copies)
    default = data.check_source("mixed", "train", dd)
    assert [c.ref.repo for c in default] == ["Salesforce/wikitext", "allenai/c4", "rajpurkar/squad"]


def test_mixed_of_files_uses_training_paragraphs_only(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("\n\n".join(f"alpha paragraph {i}" for i in range(20)))
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps({"text": f"beta record {i}"}) + "\n" for i in range(20)))
    texts = data.load_texts(f"mixed:{a},{b}", "train")
    held = {f"alpha paragraph {i}" for i in (9, 19)} | {f"beta record {i}" for i in (9, 19)}
    assert texts and not held & set(texts)
    assert {t.split()[0] for t in texts} == {"alpha", "beta"}
    assert [c.origin for c in data.check_source(f"mixed:{a},{b}")] == ["file", "file"]
    with pytest.raises(UserError, match="at least two sources"):
        data.load_texts(f"mixed:{a}", "train")


def test_finetune_records_from_the_local_copy(dd):
    records, copy = data.load_hub_records("yahma/alpaca-cleaned", "train", data_dir=dd)
    assert len(records) == 10 and set(records[0]) == {"output", "input", "instruction"}
    assert copy.origin == "local" and copy.name == "yahma/alpaca-cleaned"


# ---- the eval entry point with the data dir (GQAPRUNE_DATA_DIR until the flag exists) --------

def test_eval_entry_point_reads_tasks_from_the_data_dir(root, saved_tiny_model, tracking_store, monkeypatch,
                                                        tmp_path):
    import datasets.config as dcfg
    from mlflow.tracking import MlflowClient

    from prune_entry import evaluate
    monkeypatch.setattr(dcfg, "HF_DATASETS_CACHE", tmp_path / "hf")   # keep ~/.cache clean
    monkeypatch.setenv("GQAPRUNE_DATA_DIR", str(root))
    model_dir = saved_tiny_model("llama", 8, 2)
    assert evaluate.main(["--model_uri", str(model_dir), "--tasks", "arc_easy,piqa", "--ppl_datasets",
                          "none", "--speed", "false", "--batch_size", "4"]) == 0
    (run,) = MlflowClient().search_runs([MlflowClient().get_experiment_by_name(
        __import__("os").environ["MLFLOW_EXPERIMENT_NAME"]).experiment_id])
    m = run.data.metrics
    assert m["arc_easy/acc"] == pytest.approx(0.75) and m["piqa/acc"] == pytest.approx(0.75)
    assert m["arc_easy/n_samples"] == 4 and m["piqa/n_samples"] == 4


# ---- fetch_data: the plan, and its error offline -------------------------------------------------

def test_fetch_plan_of_the_study(manager, tmp_path):
    from prune_entry import fetch_data
    plan = fetch_data.plan(fetch_data.FetchConfig(to=str(tmp_path)), manager)
    got = {(i.ref.repo, i.ref.config, i.method) for i in plan.items}
    assert got == {
        ("aps/super_glue", "boolq", "save_to_disk"), ("baber/piqa", None, "save_to_disk"),
        ("Rowan/hellaswag", None, "save_to_disk"), ("allenai/winogrande", "winogrande_xl", "save_to_disk"),
        ("allenai/ai2_arc", "ARC-Easy", "save_to_disk"), ("allenai/ai2_arc", "ARC-Challenge", "save_to_disk"),
        ("allenai/openbookqa", "main", "save_to_disk"), ("nyu-mll/glue", "rte", "save_to_disk"),
        ("lighteval/squad_v2", None, "save_to_disk"), ("openai/gsm8k", "main", "save_to_disk"),
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "save_to_disk"),
        ("ptb-text-only/ptb_text_only", "penn_treebank", "parquet_export"),
        ("allenai/c4", None, "files"), ("rajpurkar/squad", None, "save_to_disk"),
        ("yahma/alpaca-cleaned", None, "save_to_disk")}
    c4 = sorted(p for i in plan.items if i.ref.repo == "allenai/c4" for _, p in i.ref.files)
    assert c4 == ["en/c4-train.00000-of-01024.json.gz", "en/c4-validation.00000-of-00008.json.gz"]
    purposes = {i.ref.label(): i.purposes for i in plan.items}
    assert purposes["Salesforce/wikitext [wikitext-2-raw-v1]"] == ("ppl wikitext2", "calibration mixed")
    assert purposes["rajpurkar/squad"] == ("calibration mixed",)
    assert plan.metrics == ("squad_v2",)
    arc = next(i for i in plan.items if i.ref.config == "ARC-Easy")
    assert arc.target(tmp_path) == tmp_path / "allenai/ai2_arc/ARC-Easy"


def test_fetch_plan_subset_and_bad_names(manager, tmp_path):
    from prune_entry import fetch_data
    cfg = fetch_data.FetchConfig(to=str(tmp_path), tasks="standard", ppl="wikitext2,ptb", calibration="none",
                                 finetune="none")
    plan = fetch_data.plan(cfg, manager)
    assert len(plan.items) == 9 and plan.metrics == ()
    for bad, match in [({"tasks": "ai2_arc"}, "names no hub dataset"), ({"tasks": "arc_eazy"}, "unknown task"),
                       ({"ppl": "demo"}, "not a hub source"), ({"finetune": "dolly"}, "not a hub fine-tuning")]:
        with pytest.raises(UserError, match=match):
            fetch_data.plan(fetch_data.FetchConfig(**{**cfg.__dict__, **bad}), manager)


def test_fetch_offline_fails_at_once_and_dry_run_writes_nothing(manager, tmp_path, capsys):
    from prune_entry import fetch_data
    target = tmp_path / "dir"
    with pytest.raises(UserError, match="fetch_data needs the Hugging Face hub.*login node"):
        fetch_data.run(fetch_data.FetchConfig(to=str(target), tasks="boolq", ppl="none", calibration="none",
                                              finetune="none"), manager)
    assert not target.exists()
    out = fetch_data.run(fetch_data.FetchConfig(to=str(target), tasks="none", ppl="ptb", calibration="none",
                                                finetune="none", dry_run=True))
    assert out["plan"][0]["target"] == str(target / "ptb-text-only/ptb_text_only") and not target.exists()
    assert fetch_data.main(["--to", str(target), "--tasks", "none", "--ppl", "c4", "--calibration", "none",
                            "--finetune", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: fetch_data needs the Hugging Face hub")
