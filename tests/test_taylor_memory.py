"""The streamed Taylor scorer (gradient hooks, per-unit sums) equals the full-gradient reference,
and never lets mini-batch gradients of all layers coexist."""
import pytest
import torch

from gqaprune.arch import prunable_parameters
from gqaprune.structured.scorers.taylor import (TaylorConfig, accumulate_gradients, stream_taylor,
                                                taylor_from_grads, taylor_scores)
from tests.conftest import GQA_SHAPES, make_tiny_model

SETTINGS = [(variant, order) for variant in ("vector", "element") for order in (1, 2)]


def _ids(n=3, t=7, seed=0):
    return torch.randint(4, 97, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family,n_heads,n_kv", GQA_SHAPES)
def test_streamed_scores_equal_the_full_gradient_reference(family, n_heads, n_kv):
    model = make_tiny_model(family, n_heads, n_kv, layers=2, hidden=16, intermediate=12)
    ids = _ids()                              # 2 mini-batches: 2 and 1 windows
    # the reference holds every full gradient: G = sum_b g_b and F = sum_b g_b^2 per element
    grads, sq = accumulate_gradients(model, ids, batch_size=2, second_order=True)
    for variant, order in SETTINGS:
        ref = taylor_from_grads(model, grads, sq, variant, order)
        got = taylor_scores(model, ids, TaylorConfig(variant, order), batch_size=2)
        for a, b in zip(got.attn + got.mlp, ref.attn + ref.mlp):
            if (variant, order) == ("vector", 2):  # per-unit Fisher sums: another summation order
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
            else:                                  # the same arithmetic as the reference
                assert torch.equal(a, b), (variant, order)
        assert got.gradient_stats == ref.gradient_stats
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("variant,order", [("vector", 2), ("element", 2), ("vector", 1)])
def test_at_most_one_mini_batch_gradient_is_alive(variant, order):
    """A hook registered before the scorer's sees every gradient as autograd produces it: no other
    parameter still holds a .grad (the scorer folded and freed it)."""
    model = make_tiny_model("llama", 8, 2, layers=3, hidden=16, intermediate=12)
    params = list(prunable_parameters(model))
    alive = []
    handles = [p.register_post_accumulate_grad_hook(
        lambda p: alive.append(sum(q.grad is not None for q in params))) for p in params]
    try:
        sums = stream_taylor(model, _ids(4), 2, variant, order)
    finally:
        for h in handles:
            h.remove()
    assert len(alive) == 2 * len(params) and max(alive) == 1
    # what is held: G per parameter; F per element only for element order 2; per-unit vectors otherwise
    assert set(sums.grad) == set(params)
    assert len(sums.fisher) == (len(params) if (variant, order) == ("element", 2) else 0)
    assert (sums.unit_fisher is not None) == ((variant, order) == ("vector", 2))
    if (variant, order) == ("vector", 2):
        attn, mlp = sums.unit_fisher[0]
        assert [a.shape for a in attn] == [torch.Size([2])] * 4 and [m.shape for m in mlp] == [torch.Size([12])] * 3
