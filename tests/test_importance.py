"""Unit scores on hand-built tensors: exact expected values for every scorer and variant."""
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gqaprune.structured.scorers.magnitude import magnitude_scores
from gqaprune.structured.scorers.random import random_scores
from gqaprune.structured.scorers.taylor import accumulate_gradients, taylor_from_grads
from gqaprune.structured.scoring import UnitScores
from gqaprune.arch import layer_parameters
from gqaprune.structured.units import LayerShape, group_rows, model_shapes


def one_layer(n_heads=2, n_kv=2, hd=2, hidden=4, inter=3):
    cfg = LlamaConfig(vocab_size=11, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                      num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=hd)
    return LlamaForCausalLM(cfg).eval()


def test_group_cost_counts_every_weight():
    s = LayerShape(n_heads=8, n_kv=2, head_dim=8, hidden=64, intermediate=172)
    # q: 4 heads*8 rows, k: 8, v: 8 rows (x64); o: 32 columns (x64)
    assert s.group_cost == (32 + 8 + 8 + 32) * 64
    assert s.channel_cost == 3 * 64
    assert s.params == 2 * s.group_cost + 172 * 3 * 64
    assert LayerShape(8, 2, 8, 64, 172, qkv_bias=True).group_cost == s.group_cost + 48


def test_group_rows_map_groups_to_query_and_kv_rows():
    s = LayerShape(n_heads=4, n_kv=2, head_dim=3, hidden=12, intermediate=5)
    assert group_rows(s, [1], "kv").tolist() == [3, 4, 5]
    assert group_rows(s, [1], "q").tolist() == list(range(6, 12))   # heads 2,3 share KV head 1
    assert group_rows(s, [0, 1], "kv").tolist() == list(range(6))


def test_magnitude_is_l2_norm_of_the_units_weights():
    model = one_layer()
    layer = model.model.layers[0]
    with torch.no_grad():
        for p in layer_parameters(layer):
            p.fill_(1.0)
        layer.self_attn.k_proj.weight[2:].fill_(2.0)       # group 1's k rows
        layer.mlp.down_proj.weight[:, 0].fill_(3.0)        # channel 0's down column
    scores = magnitude_scores(model)
    # group = q 2x4 + k 2x4 + v 2x4 + o 4x2 = 32 weights of 1 (group 1: k weights are 2)
    assert scores.attn[0].tolist() == pytest.approx([math.sqrt(32), math.sqrt(24 + 8 * 4)])
    # channel = gate 4 + up 4 + down 4: channel 0 has down = 3
    assert scores.mlp[0].tolist() == pytest.approx([math.sqrt(8 + 4 * 9), math.sqrt(12), math.sqrt(12)])
    assert scores.power == 2.0


def _hand_grads(model):
    """w = 1 everywhere; q-grad +1 on head 0, alternating +-1 on head 1; other grads 0.5."""
    layer = model.model.layers[0]
    with torch.no_grad():
        for p in layer_parameters(layer):
            p.fill_(1.0)
    grads = {p: torch.full_like(p, 0.5) for p in layer_parameters(layer)}
    gq = grads[layer.self_attn.q_proj.weight]
    gq[:2] = 1.0
    gq[2:] = torch.tensor([[1.0, -1.0, 1.0, -1.0]] * 2)
    return layer, grads


def test_taylor_vector_and_element_exact():
    model = one_layer()
    layer, grads = _hand_grads(model)
    vec = taylor_from_grads(model, grads, {}, "vector", 1)
    ele = taylor_from_grads(model, grads, {}, "element", 1)
    # group 0: |q 8*1| + |k 8*.5| + |v 8*.5| + |o 8*.5| = 8 + 4 + 4 + 4
    # group 1: q sums to 0 (vector) or 8 (element); the rest as group 0
    assert vec.attn[0].tolist() == pytest.approx([20.0, 12.0])
    assert ele.attn[0].tolist() == pytest.approx([20.0, 20.0])
    # channel: gate 4*.5 + up 4*.5 + down 4*.5
    assert vec.mlp[0].tolist() == pytest.approx([6.0, 6.0, 6.0])
    assert vec.power == 1.0


def test_taylor_second_order_adds_fisher_term():
    model = one_layer()
    layer, grads = _hand_grads(model)
    sq = {p: torch.full_like(p, 4.0) for p in grads}
    # element salience s = -w*g + 0.5*w^2*F = -g + 2
    sc = taylor_from_grads(model, grads, sq, "element", 2)
    # group 0: q: 8*|1-... -1+2|=8; k,v,o: 24*|-.5+2| = 36 -> 44
    # group 1: q: 4*|-1+2| + 4*|1+2| = 16; rest 36 -> 52
    assert sc.attn[0].tolist() == pytest.approx([44.0, 52.0])


def test_accumulated_gradients_equal_autograd_sum():
    torch.manual_seed(0)
    model = one_layer(n_heads=4, n_kv=2, hd=2, hidden=8, inter=6)
    ids = torch.randint(0, 11, (4, 7))
    grads, sq = accumulate_gradients(model, ids, batch_size=2, second_order=True)
    # Only projections got gradients, and requires_grad flags are restored.
    assert model.model.embed_tokens.weight.grad is None
    assert all(p.requires_grad for p in model.parameters())
    # Reference: two separate mini-batch backward passes.
    ref, ref_sq = {}, {}
    for b in (ids[:2], ids[2:]):
        model.zero_grad()
        model(input_ids=b, labels=b).loss.backward()
        for p in layer_parameters(model.model.layers[0]):
            ref[p] = ref.get(p, 0) + p.grad.clone()
            ref_sq[p] = ref_sq.get(p, 0) + p.grad.pow(2)
    for p in ref:
        torch.testing.assert_close(grads[p], ref[p])
        torch.testing.assert_close(sq[p], ref_sq[p])


def test_random_scores_are_seeded():
    model = one_layer()
    a = random_scores(model, None, seed=3)
    b = random_scores(model, None, seed=3)
    c = random_scores(model, None, seed=4)
    assert torch.equal(a.attn[0], b.attn[0]) and torch.equal(a.mlp[0], b.mlp[0])
    assert not torch.equal(a.mlp[0], c.mlp[0])
