"""The built-in demo model: trains offline, loads with Auto*, is deterministic and cached.

Uses a few training steps instead of the full run so the file stays fast.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from gqaprune import demo
from gqaprune.errors import UserError

STEPS = 12  # full run uses demo.DEFAULT_STEPS


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
    assert 0.02 < len(valid) / (len(train) + len(valid)) < 0.1
    with pytest.raises(UserError):
        demo.demo_texts("test")


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
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (8, 2, 8)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (512, 64, 4)
    assert len(tok) == 512
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", "<pad>")
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    text = "for x in range(3):\n    print(x)"
    ids = tok(text, return_tensors="pt").input_ids          # (1, T)
    assert ids[0, 0] == tok.bos_token_id
    assert tok.decode(ids[0], skip_special_tokens=True) == text
    logits = model(ids).logits                               # (1, T, 512)
    assert logits.shape == (1, ids.shape[1], 512)


def test_demo_info(demo_dir):
    info = json.loads((demo_dir / "demo_info.json").read_text())
    assert info["seed"] == 0 and info["steps"] == STEPS
    assert info["train_seconds"] > 0 and "heldout_method" in info
    assert 1 < info["heldout_perplexity"] < 512


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
