"""Global ranking: target ratio within one group, per-parameter comparability, constraints."""
import pytest
import torch

from gqaprune.errors import UserError
from gqaprune.structured.allocation import global_plan_layers, layer_range
from gqaprune.structured.scoring import UnitScores
from gqaprune.structured.plan import PruningPlan
from gqaprune.structured.units import LayerShape

SHAPES = [LayerShape(8, 2, 8, 64, 48)] * 3


def scores(seed=0, shapes=SHAPES, power=1.0):
    g = torch.Generator().manual_seed(seed)
    return UnitScores([torch.rand(s.n_kv, generator=g) for s in shapes],
                      [torch.rand(s.intermediate, generator=g) for s in shapes], power)


def achieved(kept, shapes=SHAPES):
    plan = PruningPlan("m", "t", 0.0, shapes, kept)
    return plan.achieved_ratio()


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.2, 0.35, 0.5, 0.7])
@pytest.mark.parametrize("power", [0.0, 1.0, 2.0])
def test_achieved_ratio_within_one_group_of_target(ratio, power):
    kept = global_plan_layers(SHAPES, scores(power=power), ratio, range(3))
    total = sum(s.params for s in SHAPES)
    assert abs(achieved(kept) - ratio) * total <= SHAPES[0].group_cost
    for lp in kept:  # every layer keeps a KV group and a channel
        assert lp.kept_kv_groups and lp.kept_channels


def test_units_ranked_per_parameter():
    # A group (cost 5120) with score 100 is worth 0.0195/param; channels (cost 192) with
    # score 1 are worth 0.0052/param -> channels go first although their raw score is lower...
    shapes = [LayerShape(8, 2, 8, 64, 48)]
    sc = UnitScores([torch.tensor([100.0, 1e9])], [torch.full((48,), 1.0)], 1.0)
    kept = global_plan_layers(shapes, sc, 0.2, range(1))
    assert kept[0].kept_kv_groups == [0, 1]
    # ...and a group whose per-parameter score is the lowest goes first.
    sc = UnitScores([torch.tensor([10.0, 1e9])], [torch.full((48,), 1.0)], 1.0)
    kept = global_plan_layers(shapes, sc, 0.2, range(1))
    assert kept[0].kept_kv_groups == [1]


def test_least_important_units_are_removed():
    shapes = [LayerShape(4, 4, 4, 16, 10)]
    mlp = torch.arange(10, dtype=torch.float)  # channel 0 least important
    sc = UnitScores([torch.full((4,), 1e6)], [mlp], 1.0)
    kept = global_plan_layers(shapes, sc, 3 * 48 / shapes[0].params, range(1))
    assert kept[0].kept_channels == list(range(3, 10))
    assert kept[0].kept_kv_groups == [0, 1, 2, 3]


def test_layer_range_restricts_pruning():
    kept = global_plan_layers(SHAPES, scores(), 0.1, range(1, 2))
    assert kept[0].kept_kv_groups == [0, 1] and len(kept[0].kept_channels) == 48
    assert kept[2].kept_kv_groups == [0, 1] and len(kept[2].kept_channels) == 48
    assert achieved(kept) == pytest.approx(0.1, abs=SHAPES[0].group_cost / sum(s.params for s in SHAPES))


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_ratio_outside_open_interval_is_rejected(ratio):
    with pytest.raises(UserError, match="pruning_ratio must be in"):
        global_plan_layers(SHAPES, scores(), ratio, range(3))


def test_ratio_too_high_for_one_group_per_layer():
    with pytest.raises(UserError, match="too high"):
        global_plan_layers(SHAPES, scores(), 0.95, range(3))
    with pytest.raises(UserError, match="too high"):
        global_plan_layers(SHAPES, scores(), 0.4, range(0, 1))


@pytest.mark.parametrize("start,end", [(-1, 2), (2, 2), (0, 4), (3, None)])
def test_layer_range_out_of_bounds(start, end):
    with pytest.raises(UserError, match="out of bounds"):
        layer_range(3, start, end)


def test_layer_range_defaults():
    assert layer_range(5, None, None) == range(5)
    assert layer_range(5, 1, None) == range(1, 5)
