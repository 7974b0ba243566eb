"""Perplexity: exact values on hand-built models, windowing, BOS protocol, batching.

The bigram model's logits depend only on the previous token, so the exact perplexity of any
protocol follows from which (previous, target) pairs it scores: computed here independently
of the implementation's window bookkeeping.
"""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from gqaprune.errors import UserError
from gqaprune.evaluation.perplexity import PplProtocol, perplexity, windows

V, BOS = 11, 10


class BigramLM(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: NLL of a target depends on its predecessor only."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])          # [B, L, V]


class BigramKeepLM(BigramLM):
    """Same, with HF's ``logits_to_keep`` (only the last k positions get logits)."""

    def forward(self, input_ids, logits_to_keep=0):
        logits = self.table[input_ids]
        if isinstance(logits_to_keep, torch.Tensor):                   # positions, as in HF
            return SimpleNamespace(logits=logits[:, logits_to_keep])
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


@pytest.fixture(scope="module")
def table():
    return torch.randn(V, V, generator=torch.Generator().manual_seed(0)) * 3


def stream_of(T: int) -> torch.Tensor:
    return torch.randint(0, BOS, (T,), generator=torch.Generator().manual_seed(T))


def exact(table, stream, seq_len, stride, bos) -> tuple[float, int]:
    """Reference: the (prev, target) pairs each protocol scores, straight from its definition."""
    logp = F.log_softmax(table.double(), -1)
    pairs = []
    for i, tok in enumerate(stream.tolist()):
        # Non-overlapping: windows start every seq_len tokens. Overlapping: later windows score
        # only their last `stride` (< seq_len) tokens, never a window's first position.
        window_start = (i % seq_len == 0) if (stride or seq_len) == seq_len else (i == 0)
        if bos:
            pairs.append((BOS if window_start else int(stream[i - 1]), tok))
        elif not window_start:        # no BOS: a window's first token has no context
            pairs.append((int(stream[i - 1]), tok))
    nll = -sum(float(logp[p, t]) for p, t in pairs) / len(pairs)
    return math.exp(nll), len(pairs)


@pytest.mark.parametrize("cls", [BigramLM, BigramKeepLM])
@pytest.mark.parametrize("T,seq_len,stride,bos", [
    (40, 8, None, True), (41, 8, None, True), (37, 8, None, False), (40, 8, 3, True),
    (40, 8, 3, False), (9, 8, None, True), (8, 8, 8, True), (33, 5, 5, True), (50, 6, 1, True)])
def test_bigram_perplexity_is_exact(table, cls, T, seq_len, stride, bos):
    stream = stream_of(T)
    want_ppl, want_tokens = exact(table, stream, seq_len, stride, bos)
    got = perplexity(cls(table), stream, PplProtocol("t", seq_len=seq_len, stride=stride, bos=bos,
                                                    batch_size=3), BOS, show_progress=False)
    assert got.tokens == want_tokens
    assert got.ppl == pytest.approx(want_ppl, rel=1e-6)
    assert got.nll == pytest.approx(math.log(want_ppl), rel=1e-6)


def test_uniform_logits_give_vocab_size():
    stream = stream_of(30)
    got = perplexity(BigramLM(torch.zeros(V, V)), stream, PplProtocol("t", seq_len=7, bos=True), BOS,
                     show_progress=False)
    assert got.ppl == pytest.approx(V, rel=1e-6)  # float32 log-softmax
    assert got.tokens == 30 and got.windows == 5


@pytest.mark.parametrize("T,seq_len,stride,nsamples,want", [
    (10, 4, None, None, [(0, 4, 4), (4, 8, 4), (8, 10, 2)]),
    (10, 4, 2, None, [(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]),
    (10, 4, None, 2, [(0, 4, 4), (4, 8, 4)]),
    (9, 4, None, None, [(0, 4, 4), (4, 8, 4)]),            # 1-token tail needs BOS (min_len=1)
    (4, 4, 1, None, [(0, 4, 4)]),
    (3, 4, None, None, [(0, 3, 3)]),
])
def test_windows_table(T, seq_len, stride, nsamples, want):
    assert windows(torch.arange(T), seq_len, stride, nsamples) == want


@pytest.mark.parametrize("T", [1, 2, 7, 64, 65, 100])
@pytest.mark.parametrize("seq_len,stride", [(8, None), (8, 3), (8, 8), (5, 1)])
def test_with_bos_every_token_scored_once(T, seq_len, stride):
    spans = windows(torch.arange(T), seq_len, stride, None, min_len=1)
    covered = [t for b, e, new in spans for t in range(e - new, e)]
    assert covered == list(range(T))


def test_bos_is_context_never_target(table):
    """Stream of only BOS-free tokens; the BOS row of the table matters, its column never does."""
    stream = stream_of(24)
    t2 = table.clone()
    t2[:, BOS] += 100.0  # making BOS likely as a *target* changes every token's normaliser ...
    a = perplexity(BigramLM(table), stream, PplProtocol("t", seq_len=8, bos=True), BOS, show_progress=False)
    b = perplexity(BigramLM(t2), stream, PplProtocol("t", seq_len=8, bos=True), BOS, show_progress=False)
    assert b.ppl > a.ppl * 1e10                     # ... so ppl explodes, but
    assert a.tokens == b.tokens == 24               # BOS itself is never counted as a target


def test_bos_without_id_and_bad_protocols_are_user_errors(table):
    with pytest.raises(UserError, match="BOS"):
        perplexity(BigramLM(table), stream_of(10), PplProtocol("t", bos=True), None, show_progress=False)
    with pytest.raises(UserError, match="stride"):
        perplexity(BigramLM(table), stream_of(10), PplProtocol("t", seq_len=4, stride=5), BOS,
                   show_progress=False)
    with pytest.raises(UserError, match="too short"):
        perplexity(BigramLM(table), stream_of(1), PplProtocol("t", seq_len=4, bos=False), BOS,
                   show_progress=False)


def test_describe_names_the_protocol():
    text = PplProtocol("wikitext2", "test", 128, 64, False, 10).describe()
    assert text == "wikitext2 [test], 128-token stride 64 windows, no BOS, first 10 windows"


# ---- real HF models: batching and logits_to_keep change nothing -----------------------------

def _tiny(family: str, heads: int, kv: int):
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)
    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                          "mistral": (MistralConfig, MistralForCausalLM)}[family]
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=heads, num_key_value_heads=kv, head_dim=8, max_position_embeddings=64)
    return model_cls(cfg).eval()


def _naive(model, stream, seq_len, bos):
    """One window at a time, full logits, every token of the non-overlapping window scored."""
    nll, n = 0.0, 0
    for b in range(0, len(stream), seq_len):
        ids = stream[b:b + seq_len]
        inp = torch.cat([torch.tensor([BOS]), ids]) if bos else ids
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=inp[None]).logits[0].double(), -1)   # [L_in, V]
        tgt = inp[1:]
        nll -= float(logp[torch.arange(len(tgt)), tgt].sum())
        n += len(tgt)
    return math.exp(nll / n), n


@pytest.mark.parametrize("family,heads,kv", [("llama", 4, 4), ("qwen2", 8, 2), ("mistral", 8, 1)])
@pytest.mark.parametrize("bos", [True, False])
def test_hf_models_match_naive_window_loop(family, heads, kv, bos):
    model = _tiny(family, heads, kv)
    stream = stream_of(45)
    want, n = _naive(model, stream, 10, bos)
    for bs in (1, 4):
        got = perplexity(model, stream, PplProtocol("t", seq_len=10, bos=bos, batch_size=bs), BOS,
                         show_progress=False)
        assert got.tokens == n
        assert got.ppl == pytest.approx(want, rel=1e-5)
