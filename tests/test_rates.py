"""Per-layer rate allocation: exact rates on hand-picked importances, target and clamps for every
strategy (table-driven), and the units chosen to meet the rates."""
import itertools

import pytest
import torch

from gqaprune.errors import UserError
from gqaprune.structured.scoring import UnitScores
from gqaprune.structured.layer_importance import LayerImportance
from gqaprune.structured.rates import (STRATEGIES, RatesConfig, allocate_rates, check_reachable_rates,
                                       nonuniform_plan, strategy_shares)
from gqaprune.structured.units import LayerShape

IMPORTANCES = {
    "graded": [1.0, 2.0, 3.0, 4.0, 5.0],
    "extreme": [1e-9, 1.0, 1e9, 5.0, 1e-3],
    "one_dominant": [1e6, 1.0, 1.0, 1.0, 1.0],
    "zero_and_negative": [-0.5, 0.0, 0.2, 0.0, 3.0],
    "equal": [0.7] * 5,
}
SIZES = [100, 250, 100, 400, 150]


@pytest.mark.parametrize("strategy,alpha,imp,ratio,clamps", list(itertools.product(
    STRATEGIES, [0.5, 1, 2, 3], IMPORTANCES, [0.2, 0.35, 0.49], [(0.15, 0.5), (0.0, 1.0), (0.1, 0.6)])))
def test_rates_meet_target_within_clamps(strategy, alpha, imp, ratio, clamps):
    lo, hi = clamps
    target = ratio * sum(SIZES)
    rates = allocate_rates(IMPORTANCES[imp], SIZES, target, strategy, alpha, lo, hi)
    assert sum(r * s for r, s in zip(rates, SIZES)) == pytest.approx(target, rel=1e-9, abs=1e-9)
    assert all(lo - 1e-12 <= r <= hi + 1e-12 for r in rates)
    density = [i / s for i, s in zip(IMPORTANCES[imp], SIZES)]
    order = sorted(range(5), key=lambda i: max(density[i], 1e-6 * max(map(abs, density))))
    ordered = [rates[i] for i in order]   # by increasing importance per parameter
    if strategy == "inverse":
        assert all(a >= b - 1e-12 for a, b in zip(ordered, ordered[1:]))
    elif strategy == "proportional":
        assert all(a <= b + 1e-12 for a, b in zip(ordered, ordered[1:]))
    else:
        assert rates == pytest.approx([ratio] * 5)


def test_inverse_and_proportional_exact_without_clamps():
    # inverse, alpha 1: r ~ 1/I -> [c, c/2], 100c + 50c = 60 -> c = 0.4
    assert allocate_rates([1, 2], [100, 100], 60, "inverse", 1, 0, 1) == pytest.approx([0.4, 0.2])
    # proportional, alpha 2: r ~ I^2 -> [c, 4c], 500c = 60
    assert allocate_rates([1, 2], [100, 100], 60, "proportional", 2, 0, 1) == pytest.approx([0.12, 0.48])
    # sizes differ: per-parameter importance d = [1/100, 12/300] = [0.01, 0.04];
    # inverse, alpha 0.5: r ~ d^-0.5 -> [c, c/2]; 100c + 300c/2 = 100 -> c = 0.4
    assert allocate_rates([1, 12], [100, 300], 100, "inverse", 0.5, 0, 1) == pytest.approx([0.4, 0.2])
    # same importance, 3x the parameters: the larger item is less important per parameter
    big, small = allocate_rates([5, 5], [300, 100], 120, "inverse", 1, 0, 1)
    assert big == pytest.approx(3 * small)


def test_clamped_layer_budget_is_rebalanced_onto_the_others():
    # Layer 0 is unimportant: inverse would give it ~1000x the rate -> clamped at 0.5, and the
    # remaining 0.9 - 0.5 of the budget is split equally by the two equally important layers.
    rates = allocate_rates([1, 1000, 1000], [100, 100, 100], 90, "inverse", 1, 0.15, 0.5)
    assert rates == pytest.approx([0.5, 0.2, 0.2])
    # Raising the floor: both important layers forced up to 0.3, layer 0 takes the rest.
    rates = allocate_rates([1, 1000, 1000], [100, 100, 100], 90, "inverse", 1, 0.3, 0.5)
    assert rates == pytest.approx([0.3, 0.3, 0.3])


def test_alpha_zero_is_uniform_and_alpha_spreads_rates():
    imp = [1.0, 2.0, 4.0]
    assert allocate_rates(imp, [1, 1, 1], 0.9, "inverse", 0, 0, 1) == pytest.approx([0.3] * 3)
    spread = [max(r) - min(r) for r in (allocate_rates(imp, [1, 1, 1], 0.9, "inverse", a, 0, 1)
                                        for a in (0.5, 1, 2))]
    assert spread[0] < spread[1] < spread[2]


def test_shares_are_scale_free():
    a = strategy_shares([1.0, 2.0, 3.0], "inverse", 2)
    b = strategy_shares([1e-6, 2e-6, 3e-6], "inverse", 2)
    torch.testing.assert_close(a / a.sum(), b / b.sum())


@pytest.mark.parametrize("kwargs,message", [
    (dict(strategy="steep"), "unknown pruning_strategy 'steep'"),
    (dict(min_rate=0.6, max_rate=0.5), "greater than max_pruning_rate"),
    (dict(min_rate=0.25), "min_pruning_rate 0.25 removes at least"),
    (dict(max_rate=0.15), "max_pruning_rate 0.15 removes at most"),
    (dict(alpha=-1.0), "alpha must be"),
    (dict(max_rate=1.5), "max_pruning_rate must be in [0, 1]"),
])
def test_bad_rate_settings(kwargs, message):
    args = dict(strategy="inverse", alpha=1.0, min_rate=0.15, max_rate=0.5) | kwargs
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        allocate_rates([1, 2, 3], [10, 10, 10], 6, **args)   # target: 20% of the items


def test_reachability_boundaries_are_inclusive():
    check_reachable_rates(0.15, 0.15, 0.5)
    check_reachable_rates(0.5, 0.15, 0.5)
    with pytest.raises(UserError):
        check_reachable_rates(0.1499, 0.15, 0.5)


# ---- units chosen for the rates ---------------------------------------------------------------

SHAPES = {  # (n_heads, n_kv) as in the GQA tiny configs; hidden 64, head_dim 8, 48 channels
    "4/4": (4, 4), "8/2": (8, 2), "8/1": (8, 1)}


def _case(heads, kv, layers=4, seed=0, scale=None):
    shapes = [LayerShape(heads, kv, 8, 64, 48) for _ in range(layers)]
    gen = torch.Generator().manual_seed(seed)
    scale = scale or [1.0] * layers
    scores = UnitScores([torch.rand(kv, generator=gen) * 100 * s for s in scale],
                        [torch.rand(48, generator=gen) * s for s in scale], power=1.0)
    return shapes, scores


def _importance(shapes, values, granularity):
    n = len(shapes)
    kw = {"layer": values} if granularity == "layer" else {"attn": values, "mlp": values[::-1]}
    return LayerImportance("removal", granularity, "m", n, [s.to_dict() for s in shapes], **kw)


@pytest.mark.parametrize("shape,granularity,strategy,alpha,values,ratio", list(itertools.product(
    SHAPES, ["layer", "block"], STRATEGIES, [0.5, 1, 2, 3],
    [[1.0, 2.0, 3.0, 4.0], [1e-6, 10.0, 1e6, 0.0]], [0.2, 0.35])))
def test_plan_meets_target_within_one_channel(shape, granularity, strategy, alpha, values, ratio):
    shapes, scores = _case(*SHAPES[shape])
    settings = RatesConfig(pruning_strategy=strategy, alpha=alpha)
    target = round(ratio * sum(s.params for s in shapes))
    kept, rows = nonuniform_plan(shapes, scores, _importance(shapes, values, granularity),
                                         granularity, range(len(shapes)), target, settings)
    removed = sum((s.n_kv - len(k.kept_kv_groups)) * s.group_cost +
                  (s.intermediate - len(k.kept_channels)) * s.channel_cost for s, k in zip(shapes, kept))
    assert abs(removed - target) <= shapes[0].channel_cost / 2
    for r in rows:   # target rates respect the clamps exactly ...
        assert 0.15 - 1e-12 <= r.target_rate <= 0.5 + 1e-12
    for r in rows:   # ... achieved ones up to the unit granularity of the item; MLP blocks may
        s = shapes[r.layer]  # also absorb the rounding of all attention blocks (4 groups: 0/25/50%)
        unit = s.group_cost if r.block in ("layer", "attn") else \
            s.channel_cost + sum(shapes[i].group_cost / 2 for i in range(len(shapes)))
        slack = unit / r.params + 1e-9
        assert 0.15 - slack <= r.achieved_rate <= 0.5 + slack, r
    assert all(k.kept_kv_groups and k.kept_channels for k in kept)


def test_units_inside_a_layer_follow_taylor_order():
    shapes, scores = _case(8, 2, layers=2)
    scores.mlp[0] = torch.arange(48, dtype=torch.float32)        # channel c has score c
    scores.attn[0] = torch.tensor([1e9, 1e9])                    # keep attention
    imp = _importance(shapes, [1.0, 1.0], "layer")
    kept, rows = nonuniform_plan(shapes, scores, imp, "layer", range(2),
                                         round(0.3 * sum(s.params for s in shapes)),
                                         RatesConfig(pruning_strategy="uniform"))
    gone = sorted(set(range(48)) - set(kept[0].kept_channels))
    assert gone == list(range(len(gone))) and len(gone) > 0      # the lowest channels went
    assert kept[0].kept_kv_groups == [0, 1]


def test_layer_range_only_prunes_selected_layers():
    shapes, scores = _case(8, 2, layers=4)
    imp = _importance(shapes, [1.0, 2.0, 3.0, 4.0], "layer")
    target = round(0.2 * sum(s.params for s in shapes))   # 40% of layers 1-2
    kept, rows = nonuniform_plan(shapes, scores, imp, "layer", range(1, 3), target,
                                         RatesConfig())
    assert [r.layer for r in rows] == [1, 2]
    assert kept[0].kept_channels == list(range(48)) and kept[3].kept_channels == list(range(48))
    assert sum(r.target_rate * r.params for r in rows) == pytest.approx(target)
