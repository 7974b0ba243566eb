"""Surgery: the pruned forward equals the masked dense forward, across families and GQA shapes."""
import pytest
import torch

from gqaprune.structured.config import StructuredConfig
from gqaprune.structured.methods import select
from gqaprune.structured.plan import LayerPlan, PruningPlan
from gqaprune.structured.surgery import apply_plan
from gqaprune.structured.units import group_rows, model_shapes
from tests.conftest import GQA_SHAPES, make_tiny_model


def masked_dense(model, plan):
    """Zero the o_proj columns of removed groups and down_proj columns of removed channels."""
    with torch.no_grad():
        for layer, shape, lp in zip(model.model.layers, plan.original, plan.layers):
            dropped = [g for g in range(shape.n_kv) if g not in lp.kept_kv_groups]
            if dropped:
                layer.self_attn.o_proj.weight[:, group_rows(shape, dropped, "q")] = 0
            ch = [c for c in range(shape.intermediate) if c not in lp.kept_channels]
            layer.mlp.down_proj.weight[:, ch] = 0
    return model


def random_plan(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = model_shapes(model)
    layers = []
    for s in shapes:
        n_kv = int(torch.randint(1, s.n_kv + 1, (1,), generator=g))
        n_ch = int(torch.randint(1, s.intermediate, (1,), generator=g))
        layers.append(LayerPlan(sorted(torch.randperm(s.n_kv, generator=g)[:n_kv].tolist()),
                                sorted(torch.randperm(s.intermediate, generator=g)[:n_ch].tolist())))
    return PruningPlan("tiny", "hand", 0.3, shapes, layers)


@pytest.mark.parametrize("family,n_heads,n_kv", GQA_SHAPES)
def test_pruned_forward_equals_masked_dense(family, n_heads, n_kv):
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    model = make_tiny_model(family, n_heads, n_kv)
    plan = random_plan(model)
    expected = masked_dense(make_tiny_model(family, n_heads, n_kv), plan)(ids).logits
    pruned = apply_plan(model, plan)
    torch.testing.assert_close(pruned(ids).logits, expected, rtol=1e-5, atol=1e-5)
    for layer, lp, s in zip(pruned.model.layers, plan.layers, plan.original):
        assert layer.self_attn.k_proj.out_features == len(lp.kept_kv_groups) * s.head_dim
        assert layer.self_attn.q_proj.out_features == len(lp.kept_kv_groups) * s.group_size * s.head_dim
        assert layer.mlp.down_proj.in_features == len(lp.kept_channels)


@pytest.mark.parametrize("family,n_heads,n_kv", GQA_SHAPES)
@pytest.mark.parametrize("method", ["taylor", "magnitude", "random"])
def test_methods_prune_every_family(family, n_heads, n_kv, method):
    model = make_tiny_model(family, n_heads, n_kv)
    ids = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(2))
    result = select(model, ids, method, StructuredConfig(pruning_ratio=0.3))
    plan = result.plan
    total = plan.prunable_before()
    assert abs(plan.achieved_ratio() - 0.3) * total <= max(s.group_cost for s in plan.original)
    apply_plan(model, plan)
    assert torch.isfinite(model(ids).logits).all()
    assert sum(s.params for s in model_shapes(model)) == plan.prunable_after()


def test_generation_works_after_non_uniform_pruning():
    model = make_tiny_model("llama", 8, 2)
    plan = random_plan(model, seed=3)
    apply_plan(model, plan)
    out = model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)
