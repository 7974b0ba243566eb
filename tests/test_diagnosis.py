"""Gradient diagnosis: exact ratios and extreme layers on a hand-built plan, the verdict's
remedy per method, figures, and second-order Taylor end to end (diagonal-Fisher term)."""
import pytest
import torch

from conftest import make_tiny_model
from gqaprune.structured.diagnosis import (diagnose, diagnosis_figure, rates_figure, remedy,
                                           scale_ratio, verdict)
from gqaprune.structured.rates import RateRow
from gqaprune.structured.scorers.taylor import TaylorConfig, gradient_stats, taylor_from_grads, taylor_scores
from gqaprune.structured.scoring import GradStat, UnitScores
from gqaprune.structured.plan import LayerPlan, PruningPlan
from gqaprune.arch import layer_parameters, prunable_parameters
from gqaprune.structured.units import LayerShape

SHAPE = LayerShape(4, 4, 2, 8, 20)    # group cost (1+2)*2*8 + 2*8 = 64; channel 24


def _plan(method="taylor"):
    # layer 0 untouched, layer 1 keeps 1 of 20 channels (95% of its MLP), layer 2: 2 groups, 10 channels
    layers = [LayerPlan([0, 1, 2, 3], list(range(20))), LayerPlan([0, 1, 2, 3], [7]),
              LayerPlan([0, 1], list(range(10)))]
    return PruningPlan("m", method, 0.3, [SHAPE] * 3, layers)


def _scores(grad_means=(0.1, 1e-4, 0.05), grad_norms=(2.0, 0.004, 1.0)):
    stats = [GradStat(n, m) for n, m in zip(grad_norms, grad_means)]
    return UnitScores([torch.full((4,), 64.0 * k) for k in (1.0, 0.001, 0.5)],
                      [torch.full((20,), 24.0 * k) for k in (1.0, 0.001, 0.5)], 1.0,
                      gradient_stats=stats)


def test_diagnosis_exact_values():
    d = diagnose(_plan(), _scores())
    assert d.grad_mean_ratio == pytest.approx(0.1 / 1e-4)
    assert d.grad_norm_ratio == pytest.approx(2.0 / 0.004)
    # per-parameter importance: every unit scores k * its cost -> layer mean importance is k
    assert [r.mean_importance for r in d.layers] == pytest.approx([1.0, 0.001, 0.5])
    assert d.mean_ratio == pytest.approx(1000.0)
    assert d.extreme_pruning_layers == [1] and d.num_extreme_pruning_layers == 1
    row1 = d.layers[1]
    assert row1.pruned_mlp_frac == pytest.approx(0.95) and row1.pruned_attn_frac == 0.0
    assert row1.pruned_frac == pytest.approx(19 * 24 / (256 + 480))


def test_layer_range_limits_the_diagnosis():
    d = diagnose(_plan(), _scores(), layers=range(0, 1))
    assert [r.layer for r in d.layers] == [0] and d.grad_mean_ratio == 1.0


def test_no_gradient_statistics_means_no_diagnosis():
    assert diagnose(_plan("magnitude"), UnitScores([], [], 2.0)) is None
    assert diagnose(_plan(), None) is None


def test_scale_ratio_caps_zero():
    assert scale_ratio([2.0, 0.5]) == 4.0
    assert scale_ratio([1.0, 0.0]) == pytest.approx(1e12)
    assert scale_ratio([0.0, 0.0]) == 1.0


def test_verdict_names_layers_and_remedy_for_global_taylor():
    d = diagnose(_plan(), _scores())
    text = verdict(d, {"normalization": "none", "clip_low": 0, "clip_high": 100, "temperature": 0})
    assert "EXTREME PRUNING in 1 of 3 layers" in text and "layer 1 (attention 0%, MLP 95%" in text
    assert "1e+03x" in text                     # grad mean ratio 1000
    # scales differ 1000x across layers: normalisation first; block balance is only a late option
    assert "rerun with normalization=log" in text and text.index("temperature=1") > text.index("layerwise")
    assert "\n" not in text                     # one paragraph


def test_block_skew_with_comparable_layer_scales_suggests_temperature_first():
    scores = _scores(grad_means=(0.1, 0.1, 0.1), grad_norms=(1.0, 1.0, 1.0))
    scores.attn = [torch.full((4,), 64.0)] * 3
    scores.mlp = [torch.full((20,), 24.0)] * 3
    d = diagnose(_plan(), scores)
    assert d.mean_ratio == pytest.approx(1.0) and d.extreme_pruning_layers == [1]
    assert remedy(d, {"normalization": "none"}).startswith("rerun with temperature=1")


def test_remedy_depends_on_what_is_already_set():
    d = diagnose(_plan(), _scores())
    r = remedy(d, {"normalization": "log", "clip_low": 5, "clip_high": 95, "temperature": 1.0})
    assert "normalization" not in r and "clip_low" not in r and "method=layerwise" in r
    lw = remedy(diagnose(_plan("layerwise"), _scores()), {"max_pruning_rate": 0.95, "alpha": 2.0})
    assert "lower max_pruning_rate (now 0.95)" in lw


def test_healthy_verdict():
    plan = _plan()
    plan.layers[1] = LayerPlan([0, 1, 2, 3], list(range(10)))
    text = verdict(diagnose(plan, _scores(grad_means=(0.1, 0.1, 0.1))), {"normalization": "none"})
    assert text.startswith("Gradient diagnosis: no layer lost more than 90%") and "No remedy needed" in text


def test_figures_draw():
    d = diagnose(_plan(), _scores())
    rows = [RateRow(i, b, 1.0 + i, 100, 0.3, 0.25) for i in range(3) for b in ("attn", "mlp")]
    fig = diagnosis_figure(d, "t", rows)
    assert len(fig.axes) == 2
    assert len(rates_figure(rows, "t").axes) == 2


# ---- taylor order 2 and the gradient statistics the diagnosis reads -------------------------

def test_second_order_taylor_adds_the_diagonal_fisher_term_end_to_end():
    model = make_tiny_model("llama", 4, 2, layers=2, hidden=16, intermediate=12)
    ids = torch.randint(4, 97, (4, 9), generator=torch.Generator().manual_seed(0))
    s1 = taylor_scores(model, ids, TaylorConfig("element", 1), batch_size=2)
    s2 = taylor_scores(model, ids, TaylorConfig("element", 2), batch_size=2)
    # reference by hand: per mini-batch gradients g_b, F = sum_b g_b^2, s = -w*g + 0.5*w^2*F
    gsum, fisher = {}, {}
    for b in (ids[:2], ids[2:]):
        model.zero_grad()
        model(input_ids=b, labels=b).loss.backward()
        for p in prunable_parameters(model):
            gsum[p] = gsum.get(p, 0) + p.grad.clone()
            fisher[p] = fisher.get(p, 0) + p.grad.pow(2)
    model.zero_grad()
    ref2 = taylor_from_grads(model, gsum, fisher, "element", 2)
    ref1 = taylor_from_grads(model, gsum, {}, "element", 1)
    for i in range(2):
        torch.testing.assert_close(s2.attn[i], ref2.attn[i])
        torch.testing.assert_close(s2.mlp[i], ref2.mlp[i])
        torch.testing.assert_close(s1.mlp[i], ref1.mlp[i])
    assert not torch.equal(s1.mlp[0], s2.mlp[0])     # the Fisher term is there (small: w ~ 0.02)
    stats = s2.gradient_stats
    layer0 = list(layer_parameters(model.model.layers[0]))
    n = sum(p.numel() for p in layer0)
    assert stats[0].grad_mean == pytest.approx(float(sum(gsum[p].abs().sum() for p in layer0) / n), rel=1e-5)
    assert stats == gradient_stats(model, gsum)


def test_mean_ratio_is_reported_before_and_after_conditioning():
    """mean_ratio is a property of the raw scores; mean_ratio_conditioned is measured on the keys the
    global ranking compared: equal without conditioning, near 1 once normalisation evens out layers."""
    from gqaprune.structured.conditioning import Conditioning, conditioned_keys
    plan, scores = _plan(), _scores()
    plain = diagnose(plan, scores, keys=conditioned_keys(plan.original, scores, Conditioning()))
    assert plain.mean_ratio == pytest.approx(1000.0) and plain.mean_ratio_conditioned == pytest.approx(1000.0)
    for norm in ("log", "zscore", "minmax", "sqrt"):
        d = diagnose(plan, scores, keys=conditioned_keys(plan.original, scores, Conditioning(norm)))
        assert d.mean_ratio == pytest.approx(1000.0)            # raw: unchanged by conditioning
        assert d.mean_ratio_conditioned < 10, (norm, d.mean_ratio_conditioned)
    assert diagnose(plan, scores).mean_ratio_conditioned is None   # no keys given: not reported
