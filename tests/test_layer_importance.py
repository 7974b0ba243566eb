"""Layer importance: the hand-run backbone equals model.forward, removal equals re-running the
model without the layer, an identity layer is least important, configs round-trip and refuse
other models, and reusing a config gives the same plan."""
import copy

import pytest
import torch

from conftest import GQA_SHAPES, STORIES, TINYSTORIES, make_tiny_model, needs_shared
from gqaprune.errors import UserError
from gqaprune.structured import methods
from gqaprune.structured.layer_importance import (LayerImportance, activation_importance,
                                                  compute_layer_importance, removal_importance)
from gqaprune.structured.config import StructuredConfig
from gqaprune.structured.rates import RatesConfig
from gqaprune.structured.units import model_shapes

N, T, B = 5, 12, 2


def _ids(vocab=97, seed=0):
    return torch.randint(4, vocab, (N, T), generator=torch.Generator().manual_seed(seed))


def _loss_sum(model, ids):
    with torch.no_grad():
        return sum(float(model(input_ids=ids[s:s + B], labels=ids[s:s + B], use_cache=False).loss) * ids[s:s + B, 1:].numel()
                   for s in range(0, ids.shape[0], B))


def _identity(model, layer):
    """Zero the layer's output projections: its residual updates vanish, it becomes identity."""
    with torch.no_grad():
        model.model.layers[layer].self_attn.o_proj.weight.zero_()
        model.model.layers[layer].mlp.down_proj.weight.zero_()
    return model


@pytest.mark.parametrize("family,heads,kv", GQA_SHAPES)
def test_removal_equals_rerunning_without_the_layer(family, heads, kv):
    model, ids = make_tiny_model(family, heads, kv, layers=3), _ids()
    layer, _, _, details = removal_importance(model, ids, "layer", batch_size=B)
    tokens = N * (T - 1)
    base = _loss_sum(model, ids)
    for i in range(3):
        ref = copy.deepcopy(model)
        ref.model.layers = torch.nn.ModuleList(l for j, l in enumerate(ref.model.layers) if j != i)
        assert layer[i] == pytest.approx((_loss_sum(ref, ids) - base) / tokens, abs=2e-5)
    assert details["baseline_ppl"] == pytest.approx(torch.tensor(base / tokens).exp().item(), rel=1e-5)
    # cost: L(L+1)/2 decoder-layer forwards and L+1 head evaluations per mini-batch
    batches = -(-N // B)
    assert details["cost"]["decoder_layer_forwards"] == batches * 6
    assert details["cost"]["head_evaluations"] == batches * 4
    assert details["cost"]["full_pass_equivalents"] <= details["cost"]["naive_full_passes"]


@pytest.mark.parametrize("family,heads,kv", [("llama", 8, 2), ("qwen2", 8, 2), ("mistral", 8, 1)])
def test_block_removal_equals_zeroing_the_block_output(family, heads, kv):
    model, ids = make_tiny_model(family, heads, kv, layers=3), _ids()
    _, attn, mlp, details = removal_importance(model, ids, "block", batch_size=B)
    base, tokens = _loss_sum(model, ids), N * (T - 1)
    for i in range(3):
        for block, proj, got in (("self_attn", "o_proj", attn[i]), ("mlp", "down_proj", mlp[i])):
            ref = copy.deepcopy(model)
            with torch.no_grad():
                getattr(getattr(ref.model.layers[i], block), proj).weight.zero_()
            assert got == pytest.approx((_loss_sum(ref, ids) - base) / tokens, abs=2e-5)
    assert details["cost"]["decoder_layer_forwards"] == -(-N // B) * (3 + 1.5 + 6)


@pytest.mark.parametrize("family,extra", [
    ("mistral", {"sliding_window": 4}),                                   # sliding mask everywhere
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),  # mixed
])
def test_sliding_window_masks_match_the_model(family, extra):
    model = make_tiny_model(family, 8, 2, layers=3)
    cfg = model.config
    for k, v in extra.items():
        setattr(cfg, k, v)
    if family == "qwen2":
        cfg.layer_types = ["full_attention"] + ["sliding_attention"] * 2
    model = type(model)(cfg).eval()
    # The first mini-batch is checked against model(...).loss inside; a wrong mask raises.
    removal_importance(model, _ids(), "layer", batch_size=B)
    layer, _, _, _ = removal_importance(model, _ids(), "layer", batch_size=N)
    ref = copy.deepcopy(model)
    ref.model.layers = torch.nn.ModuleList(list(ref.model.layers)[1:])
    ref.config.layer_types = cfg.layer_types[1:] if family == "qwen2" else None
    if family == "qwen2":
        ref.config.num_hidden_layers = 2
    assert layer[0] == pytest.approx((_loss_sum(ref, _ids()) - _loss_sum(model, _ids())) / (N * (T - 1)), abs=2e-5)


@pytest.mark.parametrize("family,heads,kv", GQA_SHAPES)
def test_identity_layer_has_zero_removal_and_lowest_activation_importance(family, heads, kv):
    model = _identity(make_tiny_model(family, heads, kv, layers=3), 1)
    layer, _, _, _ = removal_importance(model, _ids(), "layer", batch_size=B)
    assert layer[1] == 0.0                        # skipping an identity changes nothing, exactly
    act_layer, act_attn, act_mlp, _ = activation_importance(model, _ids(), batch_size=B)
    assert act_layer[1] == pytest.approx(0.0, abs=1e-6) and act_layer[1] == min(act_layer)
    assert act_attn[1] == pytest.approx(0.0, abs=1e-6) and act_mlp[1] == pytest.approx(0.0, abs=1e-6)
    assert min(act_layer[0], act_layer[2]) > 1e-4


@needs_shared
def test_identity_layer_is_least_important_in_a_trained_model():
    from gqaprune import data
    from gqaprune.loading import load_model_and_tokenizer, resolve_model
    model, tok = load_model_and_tokenizer(resolve_model(str(STORIES)))
    ids = data.calibration_batches(tok, str(TINYSTORIES), 8, 64, seed=0)
    dense, _, _, _ = removal_importance(model, ids, "layer", batch_size=4)
    assert min(dense) > 0                          # every trained layer matters
    layer, _, _, _ = removal_importance(_identity(model, 2), ids, "layer", batch_size=4)
    assert layer[2] == 0.0 and layer.index(min(layer)) == 2
    assert all(v > 0 for i, v in enumerate(layer) if i != 2)


# ---- config file and reuse -------------------------------------------------------------------------

def test_config_round_trip_and_compatibility(tmp_path):
    model = make_tiny_model("llama", 8, 2, layers=3)
    imp = compute_layer_importance(model, _ids(), "removal", "layer", B, model_name="tiny-a")
    path = imp.save(tmp_path / "layer_importance_config.json")
    back = LayerImportance.load(path)
    assert back == imp
    shapes = model_shapes(model)
    back.check_compatible("tiny-a", shapes, "layer")
    with pytest.raises(UserError, match="measured on model 'tiny-a', not 'tiny-b'"):
        back.check_compatible("tiny-b", shapes, "layer")
    with pytest.raises(UserError, match="is for 3 layers but the model has 4"):
        back.check_compatible("tiny-a", model_shapes(make_tiny_model("llama", 8, 2, layers=4)), "layer")
    with pytest.raises(UserError, match="other layer shapes"):
        back.check_compatible("tiny-a", model_shapes(make_tiny_model("llama", 8, 1, layers=3)), "layer")
    with pytest.raises(UserError, match="holds layer importance but block"):
        back.check_compatible("tiny-a", shapes, "block")
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(UserError, match="not a layer importance config"):
        LayerImportance.load(tmp_path / "bad.json")
    with pytest.raises(UserError, match="not found"):
        LayerImportance.load(tmp_path / "missing.json")


def test_activation_config_serves_both_granularities():
    model = make_tiny_model("qwen2", 8, 2, layers=3)
    imp = compute_layer_importance(model, _ids(), "activation", "layer", B, model_name="m")
    imp.check_compatible("m", model_shapes(model), "layer")
    imp.check_compatible("m", model_shapes(model), "block")


@pytest.mark.parametrize("method", ["layerwise", "blockwise"])
@pytest.mark.parametrize("importance", ["removal", "activation"])
def test_reused_importance_gives_the_same_plan(tmp_path, method, importance):
    model, ids = make_tiny_model("llama", 8, 2, layers=4), _ids(seed=3)
    cfg = StructuredConfig(pruning_ratio=0.3, rates=RatesConfig(importance_method=importance, importance_samples=4))
    fresh = methods.select(model, ids, method, cfg, model_name="tiny", batch_size=B)
    imp = fresh.allocation.layer_importance
    loaded = LayerImportance.load(imp.save(tmp_path / "imp.json"))
    reused = methods.select(model, ids, method, cfg, model_name="tiny", batch_size=B, layer_importance=loaded)
    assert reused.plan.layers == fresh.plan.layers
    assert reused.allocation.rates == fresh.allocation.rates
    assert abs(fresh.plan.achieved_ratio() - 0.3) < 0.01


def test_reusing_another_models_config_is_refused():
    model = make_tiny_model("llama", 8, 2, layers=3)
    imp = compute_layer_importance(model, _ids(), "removal", "layer", B, model_name="other")
    with pytest.raises(UserError, match="measured on model 'other'"):
        methods.select(model, _ids(), "layerwise", StructuredConfig(), model_name="tiny", layer_importance=imp)


def test_unknown_importance_method():
    with pytest.raises(UserError, match="unknown importance_method 'gradient'"):
        compute_layer_importance(make_tiny_model(), _ids(), "gradient")
