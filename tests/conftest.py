"""Shared fixtures: tiny GQA models built from configs, ../shared assets, a temporary MLflow store."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
TINYSTORIES = SHARED / "data" / "tinystories" / "tinystories_dev.txt"
SHARED_REASON = (f"needs the shared test assets at {SHARED} (stories260K model and TinyStories "
                 "text); a fresh clone does not have them, CI does")

needs_shared = pytest.mark.skipif(not (STORIES.is_dir() and TINYSTORIES.is_file()), reason=SHARED_REASON)

# (family, n_heads, n_kv) shapes every structural test runs across.
GQA_SHAPES = [("llama", 4, 4), ("llama", 8, 2), ("llama", 8, 1),
              ("qwen2", 8, 2), ("qwen2", 4, 4), ("mistral", 8, 2), ("mistral", 8, 1)]


def make_tiny_model(family: str = "llama", n_heads: int = 8, n_kv: int = 2, layers: int = 3,
                    hidden: int = 64, intermediate: int = 48, vocab: int = 97, seed: int = 0):
    """A randomly initialised tiny causal LM of the given family (float32, eval mode)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "mistral": (MistralConfig, MistralForCausalLM)}
    conf_cls, model_cls = classes[family]
    config = conf_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=n_heads,
                      num_key_value_heads=n_kv, head_dim=hidden // n_heads if hidden % n_heads == 0 else 8,
                      max_position_embeddings=128, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # Default init leaves RMSNorm at 1 and small weights; perturb biases (Qwen2) so tests see them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


@pytest.fixture
def tiny_model():
    return make_tiny_model


@pytest.fixture
def word_tokenizer(tmp_path):
    """A tiny word-level fast tokenizer (vocab 97) with BOS/EOS/PAD, built offline."""
    return make_word_tokenizer(tmp_path / "tok")


def make_word_tokenizer(directory: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(93)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    # transformers 5 records the class as "TokenizersBackend", which AutoTokenizer resolves by the
    # model's type (Qwen2Tokenizer for qwen2, losing our word-level vocab): pin the generic class.
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return fast


@pytest.fixture
def text_file(tmp_path):
    """A local corpus of word-tokens for calibration/eval of the tiny models."""
    gen = torch.Generator().manual_seed(0)
    paras = []
    for _ in range(60):
        ids = torch.randint(4, 97, (40,), generator=gen).tolist()
        paras.append(" ".join(f"w{i - 4}" for i in ids))
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paras))
    return path


@pytest.fixture
def saved_tiny_model(tmp_path):
    """Factory: save a tiny model + word tokenizer to a directory and return its path."""
    def make(family="llama", n_heads=8, n_kv=2, **kw):
        directory = tmp_path / f"{family}-{n_heads}-{n_kv}"
        model = make_tiny_model(family, n_heads, n_kv, **kw)
        model.save_pretrained(directory)
        make_word_tokenizer(directory)
        return directory
    return make


@pytest.fixture(scope="session")
def _session_store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def tracking_store(_session_store, monkeypatch):
    """A temporary MLflow store (shared by the session) and a fresh experiment per test."""
    import mlflow
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _session_store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"test-{uuid.uuid4().hex[:8]}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(_session_store)
    while mlflow.active_run():
        mlflow.end_run()
    yield _session_store
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Tests never touch the hub: fail fast instead of retrying."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("GQAPRUNE_CACHE", os.environ.get("GQAPRUNE_CACHE", str(REPO / ".cache")))
    # mlflow.set_experiment() in a test's own process exports MLFLOW_EXPERIMENT_ID; left behind,
    # every later `mlflow run --experiment-name` fails ("Specify only one of ..."). Restore it.
    if "MLFLOW_EXPERIMENT_ID" in os.environ:
        monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", os.environ["MLFLOW_EXPERIMENT_ID"])
    else:
        monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)


_FIGURES_CHECKED: dict[str, int] = {}
FIGURE_CHECKS_PER_NAME = 3     # each kind of figure is checked on its first few inputs (a draw each)


@pytest.fixture(autouse=True)
def _figure_layout(monkeypatch):
    """Every figure a test logs through tracking.runs.log_figure (the toolkit's one way to write a
    figure) must lay out well: nothing cut, legends outside the data, unique labels, a title
    (tests/figure_layout.py). GQAPRUNE_FIGURE_AUDIT=<file> also records every check as JSON lines."""
    from figure_layout import layout_problems
    from tracking import runs
    real, found, audit = runs.log_figure, [], os.environ.get("GQAPRUNE_FIGURE_AUDIT")

    def checked(fig, name):
        if audit or _FIGURES_CHECKED.get(name, 0) < FIGURE_CHECKS_PER_NAME:
            _FIGURES_CHECKED[name] = _FIGURES_CHECKED.get(name, 0) + 1
            problems = layout_problems(fig)
            found.extend(f"{name}: {p}" for p in problems)
            if audit:
                with open(audit, "a") as fh:
                    fh.write(json.dumps({"name": name, "problems": problems}) + "\n")
        return real(fig, name)
    monkeypatch.setattr(runs, "log_figure", checked)
    yield
    if found:
        pytest.fail("figure layout: " + "; ".join(found), pytrace=False)
