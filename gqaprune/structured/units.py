"""Prunable units of a GQA decoder layer and their parameter costs.

* A **KV group** g: KV head g, the ``G = n_heads / n_kv`` query heads that share it, their rows
  in q/k/v (and biases) and their columns in o_proj. head_dim is never cut.
* An **MLP channel** c: row c of gate_proj and up_proj, column c of down_proj.

Shapes (hd = head_dim, H = hidden): q_proj.weight [n_heads*hd, H], k/v_proj.weight [n_kv*hd, H],
o_proj.weight [H, n_heads*hd], gate/up_proj.weight [I, H], down_proj.weight [H, I].
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from gqaprune.arch import decoder_layers


@dataclass(frozen=True)
class LayerShape:
    n_heads: int
    n_kv: int
    head_dim: int
    hidden: int
    intermediate: int
    qkv_bias: bool = False
    mlp_bias: bool = False

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv

    @property
    def group_cost(self) -> int:
        """Parameters removed with one KV group."""
        rows = (self.group_size + 2) * self.head_dim          # q rows + k rows + v rows
        cols = self.group_size * self.head_dim                # o_proj columns
        return (rows + cols) * self.hidden + (rows if self.qkv_bias else 0)

    @property
    def channel_cost(self) -> int:
        return 3 * self.hidden + (2 if self.mlp_bias else 0)

    @property
    def attn_params(self) -> int:
        return self.n_kv * self.group_cost

    @property
    def mlp_params(self) -> int:
        return self.intermediate * self.channel_cost

    @property
    def params(self) -> int:
        return self.attn_params + self.mlp_params

    def to_dict(self) -> dict:
        return asdict(self)


def layer_shape(layer) -> LayerShape:
    """Read a decoder layer's sizes from its projection shapes (the truth after surgery)."""
    attn, mlp = layer.self_attn, layer.mlp
    hd = attn.head_dim
    hidden = attn.q_proj.in_features
    n_heads = attn.q_proj.out_features // hd
    n_kv = attn.k_proj.out_features // hd
    return LayerShape(n_heads, n_kv, hd, hidden, mlp.gate_proj.out_features,
                      attn.q_proj.bias is not None, mlp.gate_proj.bias is not None)


def model_shapes(model) -> list[LayerShape]:
    return [layer_shape(layer) for layer in decoder_layers(model)]


def prunable_params(shapes: list[LayerShape]) -> int:
    return sum(s.params for s in shapes)


def group_rows(shape: LayerShape, groups: torch.Tensor | list[int], kind: str) -> torch.Tensor:
    """Row (or o_proj column) indices of the given KV groups.

    kind "q": rows of q_proj / columns of o_proj (G*hd per group); kind "kv": rows of k/v_proj.
    """
    groups = torch.as_tensor(groups, dtype=torch.long)
    width = shape.group_size * shape.head_dim if kind == "q" else shape.head_dim
    return (groups[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


def unit_tensors(layer, shape: LayerShape):
    """Per-unit views used by scorers.

    Returns (attn, mlp) where ``attn`` is a list of tensors shaped [n_kv, ...] (one slice per KV
    group) and ``mlp`` a list shaped [I, ...] (one slice per channel); a scorer reduces every
    dimension but the first. Pass a function of the weight (e.g. ``w * grad``) through
    :func:`unit_views` instead when scoring gradients.
    """
    return unit_views(layer, shape, lambda p: p.detach())


def unit_views(layer, shape: LayerShape, fn):
    """Apply ``fn`` to every unit-bearing parameter and regroup the results per unit.

    attn: q/o rows grouped [n_kv, G*hd, H]; k/v [n_kv, hd, H]; biases [n_kv, rows];
    mlp: gate/up [I, H]; down^T [I, H]; biases [I].
    """
    attn_mod, mlp_mod = layer.self_attn, layer.mlp
    n_kv, hd, H = shape.n_kv, shape.head_dim, shape.hidden
    attn = [fn(attn_mod.q_proj.weight).reshape(n_kv, -1, H),
            fn(attn_mod.k_proj.weight).reshape(n_kv, hd, H),
            fn(attn_mod.v_proj.weight).reshape(n_kv, hd, H),
            fn(attn_mod.o_proj.weight).reshape(H, n_kv, -1).transpose(0, 1)]
    if shape.qkv_bias:
        attn += [fn(attn_mod.q_proj.bias).reshape(n_kv, -1),
                 fn(attn_mod.k_proj.bias).reshape(n_kv, hd),
                 fn(attn_mod.v_proj.bias).reshape(n_kv, hd)]
    mlp = [fn(mlp_mod.gate_proj.weight), fn(mlp_mod.up_proj.weight),
           fn(mlp_mod.down_proj.weight).t()]
    if shape.mlp_bias:
        mlp += [fn(mlp_mod.gate_proj.bias), fn(mlp_mod.up_proj.bias)]
    return attn, mlp
