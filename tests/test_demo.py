"""The built-in demo model: trains offline, loads with Auto*, is deterministic and cached.

Uses a few training steps instead of the full run so the file stays fast.
"""
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from gqaprune import demo, demo_corpus
from gqaprune.errors import UserError
from tests.figure_layout import layout_problems

STEPS = 12  # full run uses demo.DEFAULT_STEPS
CORPUS_SHA256 = "39bcfd3f909f9dc038098a55af91eb5da7bf8b022e7bec9b361c38c9be4fad36"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("gqaprune-cache")


@pytest.fixture(scope="module")
def demo_dir(cache):
    return demo.ensure_demo_model(seed=0, cache_dir=cache, steps=STEPS, progress=False)


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_demo_texts_split_is_disjoint_and_small():
    train, valid = demo.demo_texts("train"), demo.demo_texts("validation")
    assert train and valid and not set(train) & set(valid)
    assert len(valid) / (len(train) + len(valid)) == 1 / demo_corpus.HOLDOUT_EVERY
    assert valid[0] == demo_corpus._stories()[demo_corpus.HOLDOUT_EVERY - 1]   # as data.split_local
    with pytest.raises(UserError):
        demo.demo_texts("test")


def test_corpus_is_pinned():
    """Generated from a fixed seed: the same text on every machine and Python version (a change
    of the grammar must bump CORPUS_VERSION and this hash, and DEMO_VERSION)."""
    assert (demo_corpus.CORPUS_VERSION, demo_corpus.corpus_sha256()) == (
        "stories-v2", CORPUS_SHA256)
    assert demo_corpus.corpus_sha256() == demo_corpus.corpus_sha256()


def test_stories_keep_their_characters_and_world_facts():
    """What the demo tasks rely on: a story's names and object recur in its second half, and the
    world facts (a child's home and food) are the same in every story."""
    stories = demo.demo_texts("train")
    for story in stories[:200]:
        words = story.split()
        # the first child's name in the story is the hero's (the opening sentence names the hero)
        name = next(w.strip(".,!") for w in words
                    if w.strip(".,!") in demo_corpus.GIRLS + demo_corpus.BOYS)
        assert name in " ".join(words[len(words) // 2:]), story
    for story in stories:
        for name, home in re.findall(r"(\w+) lived in (a [a-z ]+?)\.", story):
            assert demo_corpus.FACTS[name][0] == home, story
        for name, food in re.findall(r"(\w+) went home and ate some (\w+)\.", story):
            assert demo_corpus.FACTS[name][1] == food, story


def test_training_stream_mixes_the_separators_the_toolkit_uses(demo_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_dir)
    texts = demo.demo_texts("validation")[:60]
    stream = demo.training_stream(tok, texts, seed=0)                 # (n_tokens,)
    assert torch.equal(stream, demo.training_stream(tok, texts, seed=0))
    assert stream[0] == tok.bos_token_id
    decoded = tok.decode(stream, skip_special_tokens=False)
    assert "</s><s>" in decoded.replace(" ", "") and "\n\n" in decoded
    assert decoded.count("\n") > decoded.count("\n\n") * 2          # single newlines too
    assert all(t in decoded for t in texts)


def test_cache_dir_layout(demo_dir, cache, monkeypatch):
    assert demo_dir.parent == cache and "seed0" in demo_dir.name and demo.DEMO_VERSION in demo_dir.name
    assert demo.is_complete(demo_dir)
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]  # temp dir renamed away
    monkeypatch.setenv(demo.CACHE_ENV, str(cache / "env"))
    assert demo.demo_model_dir(3) == cache / "env" / f"demo-{demo.DEMO_VERSION}-seed3"


def test_loads_with_auto_classes(demo_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo_dir)
    tok = AutoTokenizer.from_pretrained(demo_dir)
    cfg = model.config
    assert cfg.model_type == "llama" and model.dtype == torch.float32
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (8, 4, 6)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (1024, 48, 4)
    assert len(tok) == 1024
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", "<pad>")
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    text = "Lily had a red kite. for x in range(3):\n    print('é')"   # byte-level: any text
    ids = tok(text, return_tensors="pt").input_ids          # (1, T)
    assert ids[0, 0] == tok.bos_token_id
    assert tok.decode(ids[0], skip_special_tokens=True) == text
    assert tok.unk_token_id not in ids[0].tolist()
    logits = model(ids).logits                               # (1, T, 1024)
    assert logits.shape == (1, ids.shape[1], 1024)


def test_demo_info(demo_dir):
    info = json.loads((demo_dir / "demo_info.json").read_text())
    assert info["seed"] == 0 and info["steps"] == STEPS
    assert info["train_seconds"] > 0 and "heldout_method" in info
    assert 1 < info["heldout_perplexity"] < demo.VOCAB_SIZE
    assert info["recipe"]["steps"] == STEPS and info["corpus"] == demo_corpus.CORPUS_VERSION


def test_training_lowers_loss(demo_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    info = json.loads((demo_dir / "demo_info.json").read_text())
    assert info["final_train_loss"] < info["initial_train_loss"] - 0.5
    trained = AutoModelForCausalLM.from_pretrained(demo_dir)
    torch.manual_seed(0)
    untrained = LlamaForCausalLM(trained.config)              # same init, no training
    stream = demo.token_stream(AutoTokenizer.from_pretrained(demo_dir),
                               demo.demo_texts("validation"))[:1024]
    assert demo.held_out_perplexity(trained, stream) < 0.7 * demo.held_out_perplexity(untrained, stream)


def test_same_seed_same_weights_other_seed_differs(demo_dir, tmp_path):
    demo.train_demo_model(seed=0, steps=STEPS, out_dir=tmp_path / "again", progress=False)
    demo.train_demo_model(seed=1, steps=STEPS, out_dir=tmp_path / "seed1", progress=False)
    first = _weights(demo_dir)
    assert _same_weights(first, _weights(tmp_path / "again"))
    assert (demo_dir / "tokenizer.json").read_bytes() == (tmp_path / "again" / "tokenizer.json").read_bytes()
    assert not _same_weights(first, _weights(tmp_path / "seed1"))


def test_second_call_reuses_cache(demo_dir, cache, monkeypatch):
    mtime = (demo_dir / "model.safetensors").stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("ensure_demo_model retrained despite a complete cache")

    monkeypatch.setattr(demo, "train_demo_model", no_training)
    assert demo.ensure_demo_model(seed=0, cache_dir=cache, steps=STEPS) == demo_dir
    assert (demo_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_interrupted_training_leaves_no_cache(tmp_path, monkeypatch):
    def killed(seed, steps, out_dir, progress):
        (out_dir / "config.json").write_text("{}")  # half-written output
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "train_demo_model", killed)
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo_model(seed=0, cache_dir=tmp_path, steps=STEPS)
    assert list(tmp_path.iterdir()) == []


def test_first_run_says_what_it_does_and_where_it_caches(tmp_path, monkeypatch):
    messages = []
    monkeypatch.setattr(demo, "train_demo_model",
                        lambda seed, steps, out_dir, progress: _fake_training(out_dir))
    path = demo.ensure_demo_model(seed=0, cache_dir=tmp_path, steps=STEPS, notify=messages.append)
    assert len(messages) == 2
    assert "training it once" in messages[0] and str(path) in messages[0] and " s on an idle machine" in messages[0]
    assert demo.CACHE_ENV in messages[0] and "reuse" in messages[0]
    assert "held-out perplexity" in messages[1]
    messages.clear()
    assert demo.ensure_demo_model(seed=0, cache_dir=tmp_path, steps=STEPS, notify=messages.append) == path
    assert messages == []                                     # cached: nothing to announce


def _fake_training(out_dir):
    for name in demo.REQUIRED_FILES:
        (out_dir / name).write_text("{}")
    return {"train_seconds": 1.0, "heldout_perplexity": 2.0}


def test_demo_entry_on_a_fresh_cache_prints_quality_and_the_ui_command(tmp_path, monkeypatch, capsys,
                                                                          tracking_store):
    """What scripts/demo.sh runs: trains (here STEPS steps) into a fresh cache, prunes, evaluates the
    pruned and the dense model, prints both and a UI command that works as typed."""
    import functools
    import mlflow
    from mlflow.tracking import MlflowClient

    from prune_entry import demo as demo_entry
    from tracking import runs, schema

    monkeypatch.setenv(demo.CACHE_ENV, str(tmp_path / "fresh-cache"))
    monkeypatch.setattr(demo, "ensure_demo_model",
                        functools.partial(demo.ensure_demo_model, steps=STEPS, progress=False))
    figures = {}
    log_figure = runs.log_figure
    monkeypatch.setattr(runs, "log_figure", lambda fig, name: (figures.setdefault(name, fig), log_figure(fig, name)))
    assert demo_entry.main(["--limit", "8", "--ppl_nsamples", "6", "--reconstruct_samples", "4",
                            "--taylor_num_samples", "4"]) == 0
    out = capsys.readouterr().out
    assert "demo model: not cached yet, training it once" in out and str(tmp_path / "fresh-cache") in out
    table = out[out.index("model | parameters | ppl demo"):]
    dense, pruned = (re.search(rf"^{label} \| ([\d,]+) \| ([\d.]+) \| ", table, re.M)
                     for label in ("dense demo model", "taylor 20%"))
    assert int(pruned[1].replace(",", "")) < int(dense[1].replace(",", ""))
    assert float(dense[2]) > 1 and float(pruned[2]) > 1
    assert re.search(r"demo_continuation \(acc_norm\).*\n.*\| \d\.\d{3} ± \d\.\d{3} \|", table)
    assert "the first 8 items each" in out and "the first 6 non-overlapping 128-token windows" in out
    assert f"{runs.mlflow_cli()} ui --backend-store-uri {tracking_store}" in out
    assert re.search(r"http://127\.0\.0\.1:5000/#/experiments/\d+/runs\)", out)
    # the pruned model's eval row carries the ratio next to its perplexity
    client = MlflowClient()
    evals = [r for r in client.search_runs([mlflow.get_experiment_by_name(
        __import__("os").environ["MLFLOW_EXPERIMENT_NAME"]).experiment_id])
        if r.data.tags.get(schema.TAG_STAGE) == schema.STAGE_EVAL]
    (pruned_eval,) = [r for r in evals if schema.TAG_SOURCE_RUN in r.data.tags]
    assert pruned_eval.data.tags[schema.TAG_SOURCE_RATIO] == "0.2"
    assert schema.ppl_metric("demo") in pruned_eval.data.metrics and len(evals) == 2
    # every figure the demo logs reads well at its logged size (tests/figure_layout.py)
    assert {schema.A_LAYER_SUMMARY_FIG, schema.A_RECON_ERRORS_FIG, schema.A_ZS_FIG} <= set(figures)
    assert {name: layout_problems(fig) for name, fig in figures.items()} == {name: [] for name in figures}


def test_mlflow_cli_is_the_environment_s_own(monkeypatch, tmp_path):
    from tracking import runs

    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "mlflow").write_text("#!/bin/sh\n")
    monkeypatch.setattr("sys.executable", str(tmp_path / "venv" / "bin" / "python"))
    monkeypatch.chdir(tmp_path)
    assert runs.mlflow_cli() == "venv/bin/mlflow"            # typed from the working directory
    monkeypatch.chdir("/")
    assert runs.mlflow_cli() == str(tmp_path / "venv" / "bin" / "mlflow")
    monkeypatch.setattr("sys.executable", str(tmp_path / "python"))
    assert runs.mlflow_cli() == "mlflow"                      # no such file: the plain name
