"""``activation``: activation-weighted magnitude of each unit (Wanda-sp style), forward passes only.

For an output projection W [H, k] with inputs x_j (column j), the contribution of column j is
measured by ||W[:, j]||_2 * ||x_j||_2, with ||x_j||_2 over every calibration token. A unit owns
input columns of its output projection:

  MLP channel c:  score_c = ||W_down[:, c]|| * ||x_c||          (x: down_proj inputs [n, I])
  KV group g:     score_g = sum_{j in g's G*head_dim o_proj columns} ||W_o[:, j]|| * ||x_j||

The statistics are sums of squares per input column, accumulated layer by layer on the walker
(one layer's inputs in memory at a time). Scores add over columns, so ``power`` is 1.
"""
from __future__ import annotations

import torch

from gqaprune.arch import run_layer
from gqaprune.calibrate import LayerWalker
from gqaprune.structured.scoring import SCORERS, Scorer, UnitScores
from gqaprune.structured.units import layer_shape


def _sum_squares(module, acc: dict, key: str):
    """A forward pre-hook adding sum_t x_t**2 of ``module``'s input [..., k] to acc[key] [k]."""
    def hook(_mod, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        acc[key] = acc.get(key, 0) + x.pow(2).sum(0)
    return module.register_forward_pre_hook(hook)


@torch.no_grad()
def activation_scores(model, batches: torch.Tensor, section=None, *, batch_size: int = 4,
                      seed: int = 0) -> UnitScores:
    """||W column|| * ||input column|| summed per KV group [n_kv] and per MLP channel [I]."""
    attn, mlp = [], []
    for step in LayerWalker(model, batches, batch_size, desc="activation scores"):
        layer, shape, acc = step.layer, layer_shape(step.layer), {}
        hooks = [_sum_squares(layer.self_attn.o_proj, acc, "o"), _sum_squares(layer.mlp.down_proj, acc, "down")]
        try:
            step.outputs = [run_layer(layer, h, kw) for h, kw in zip(step.inputs, step.kwargs)]
        finally:
            for h in hooks:
                h.remove()
        w_o = layer.self_attn.o_proj.weight.double().norm(dim=0)          # [n_heads * hd]
        w_down = layer.mlp.down_proj.weight.double().norm(dim=0)          # [I]
        per_col = w_o * acc["o"].sqrt()                                   # [n_heads * hd]
        attn.append(per_col.reshape(shape.n_kv, -1).sum(1).float().cpu())  # group g owns a block of G*hd columns
        mlp.append((w_down * acc["down"].sqrt()).float().cpu())
    return UnitScores(attn, mlp, power=1.0)


SCORERS.register("activation", Scorer(activation_scores, needs_calibration=True,
                                      summary="activation-weighted magnitude ||W col|| * ||x col|| (Wanda-sp)"))
