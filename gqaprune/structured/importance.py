"""Unit importance scores: taylor, magnitude, random (a registry).

Every scorer returns :class:`UnitScores`: one score per KV group and per MLP channel of every
layer, plus ``power`` telling how the score grows with unit size (used to make units of
different parameter cost comparable in a global ranking, see ``allocation.ranking_key``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from gqaprune.errors import UserError
from gqaprune.arch import decoder_layers, layer_parameters, prunable_parameters
from gqaprune.structured.units import LayerShape, model_shapes, unit_views


@dataclass
class UnitScores:
    attn: list[torch.Tensor]    # per layer, [n_kv]
    mlp: list[torch.Tensor]     # per layer, [intermediate]
    power: float = 1.0          # score ~ cost**(1/power): taylor 1 (additive), L2 norm 2
    extras: dict = field(default_factory=dict)  # e.g. gradient statistics for diagnosis


@dataclass(frozen=True)
class ScoreSettings:
    taylor_variant: str = "vector"     # vector: |sum(w*g)|; element: sum|w*g|
    taylor_order: int = 1              # 2 adds the diagonal-Fisher term
    batch_size: int = 4
    seed: int = 0


SCORERS: dict[str, Callable] = {}
TAYLOR_VARIANTS = ("vector", "element")


def register_scorer(name: str):
    def deco(fn):
        SCORERS[name] = fn
        return fn
    return deco


def get_scorer(name: str):
    if name not in SCORERS:
        raise UserError(f"unknown importance scorer '{name}'", f"use one of {', '.join(SCORERS)}")
    return SCORERS[name]


def _reduce(parts: list[torch.Tensor], how: str) -> torch.Tensor:
    """Sum per-tensor unit reductions. parts: tensors [n_units, ...] -> [n_units].

    vector:  sum_t |sum_{elements of unit in t} x|   (sum then abs, per tensor)
    element: sum_t  sum_{elements of unit in t} |x|  (abs then sum)
    l2sq:    sum_t  sum x**2
    """
    total = None
    for p in parts:
        flat = p.reshape(p.shape[0], -1).float()
        if how == "vector":
            r = flat.sum(1).abs()
        elif how == "element":
            r = flat.abs().sum(1)
        else:
            r = flat.pow(2).sum(1)
        total = r if total is None else total + r
    return total.cpu()


# ---- magnitude ---------------------------------------------------------------------------

@register_scorer("magnitude")
def magnitude_scores(model, batches=None, settings: ScoreSettings = ScoreSettings()) -> UnitScores:
    """L2 norm of all weights (and biases) of each unit."""
    attn, mlp = [], []
    for layer, shape in zip(decoder_layers(model), model_shapes(model)):
        a, m = unit_views(layer, shape, lambda p: p.detach())
        attn.append(_reduce(a, "l2sq").sqrt())
        mlp.append(_reduce(m, "l2sq").sqrt())
    return UnitScores(attn, mlp, power=2.0)


# ---- random ------------------------------------------------------------------------------

@register_scorer("random")
def random_scores(model, batches=None, settings: ScoreSettings = ScoreSettings()) -> UnitScores:
    """Uniform random scores, seeded; ranked without any cost normalisation."""
    gen = torch.Generator().manual_seed(settings.seed)
    shapes = model_shapes(model)
    return UnitScores([torch.rand(s.n_kv, generator=gen) for s in shapes],
                      [torch.rand(s.intermediate, generator=gen) for s in shapes], power=0.0)


# ---- taylor ------------------------------------------------------------------------------

def accumulate_gradients(model, batches: torch.Tensor, batch_size: int, second_order: bool,
                         desc: str = "taylor") -> tuple[dict, dict]:
    """Causal-LM loss gradients of the prunable parameters, summed over mini-batches.

    batches: LongTensor [N, T]. Returns ({param: sum_b g_b}, {param: sum_b g_b**2} or {}).
    Only the projection weights require grad, so embeddings/lm_head cost no gradient memory.
    """
    params = list(prunable_parameters(model))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    grad_sum: dict = {}
    grad_sq: dict = {}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, batches.shape[0], batch_size), desc=desc, leave=False):
            ids = batches[start: start + batch_size].to(device)
            model(input_ids=ids, labels=ids).loss.backward()
            if second_order:
                # The Fisher diagonal needs each mini-batch gradient g_b, so sum by hand.
                for p in params:
                    g, p.grad = p.grad, None
                    grad_sum[p] = g if p not in grad_sum else grad_sum[p] + g
                    grad_sq[p] = g.float().pow(2) + grad_sq.get(p, 0)
        if not second_order:  # .grad already holds sum_b g_b
            grad_sum = {p: p.grad for p in params}
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    for p in params:
        p.grad = None
    return grad_sum, grad_sq


def gradient_stats(model, grads: dict) -> list[dict]:
    """Per-layer gradient norm and mean |g| over the layer's projection weights."""
    out = []
    for layer in decoder_layers(model):
        gs = [grads[p].float() for p in layer_parameters(layer)]
        n = sum(g.numel() for g in gs)
        out.append({"grad_norm": float(torch.sqrt(sum(g.pow(2).sum() for g in gs))),
                    "grad_mean": float(sum(g.abs().sum() for g in gs) / n)})
    return out


def taylor_from_grads(model, grads: dict, grad_sq: dict, variant: str, order: int) -> UnitScores:
    """Aggregate element saliences per unit.

    Element salience (estimated loss change when the weight is zeroed):
      order 1:  s = w * g
      order 2:  s = -w * g + 0.5 * w**2 * F,   F = sum_b g_b**2 (diagonal Fisher)
    vector variant: sum_t |sum_unit s|;  element variant: sum_t sum_unit |s|.
    """
    if variant not in TAYLOR_VARIANTS:
        raise UserError(f"unknown taylor_variant '{variant}'", f"use one of {', '.join(TAYLOR_VARIANTS)}")
    if order not in (1, 2):
        raise UserError(f"taylor_order must be 1 or 2 (got {order})", "use 1 or 2")

    def salience(p):
        w, g = p.detach().float(), grads[p].float()
        if order == 1:
            return w * g
        return -w * g + 0.5 * w.pow(2) * grad_sq[p]

    attn, mlp = [], []
    for layer, shape in zip(decoder_layers(model), model_shapes(model)):
        a, m = unit_views(layer, shape, salience)
        attn.append(_reduce(a, variant))
        mlp.append(_reduce(m, variant))
    return UnitScores(attn, mlp, power=1.0, extras={"gradient_stats": gradient_stats(model, grads)})


@register_scorer("taylor")
def taylor_scores(model, batches: torch.Tensor, settings: ScoreSettings = ScoreSettings()) -> UnitScores:
    """First/second-order Taylor importance over calibration batches [N, T]."""
    if settings.taylor_variant not in TAYLOR_VARIANTS:
        raise UserError(f"unknown taylor_variant '{settings.taylor_variant}'",
                        f"use one of {', '.join(TAYLOR_VARIANTS)}")
    grads, grad_sq = accumulate_gradients(model, batches, settings.batch_size,
                                          settings.taylor_order == 2)
    return taylor_from_grads(model, grads, grad_sq, settings.taylor_variant, settings.taylor_order)


def unit_costs(shapes: list[LayerShape]) -> tuple[list[int], list[int]]:
    return [s.group_cost for s in shapes], [s.channel_cost for s in shapes]
