"""The ``activation`` scorer (the README's worked example of adding a scorer): exact values against
the projection inputs of the model's own forward, and usable as a method and inside layerwise."""
import pytest
import torch

from conftest import GQA_SHAPES, make_tiny_model
from gqaprune.structured.config import StructuredConfig
from gqaprune.structured.methods import method_names, resolve, select
from gqaprune.structured.scorers.activation import activation_scores


def reference_scores(model, ids):
    """||W col|| * ||x col|| from inputs captured by hooks on a plain forward."""
    inputs = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for name, mod in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):
            def hook(_m, args, key=(i, name)):
                inputs.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).double())
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    attn, mlp = [], []
    for i, layer in enumerate(model.model.layers):
        xo, xd = torch.cat(inputs[(i, "o")]), torch.cat(inputs[(i, "down")])
        col = layer.self_attn.o_proj.weight.double().norm(dim=0) * xo.norm(dim=0)
        n_kv = layer.self_attn.k_proj.out_features // layer.self_attn.head_dim
        attn.append(col.reshape(n_kv, -1).sum(1))
        mlp.append(layer.mlp.down_proj.weight.double().norm(dim=0) * xd.norm(dim=0))
    return attn, mlp


@pytest.mark.parametrize("family,n_heads,n_kv", GQA_SHAPES)
def test_scores_equal_the_weighted_input_norms(family, n_heads, n_kv):
    model = make_tiny_model(family, n_heads, n_kv)
    ids = torch.randint(3, 97, (6, 12), generator=torch.Generator().manual_seed(0))
    scores = activation_scores(model, ids, batch_size=4)
    attn, mlp = reference_scores(model, ids)
    for i in range(len(attn)):
        torch.testing.assert_close(scores.attn[i].double(), attn[i], rtol=1e-5, atol=0)
        torch.testing.assert_close(scores.mlp[i].double(), mlp[i], rtol=1e-5, atol=0)
    assert scores.power == 1.0 and scores.attn[0].shape == (n_kv,)


def test_a_scorer_is_a_method_and_combines_with_every_allocator():
    assert "activation" in method_names() and resolve("activation").allocator_name == "global"
    model = make_tiny_model("llama", 8, 2, layers=3)
    ids = torch.randint(3, 97, (8, 16), generator=torch.Generator().manual_seed(1))
    glob = select(model, ids, "activation", StructuredConfig(pruning_ratio=0.3))
    assert abs(glob.plan.achieved_ratio() - 0.3) < 0.05 and glob.plan.method == "activation"
    lw = select(model, ids, "layerwise", StructuredConfig(pruning_ratio=0.3, scorer="activation"))
    assert resolve("layerwise", "activation").scorer_name == "activation"
    assert lw.plan.provenance.settings["scorer"] == "activation" and lw.allocation.rates
