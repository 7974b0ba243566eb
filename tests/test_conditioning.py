"""Score conditioning of the global taylor ranking: exact normalisations, order preservation,
T = 0 equals the plain global ranking, large T balances attention/MLP, tau gates."""
import itertools
import math

import pytest
import torch

from gqaprune.errors import UserError
from gqaprune.structured.allocation import global_plan_layers
from gqaprune.structured.conditioning import (NORMALIZATIONS, Conditioning, block_rho, clip_keys,
                                              conditioned_keys, conditioned_plan, normalize_keys)
from gqaprune.structured.scoring import UnitScores
from gqaprune.structured.units import LayerShape

GQA = [(4, 4), (8, 2), (8, 1)]


def _case(heads, kv, layers=4, seed=0, scale=(1.0, 1e-3, 1.0, 10.0), inter=48):
    """Random Taylor-like scores whose layers differ in scale (as gradient scales do)."""
    shapes = [LayerShape(heads, kv, 8, 64, inter) for _ in range(layers)]
    gen = torch.Generator().manual_seed(seed)
    attn = [torch.rand(kv, generator=gen) * 40 * scale[i % len(scale)] for i in range(layers)]
    mlp = [torch.rand(inter, generator=gen) * scale[i % len(scale)] for i in range(layers)]
    return shapes, UnitScores(attn, mlp, power=1.0)


def _removed_params(shapes, kept):
    return sum((s.n_kv - len(k.kept_kv_groups)) * s.group_cost +
               (s.intermediate - len(k.kept_channels)) * s.channel_cost for s, k in zip(shapes, kept))


# ---- exact normalisations --------------------------------------------------------------------

def test_normalisations_exact():
    d = torch.float64
    e = math.e
    torch.testing.assert_close(normalize_keys(torch.tensor([1, e, e * e], dtype=d), "log"),
                               torch.tensor([-1.0, 0.0, 1.0], dtype=d), atol=1e-6, rtol=0)
    torch.testing.assert_close(normalize_keys(torch.tensor([2.0, 4.0, 6.0], dtype=d), "minmax"),
                               torch.tensor([0.0, 0.5, 1.0], dtype=d))
    s = math.sqrt(1.5)   # population std of [1, 2, 3] is sqrt(2/3)
    torch.testing.assert_close(normalize_keys(torch.tensor([1.0, 2.0, 3.0], dtype=d), "zscore"),
                               torch.tensor([-s, 0.0, s], dtype=d))
    torch.testing.assert_close(normalize_keys(torch.tensor([1.0, 4.0, 9.0], dtype=d), "sqrt"),
                               torch.tensor([0.5, 1.0, 1.5], dtype=d))
    x = torch.tensor([3.0, 1.0], dtype=d)
    assert torch.equal(normalize_keys(x, "none"), x)
    # constant layers do not divide by zero
    for how in ("minmax", "zscore"):
        assert torch.equal(normalize_keys(torch.full((3,), 2.0, dtype=d), how), torch.zeros(3, dtype=d))


def test_log_normalisation_is_scale_free_and_handles_zero():
    x = torch.tensor([0.0, 1.0, 5.0, 20.0], dtype=torch.float64)
    torch.testing.assert_close(normalize_keys(x * 1e-6, "log"), normalize_keys(x, "log"))
    assert torch.isfinite(normalize_keys(x, "log")).all()


def test_clip_to_percentiles():
    keys = torch.arange(101, dtype=torch.float64)          # percentile p is the value p
    clipped = clip_keys(keys, 5, 95)
    assert clipped.min() == 5 and clipped.max() == 95 and torch.equal(clipped[5:96], keys[5:96])
    assert torch.equal(clip_keys(keys, 0, 100), keys)


@pytest.mark.parametrize("norm,clip", list(itertools.product(NORMALIZATIONS, [(0, 100), (5, 95)])))
def test_normalisation_keeps_the_order_inside_each_layer(norm, clip):
    shapes, scores = _case(8, 2)
    raw = conditioned_keys(shapes, scores, Conditioning())
    cond = conditioned_keys(shapes, scores, Conditioning(norm, *clip))
    for i in range(len(shapes)):
        a = torch.cat([raw.attn[i], raw.mlp[i]])
        b = torch.cat([cond.attn[i], cond.mlp[i]])
        less = a[:, None] < a[None, :]
        assert (b[:, None] <= b[None, :])[less].all()          # never reversed
        if clip == (0, 100):
            assert (b[:, None] < b[None, :])[less].all()       # strictly kept without clipping


def test_normalisation_changes_how_layers_compare():
    # Layer 1's scores are 1000x smaller: a plain ranking strips it, log normalisation does not.
    shapes, scores = _case(8, 2, scale=(1.0, 1e-3, 1.0, 1.0))
    plain, _ = conditioned_plan(shapes, scores, 0.4, range(4), Conditioning())
    logn, _ = conditioned_plan(shapes, scores, 0.4, range(4), Conditioning("log"))
    assert len(plain[1].kept_channels) == 1                    # > 90% of layer 1's MLP gone
    assert len(logn[1].kept_channels) > 10
    assert abs(_removed_params(shapes, plain) - _removed_params(shapes, logn)) <= shapes[0].group_cost


# ---- block correction -------------------------------------------------------------------------

@pytest.mark.parametrize("gqa,ratio,tau,seed", list(itertools.product(GQA, [0.1, 0.3, 0.45], [0.0, 1.0, 5.0], [0, 1])))
def test_temperature_zero_equals_plain_global_ranking(gqa, ratio, tau, seed):
    shapes, scores = _case(*gqa, seed=seed)
    layers = range(len(shapes))
    kept, info = conditioned_plan(shapes, scores, ratio, layers, Conditioning(temperature=0.0, tau=tau))
    assert kept == global_plan_layers(shapes, scores, ratio, layers)
    assert not any(r.gated for r in info.block_correction)


@pytest.mark.parametrize("gqa", GQA)
def test_temperature_zero_with_normalisation_equals_global_ranking_of_normalised_keys(gqa):
    shapes, scores = _case(*gqa)
    cond = Conditioning("zscore", 5, 95)
    kept, _ = conditioned_plan(shapes, scores, 0.3, range(4), cond)
    assert kept == global_plan_layers(shapes, conditioned_keys(shapes, scores, cond), 0.3, range(4))


@pytest.mark.parametrize("gqa", GQA)
def test_large_temperature_balances_attention_and_mlp(gqa):
    # attention scores tiny per parameter -> the plain ranking over-prunes attention
    shapes, scores = _case(*gqa, scale=(1.0,))
    scores.attn = [a * 1e-3 for a in scores.attn]
    plain, _ = conditioned_plan(shapes, scores, 0.3, range(4), Conditioning())
    bal, info = conditioned_plan(shapes, scores, 0.3, range(4), Conditioning(temperature=1e9))
    for s, k, row in zip(shapes, bal, info.block_correction):
        layer_rate = 1 - (len(k.kept_kv_groups) * s.group_cost + len(k.kept_channels) * s.channel_cost) / s.params
        assert abs(row.attn_rate - layer_rate) <= s.group_cost / s.attn_params / 2 + 1e-9 or \
            len(k.kept_kv_groups) == 1                       # one group always stays
    rows = info.block_correction
    gap = sum(abs(r.attn_rate - r.mlp_rate) for r in rows)
    gap_plain = sum(abs(r.attn_rate_global - r.mlp_rate_global) for r in rows)
    assert gap <= gap_plain
    if gqa == (4, 4):       # fine enough attention granularity to see it move
        assert gap < gap_plain
    # total kept within one MLP channel of the plain ranking's total
    assert abs(_removed_params(shapes, bal) - _removed_params(shapes, plain)) <= shapes[0].channel_cost / 2


def test_temperature_interpolates_monotonically():
    shapes, scores = _case(8, 1, layers=2, scale=(1.0,), inter=96)
    scores.attn = [a * 1e-3 for a in scores.attn]
    groups = []
    for t in (0.0, 0.5, 2.0, 1e9):
        kept, _ = conditioned_plan(shapes, scores, 0.3, range(2), Conditioning(temperature=t))
        groups.append(sum(len(k.kept_kv_groups) for k in kept))
    assert groups == sorted(groups)                           # attention gets pruned less and less


def test_tau_gates_the_correction():
    shapes, scores = _case(4, 4, scale=(1.0,))
    scores.attn = [a * 1e-3 for a in scores.attn]              # attention genuinely unimportant
    rho_a, rho_m = block_rho(shapes[0], scores, 0)
    assert rho_a < 1 < rho_m
    plain, _ = conditioned_plan(shapes, scores, 0.3, range(4), Conditioning())
    open_gate, _ = conditioned_plan(shapes, scores, 0.3, range(4), Conditioning(temperature=1e9, tau=0.0))
    closed, info = conditioned_plan(shapes, scores, 0.3, range(4), Conditioning(temperature=1e9, tau=1.0))
    assert open_gate != plain
    assert closed == plain and not any(r.gated for r in info.block_correction)


def test_block_rho_exact():
    s = LayerShape(4, 2, 2, 4, 3)         # group cost (2+2)*2*4 + 4*4 = 48, channel 12
    scores = UnitScores([torch.tensor([6.0, 6.0])], [torch.tensor([1.0, 1.0, 1.0])], power=1.0)
    # per param: attn 12/96, mlp 3/36, layer 15/132
    ra, rm = block_rho(s, scores, 0)
    assert ra == pytest.approx((12 / 96) / (15 / 132)) and rm == pytest.approx((3 / 36) / (15 / 132))


@pytest.mark.parametrize("kwargs,message", [
    (dict(normalization="l2"), "unknown normalization 'l2'"),
    (dict(temperature=-0.1), "temperature must be"),
    (dict(tau=-1.0), "tau must be"),
    (dict(clip_low=95, clip_high=5), "clip percentiles"),
    (dict(clip_high=101), "clip percentiles"),
    (dict(temperature=float("nan")), "temperature must be"),
])
def test_bad_conditioning(kwargs, message):
    with pytest.raises(UserError, match=message):
        Conditioning(**kwargs).validate()
