"""Turn unit scores into kept sets: global ranking across the model.

Units of different parameter cost (a KV group costs (2G+2)*hd*H parameters, an MLP channel 3*H)
are made comparable by ranking on importance *per parameter*:

    key(unit) = score ** power / cost

(``power`` = 1 for additive scores such as Taylor, 2 for an L2 norm, 0 for random scores,
which are ranked as they are). Units are removed from the lowest key upwards until the
removed parameter count is as close to ``ratio * prunable`` as one more unit can bring it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from gqaprune.errors import UserError
from gqaprune.registry import Registry
from gqaprune.structured.plan import LayerPlan
from gqaprune.structured.scoring import UnitScores
from gqaprune.structured.units import LayerShape


# ---- the allocator registry: scores -> kept units ----------------------------------------------

@dataclass
class AllocationRequest:
    """Everything an allocator may use. ``section`` is its own config section (or None)."""
    model: Any
    batches: torch.Tensor | None          # calibration windows [N, T] (None for data-free scorers)
    shapes: list[LayerShape]
    scores: UnitScores
    layers: range                         # prunable layers
    ratio: float                          # fraction of prunable parameters (of the whole model) to remove
    section: Any = None
    batch_size: int = 4
    model_name: str = ""
    layer_importance: Any = None          # a given LayerImportance (reused or measured by the pipeline)


@dataclass
class Allocation:
    """What an allocator decided: the kept units per layer, and how (for logs and provenance)."""
    kept: list[LayerPlan]
    # built by the allocator modules (no import back into them from here):
    conditioning: Any = None        # conditioning.ConditioningInfo (global)
    rates: Any = None               # list[rates.RateRow] (layerwise / blockwise)
    layer_importance: Any = None    # layer_importance.LayerImportance (layerwise / blockwise)


@dataclass(frozen=True)
class Allocator:
    fn: Callable[[AllocationRequest], Allocation]
    section: str | None = None            # the config section it reads
    importance: str | None = None         # granularity of layer importance it needs ("layer" | "block")
    summary: str = ""

    def __call__(self, req: AllocationRequest) -> Allocation:
        return self.fn(req)


ALLOCATORS: Registry[Allocator] = Registry("allocator")


@dataclass(frozen=True)
class Unit:
    key: float
    layer: int
    kind: str     # "attn" | "mlp"
    index: int
    cost: int


def ranking_key(score: torch.Tensor, power: float, cost: int) -> torch.Tensor:
    if power == 0:
        return score.double()
    return score.double().clamp_min(0) ** power / cost


def layer_range(n_layers: int, start: int | None, end: int | None) -> range:
    """Validated ``[start, end)`` range of prunable layers (defaults: all)."""
    lo = 0 if start is None else start
    hi = n_layers if end is None or end < 0 else end
    if not 0 <= lo < hi <= n_layers:
        raise UserError(f"layer range [{start}, {end}) is out of bounds for a model with {n_layers} "
                        "layers", f"use 0 <= layer_start < layer_end <= {n_layers}")
    return range(lo, hi)


def max_removable(shapes: list[LayerShape], layers: range) -> int:
    """Parameters removable while every layer keeps one KV group and one channel."""
    return sum((shapes[i].n_kv - 1) * shapes[i].group_cost +
               (shapes[i].intermediate - 1) * shapes[i].channel_cost for i in layers)


def check_reachable(shapes: list[LayerShape], layers: range, ratio: float) -> int:
    """Target number of parameters to remove; error when the ratio cannot be met."""
    if not 0.0 < ratio < 1.0:
        raise UserError(f"pruning_ratio must be in (0, 1), got {ratio}", "pass e.g. 0.2 for 20%")
    total = sum(s.params for s in shapes)
    target = ratio * total
    limit = max_removable(shapes, layers)
    if target > limit + max(s.group_cost for s in shapes) / 2:
        raise UserError(f"pruning_ratio {ratio} is too high: keeping one KV group and one channel "
                        f"per pruned layer allows at most {limit / total:.3f}",
                        "lower pruning_ratio or widen layer_start/layer_end")
    return int(round(target))


def global_plan_layers(shapes: list[LayerShape], scores: UnitScores, ratio: float,
                       layers: range) -> list[LayerPlan]:
    """Remove the globally least important units (per parameter) until the ratio is met."""
    target = check_reachable(shapes, layers, ratio)
    units: list[Unit] = []
    for i in layers:
        s = shapes[i]
        for kind, sc, cost in (("attn", scores.attn[i], s.group_cost),
                               ("mlp", scores.mlp[i], s.channel_cost)):
            keys = ranking_key(sc, scores.power, cost)
            units += [Unit(float(k), i, kind, j, cost) for j, k in enumerate(keys.tolist())]
    # Stable order: key, then layer/kind/index, so ties are deterministic.
    units.sort(key=lambda u: (u.key, u.layer, u.kind, u.index))
    removed = {i: {"attn": set(), "mlp": set()} for i in range(len(shapes))}
    total = 0
    for u in units:
        if total + u.cost / 2 > target:
            break
        size = shapes[u.layer].n_kv if u.kind == "attn" else shapes[u.layer].intermediate
        if len(removed[u.layer][u.kind]) + 1 >= size:
            continue  # the layer must keep one unit of this kind
        removed[u.layer][u.kind].add(u.index)
        total += u.cost
    return kept_from_removed(shapes, removed)


def kept_from_removed(shapes: list[LayerShape], removed: dict) -> list[LayerPlan]:
    return [LayerPlan([g for g in range(s.n_kv) if g not in removed[i]["attn"]],
                      [c for c in range(s.intermediate) if c not in removed[i]["mlp"]])
            for i, s in enumerate(shapes)]
