"""Apply a pruning plan: physically remove KV groups and MLP channels.

Removing whole KV groups (k/v rows, the rows of the query heads that share them, and the
matching o_proj columns) keeps the attention forward exact for the kept heads: transformers
reads head counts from projection shapes, and the query-per-KV ratio is unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from gqaprune.arch import CFG_LAYER_HEADS, CFG_LAYER_INTER, CFG_LAYER_KV, decoder_layers
from gqaprune.structured.plan import PruningPlan
from gqaprune.structured.units import group_rows, model_shapes

# Per-layer sizes of a non-uniform model go into the config under gqaprune.arch.CFG_LAYER_* (read
# by our loader and by the remote modeling code shipped with such checkpoints).


@torch.no_grad()
def slice_linear(linear: nn.Linear, out_idx: torch.Tensor | None = None,
                 in_idx: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear keeping rows ``out_idx`` and columns ``in_idx`` (same dtype/device)."""
    w = linear.weight
    if out_idx is not None:
        w = w.index_select(0, out_idx.to(w.device))
    if in_idx is not None:
        w = w.index_select(1, in_idx.to(w.device))
    bias = linear.bias
    if bias is not None and out_idx is not None:
        bias = bias.index_select(0, out_idx.to(bias.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    new.weight.copy_(w)
    if bias is not None:
        new.bias.copy_(bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def prune_layer(layer, shape, kept_groups: list[int], kept_channels: list[int]) -> None:
    attn, mlp = layer.self_attn, layer.mlp
    groups = torch.tensor(sorted(kept_groups), dtype=torch.long)
    q_idx = group_rows(shape, groups, "q")
    kv_idx = group_rows(shape, groups, "kv")
    attn.q_proj = slice_linear(attn.q_proj, out_idx=q_idx)
    attn.k_proj = slice_linear(attn.k_proj, out_idx=kv_idx)
    attn.v_proj = slice_linear(attn.v_proj, out_idx=kv_idx)
    attn.o_proj = slice_linear(attn.o_proj, in_idx=q_idx)
    ch = torch.tensor(sorted(kept_channels), dtype=torch.long)
    mlp.gate_proj = slice_linear(mlp.gate_proj, out_idx=ch)
    mlp.up_proj = slice_linear(mlp.up_proj, out_idx=ch)
    mlp.down_proj = slice_linear(mlp.down_proj, in_idx=ch)
    # Attributes some code paths read instead of the shapes.
    for obj, name, value in ((attn, "num_heads", len(groups) * shape.group_size),
                             (attn, "num_key_value_heads", len(groups)),
                             (mlp, "intermediate_size", len(ch))):
        if hasattr(obj, name):
            setattr(obj, name, value)


def record_layer_sizes(model) -> None:
    """Write per-layer sizes into the (shared) config; uniform sizes also update the vanilla keys."""
    shapes = model_shapes(model)
    cfg = model.config
    heads = [s.n_heads for s in shapes]
    kv = [s.n_kv for s in shapes]
    inter = [s.intermediate for s in shapes]
    setattr(cfg, CFG_LAYER_HEADS, heads)
    setattr(cfg, CFG_LAYER_KV, kv)
    setattr(cfg, CFG_LAYER_INTER, inter)
    cfg.head_dim = shapes[0].head_dim  # never cut; pin it so hidden/heads is not used
    # transformers validates hidden % num_attention_heads on load: only a uniform, divisible
    # model gets its vanilla keys rewritten; otherwise they keep the original (valid) values and
    # the per-layer lists above are the truth (see checkpoint.py).
    if len(set(heads)) == 1 and len(set(inter)) == 1 and shapes[0].hidden % heads[0] == 0:
        cfg.num_attention_heads = heads[0]
        cfg.num_key_value_heads = kv[0]
        cfg.intermediate_size = inter[0]


def apply_plan(model, plan: PruningPlan):
    """Prune ``model`` in place according to ``plan`` and return it."""
    shapes = model_shapes(model)
    plan.check_compatible(shapes)
    for layer, shape, lp in zip(decoder_layers(model), shapes, plan.layers):
        prune_layer(layer, shape, lp.kept_kv_groups, lp.kept_channels)
    record_layer_sizes(model)
    return model
