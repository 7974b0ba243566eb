"""Unit scores and the scorer registry.

Every scorer returns :class:`UnitScores`: one score per KV group and per MLP channel of every
layer, plus ``power`` telling how the score grows with unit size (used to make units of
different parameter cost comparable in a global ranking, see ``allocation.ranking_key``).

A scorer is registered with its needs (calibration data, the config section it reads):

    @SCORERS.register("magnitude")
    def ...                       # no: register a Scorer spec, see scorers/magnitude.py

The scorers live one per module in ``gqaprune/structured/scorers/``; importing that package
registers them all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from gqaprune.registry import Registry


@dataclass(frozen=True)
class GradStat:
    """Gradient scale of one decoder layer's projection weights (summed calibration gradients)."""
    grad_norm: float     # ||g||_2
    grad_mean: float     # mean |g|


@dataclass
class UnitScores:
    attn: list[torch.Tensor]    # per layer, [n_kv]
    mlp: list[torch.Tensor]     # per layer, [intermediate]
    power: float = 1.0          # score ~ cost**(1/power): taylor 1 (additive), L2 norm 2
    gradient_stats: list[GradStat] | None = None   # per layer (gradient-based scorers), for diagnosis


ScoreFn = Callable[..., UnitScores]   # (model, batches [N, T] | None, section | None, *, batch_size, seed)


@dataclass(frozen=True)
class Scorer:
    """A registered scorer: its function, whether it needs calibration windows, and the name of
    the config section it reads (an attribute of the prune config tree, or None)."""
    fn: ScoreFn
    needs_calibration: bool
    section: str | None = None
    summary: str = ""

    def __call__(self, model, batches, section=None, *, batch_size: int = 4, seed: int = 0) -> UnitScores:
        return self.fn(model, batches, section, batch_size=batch_size, seed=seed)


SCORERS: Registry[Scorer] = Registry("scorer")


def reduce_units(parts: list[torch.Tensor], how: str) -> torch.Tensor:
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
