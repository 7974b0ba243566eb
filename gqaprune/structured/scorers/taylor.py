"""``taylor``: first- or second-order Taylor importance of each unit over calibration windows.

Element salience (estimated loss change when the weight is zeroed), g = dL/dw summed over
calibration mini-batches:
  order 1:  s = w * g
  order 2:  s = -w * g + 0.5 * w**2 * F,   F = sum_b g_b**2 (diagonal Fisher)
A unit's score: vector variant sum_t |sum_unit s| (per tensor t: sum, then abs); element variant
sum_t sum_unit |s|.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from gqaprune.arch import decoder_layers, layer_parameters, prunable_parameters
from gqaprune.config import Section, knob
from gqaprune.structured.scoring import SCORERS, GradStat, Scorer, UnitScores, reduce_units
from gqaprune.structured.units import model_shapes, unit_views

TAYLOR_VARIANTS = ("vector", "element")


@dataclass(frozen=True)
class TaylorConfig(Section):
    """Taylor importance (scorer taylor)"""
    taylor_variant: str = knob("vector", "vector: |sum(w*g)| per tensor; element: sum|w*g|",
                               choices=TAYLOR_VARIANTS)
    taylor_order: int = knob(1, "1: w*g; 2: adds the diagonal-Fisher term 0.5*w^2*sum(g_b^2)",
                             choices=(1, 2))


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


def gradient_stats(model, grads: dict) -> list[GradStat]:
    """Per-layer gradient norm and mean |g| over the layer's projection weights."""
    out = []
    for layer in decoder_layers(model):
        gs = [grads[p].float() for p in layer_parameters(layer)]
        n = sum(g.numel() for g in gs)
        out.append(GradStat(float(torch.sqrt(sum(g.pow(2).sum() for g in gs))),
                            float(sum(g.abs().sum() for g in gs) / n)))
    return out


def taylor_from_grads(model, grads: dict, grad_sq: dict, variant: str, order: int) -> UnitScores:
    """Aggregate element saliences per unit (module docstring)."""
    TaylorConfig(variant, order)   # validates both

    def salience(p):
        w, g = p.detach().float(), grads[p].float()
        if order == 1:
            return w * g
        return -w * g + 0.5 * w.pow(2) * grad_sq[p]

    attn, mlp = [], []
    for layer, shape in zip(decoder_layers(model), model_shapes(model)):
        a, m = unit_views(layer, shape, salience)
        attn.append(reduce_units(a, variant))
        mlp.append(reduce_units(m, variant))
    return UnitScores(attn, mlp, power=1.0, gradient_stats=gradient_stats(model, grads))


def taylor_scores(model, batches: torch.Tensor, section: TaylorConfig | None = None, *,
                  batch_size: int = 4, seed: int = 0) -> UnitScores:
    """First/second-order Taylor importance over calibration batches [N, T]."""
    section = section or TaylorConfig()
    grads, grad_sq = accumulate_gradients(model, batches, batch_size, section.taylor_order == 2)
    return taylor_from_grads(model, grads, grad_sq, section.taylor_variant, section.taylor_order)


SCORERS.register("taylor", Scorer(taylor_scores, needs_calibration=True, section="taylor",
                                  summary="first/second-order Taylor |w*dL/dw| over calibration windows"))
