"""Per-layer (per-block) pruning rates from importance, and units chosen to meet them.

Allocation (``allocate_rates``). Items i (layers, or attention/MLP blocks) have importance I_i
(the cost of removing the whole item), prunable parameters P_i, and the overall target
R = ratio * P_total parameters to remove. Removing a fraction r_i of an item costs about r_i * I_i,
so items are compared by importance per parameter, d_i = I_i / P_i (for layerwise on a uniform
model all P_i are equal and d_i ~ I_i; for blockwise it keeps a 12k-parameter attention block from
looking less important than a 33k-parameter MLP block only because it is smaller):

    d_i  <- max(I_i / P_i, 1e-6 * max_j |I_j / P_j|)   (zero/negative importance: skipping the
                                                        item does not hurt, least important)
    s_i   = (d_i / g)^(-alpha)   inverse          (important items are pruned less)
          = (d_i / g)^(+alpha)   proportional     (important items are pruned more)
          = 1                    uniform
          (g = geometric mean of the d_i; it cancels in the rates, it only keeps s finite)
    r_i   = clip(c * s_i, min_pruning_rate, max_pruning_rate)

and the scalar c >= 0 is solved so that sum_i r_i * P_i = R exactly (the rates are re-balanced
after clamping). alpha = 0 gives uniform rates; a larger alpha spreads them more. The target is
reachable iff min_rate * P_items <= R <= max_rate * P_items (else a UserError names the bound).

Units (``units_from_rates``). Inside each item, units (KV groups, MLP channels) are ranked by
Taylor importance per parameter (``allocation.ranking_key``) and removed from the least
important while they fit the item's budget r_i * P_i (at most half a unit off per item). Then
single MLP channels are added/restored (globally least/most important first, preferring items
that stay within the clamps) until the total is within half an MLP channel of R. An item never
loses its last KV group or last channel. So: the rates r_i respect the clamps exactly; an item's
achieved rate can differ from r_i by its rounding (e.g. 4 KV groups allow 0/25/50/75%) and the
channels moved to meet the overall target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from gqaprune.config import Section, knob
from gqaprune.errors import UserError
from gqaprune.registry import Registry
from gqaprune.structured.allocation import (ALLOCATORS, Allocation, AllocationRequest, Allocator,
                                             check_reachable, kept_from_removed, ranking_key)
from gqaprune.structured.layer_importance import IMPORTANCE_METHODS, LayerImportance, compute_layer_importance
from gqaprune.structured.plan import LayerPlan
from gqaprune.structured.scoring import UnitScores
from gqaprune.structured.units import LayerShape

# strategy: (ln(d_i / g) [n] float64, alpha) -> unnormalised shares s_i (module docstring)
STRATEGIES: Registry = Registry("pruning_strategy")
STRATEGIES.register("inverse", lambda logs, alpha: torch.exp((-alpha * logs).clamp(-300, 300)))
STRATEGIES.register("proportional", lambda logs, alpha: torch.exp((alpha * logs).clamp(-300, 300)))
STRATEGIES.register("uniform", lambda logs, alpha: torch.ones_like(logs))
_FLOOR = 1e-6


def _is_uri(text: str) -> bool:
    return "://" in text or text.startswith(("runs:/", "models:/"))


@dataclass(frozen=True)
class RatesConfig(Section):
    """layerwise / blockwise: per-layer (per-block) rates from layer importance"""
    importance_method: str = knob("removal", "removal: loss increase when a layer is skipped; activation: "
                                  "1 - cos(input, output) of its activations",
                                  choices=lambda: IMPORTANCE_METHODS.names())
    importance_samples: int = knob(32, "calibration samples (of taylor_seq_len tokens) for the layer importance",
                                   low=1, example="32")
    importance_config: str | None = knob(None, "reuse a layer_importance_config.json (path or runs:/<run>/...) "
                                         "and skip the analysis")
    skip_importance_analysis: bool = knob(False, "true: reuse importance_config (required) instead of measuring")
    pruning_strategy: str = knob("inverse", "how importance maps to rates", choices=lambda: STRATEGIES.names())
    alpha: float = knob(1.0, "how strongly rates differ (0 = uniform)", low=0.0, fix="pass e.g. alpha=1 (0 = uniform)")
    min_pruning_rate: float = knob(0.15, "lowest rate of any layer (block)", low=0.0, high=1.0,
                                   fix="pass a fraction such as 0.15")
    max_pruning_rate: float = knob(0.5, "highest rate of any layer (block)", low=0.0, high=1.0,
                                   fix="pass a fraction such as 0.15")

    def check(self) -> None:
        if self.min_pruning_rate > self.max_pruning_rate:
            raise UserError(f"min_pruning_rate {self.min_pruning_rate} is greater than max_pruning_rate "
                            f"{self.max_pruning_rate}", "pass min_pruning_rate <= max_pruning_rate")
        if self.skip_importance_analysis and self.importance_config is None:
            raise UserError("skip_importance_analysis=true but no importance_config to reuse",
                            "pass importance_config=<layer_importance_config.json or "
                            "runs:/<run_id>/layer_importance_config.json>, or drop skip_importance_analysis")
        if self.importance_config is not None and not _is_uri(self.importance_config) \
                and not Path(self.importance_config).expanduser().is_file():
            raise UserError(f"importance_config '{self.importance_config}' not found",
                            "pass a layer_importance_config.json path or runs:/<run_id>/layer_importance_config.json")


@dataclass(frozen=True)
class RateRow:
    """One item (a layer, or its attention / MLP block): importance, target and achieved rate."""
    layer: int
    block: str            # layer | attn | mlp
    importance: float
    params: int
    target_rate: float
    achieved_rate: float


def check_reachable_rates(ratio_of_items: float, min_rate: float, max_rate: float,
                          what: str = "pruning_ratio", eps: float = 1e-12) -> None:
    """``ratio_of_items`` = R / P_items: the average rate the pruned items must reach
    (``eps``: tolerance, e.g. one parameter's share when R was rounded to whole parameters)."""
    if ratio_of_items < min_rate - eps:
        raise UserError(f"min_pruning_rate {min_rate} removes at least {min_rate:.1%} of every layer, "
                        f"more than the target ({what} asks for {ratio_of_items:.1%} of the pruned layers)",
                        f"lower min_pruning_rate to <= {ratio_of_items:.3f} or raise pruning_ratio")
    if ratio_of_items > max_rate + eps:
        raise UserError(f"max_pruning_rate {max_rate} removes at most {max_rate:.1%} of every layer, "
                        f"less than the target ({what} asks for {ratio_of_items:.1%} of the pruned layers)",
                        f"raise max_pruning_rate to >= {ratio_of_items:.3f} or lower pruning_ratio")


def strategy_shares(importance: list[float], strategy: str, alpha: float) -> torch.Tensor:
    """Unnormalised shares s_i (float64 [n]) of per-parameter importances d_i (module docstring)."""
    share = STRATEGIES.get(strategy)
    imp = torch.tensor(importance, dtype=torch.float64)
    if alpha == 0 or len(importance) == 0:
        return torch.ones_like(imp)
    top = float(imp.abs().max()) if imp.numel() else 0.0
    if top == 0 or not math.isfinite(top):
        return torch.ones_like(imp)
    imp = imp.clamp_min(_FLOOR * top)
    logs = imp.log() - imp.log().mean()            # ln(I_i / g)
    return share(logs, alpha)   # clamped exponents: beyond e^300 the rate clamps decide anyway


def allocate_rates(importance: list[float], sizes: list[int], target: float, strategy: str = "inverse",
                   alpha: float = 1.0, min_rate: float = 0.15, max_rate: float = 0.5) -> list[float]:
    """Rates r_i in [min_rate, max_rate] with sum r_i * sizes_i == target (parameters)."""
    RatesConfig(pruning_strategy=strategy, alpha=alpha, min_pruning_rate=min_rate, max_pruning_rate=max_rate)
    if len(importance) != len(sizes):
        raise ValueError("one importance per item")
    P = torch.tensor(sizes, dtype=torch.float64)
    check_reachable_rates(target / float(P.sum()), min_rate, max_rate, eps=1.0 / float(P.sum()))
    s = strategy_shares([i / size for i, size in zip(importance, sizes)], strategy, alpha)

    def removed(c: float) -> float:
        return float((torch.clamp(c * s, min_rate, max_rate) * P).sum())

    if max_rate == 0 or min_rate == max_rate:
        return [min_rate] * len(sizes)
    # Bisection on ln c (removed(c) is non-decreasing; shares may span many decades):
    # at c = min_rate / max(s) every item sits at min_rate, at c = max_rate / min(s) at max_rate.
    lo = math.log(max(min_rate, 1e-300) / float(s.max())) - 1.0
    hi = math.log(max_rate / float(s.min())) + 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if removed(math.exp(mid)) < target else (lo, mid)
    c = math.exp(0.5 * (lo + hi))
    rates = torch.clamp(c * s, min_rate, max_rate)
    # Exact re-balance: solve c for the unclamped items given the clamped ones.
    free = (c * s > min_rate) & (c * s < max_rate)
    if free.any():
        fixed = float((rates[~free] * P[~free]).sum())
        c_exact = (target - fixed) / float((s[free] * P[free]).sum())
        rates = torch.where(free, (c_exact * s).clamp(min_rate, max_rate), rates)
    return rates.tolist()


# ---- from rates to kept units -------------------------------------------------------------------

def item_units(shape: LayerShape, scores: UnitScores, layer: int, kind: str | None):
    """(key, kind, index, cost) of the units of a layer (kind None) or of one block, least important first."""
    units = []
    for k, sc, cost in (("attn", scores.attn[layer], shape.group_cost),
                        ("mlp", scores.mlp[layer], shape.channel_cost)):
        if kind in (None, k):
            keys = ranking_key(sc, scores.power, cost).tolist()
            units += [(key, k, j, cost) for j, key in enumerate(keys)]
    units.sort(key=lambda u: (u[0], u[1], u[2]))
    return units


def item_size(shape: LayerShape, kind: str | None) -> int:
    return {None: shape.params, "attn": shape.attn_params, "mlp": shape.mlp_params}[kind]


def units_from_rates(shapes: list[LayerShape], scores: UnitScores, items: list[tuple[int, str | None]],
                     rates: list[float], min_rate: float, max_rate: float) -> list[LayerPlan]:
    """Per item (layer, kind): remove the least important units up to rate * size, then re-balance.

    Pass 1, per item: walk its units from the least important and remove each one that still fits
    (removed + cost / 2 <= rate * size), never the block's last unit. The error is at most half a
    unit per item. Pass 2 (``_rebalance``) moves single MLP channels so that the total removed is
    within half a channel of sum_i rate_i * size_i (= the target).
    """
    removed = {i: {"attn": set(), "mlp": set()} for i in range(len(shapes))}
    gone = []
    for (layer, kind), rate in zip(items, rates):
        shape = shapes[layer]
        budget, done = rate * item_size(shape, kind), 0
        for _, k, j, cost in item_units(shape, scores, layer, kind):
            full = shape.n_kv if k == "attn" else shape.intermediate
            if done + cost / 2 > budget or len(removed[layer][k]) + 1 >= full:
                continue  # does not fit (a cheaper unit may), or would empty the block
            removed[layer][k].add(j)
            done += cost
        gone.append(done)
    target = sum(r * item_size(shapes[i], k) for (i, k), r in zip(items, rates))
    _rebalance(shapes, scores, items, removed, gone, target, min_rate, max_rate)
    return kept_from_removed(shapes, removed)


def _rebalance(shapes, scores, items, removed, gone, target, min_rate, max_rate) -> None:
    """Add (or restore) one MLP channel at a time until |target - removed| <= channel_cost / 2.

    Added: the globally least important channel not yet removed; restored: the most important
    removed one; first only in items that stay within [min_rate, max_rate], then (clamps and
    unit sizes in conflict, e.g. 4 KV groups cannot be cut by 15%) in any item. Channels of an
    item are removed in key order, so ``order[:count]`` is always its removed set.
    """
    order = {}
    for t, (layer, kind) in enumerate(items):
        if kind in (None, "mlp"):
            keys = ranking_key(scores.mlp[layer], scores.power, shapes[layer].channel_cost).tolist()
            order[t] = sorted(range(len(keys)), key=lambda j: (keys[j], j)), keys

    def candidate(add: bool, clamped: bool):
        best = None
        for t, (idx, keys) in order.items():
            layer, kind = items[t]
            s, n = shapes[layer], len(removed[layer]["mlp"])
            size, cost = item_size(s, kind), s.channel_cost
            if add and (n + 1 >= s.intermediate or (clamped and gone[t] + cost > max_rate * size + 1e-9)):
                continue
            if not add and (n == 0 or (clamped and gone[t] - cost < min_rate * size - 1e-9)):
                continue
            j = idx[n] if add else idx[n - 1]
            rank = keys[j] if add else -keys[j]
            if best is None or rank < best[0]:
                best = (rank, t, j)
        return best

    while True:
        deficit = target - sum(gone)
        add = deficit > 0
        half = min((shapes[items[t][0]].channel_cost for t in order), default=0) / 2
        if abs(deficit) <= half:
            return
        pick = candidate(add, clamped=True) or candidate(add, clamped=False)
        if pick is None:
            return
        _, t, j = pick
        layer = items[t][0]
        if add:
            removed[layer]["mlp"].add(j)
            gone[t] += shapes[layer].channel_cost
        else:
            removed[layer]["mlp"].discard(j)
            gone[t] -= shapes[layer].channel_cost


def rate_rows(items: list[tuple[int, str | None]], importance: list[float], sizes: list[int],
              rates: list[float], shapes: list[LayerShape], kept: list[LayerPlan]) -> list[RateRow]:
    """One row per item: importance, target rate, achieved rate (for tables / metrics)."""
    rows = []
    for (layer, kind), imp, size, rate in zip(items, importance, sizes, rates):
        s, lp = shapes[layer], kept[layer]
        gone = {"attn": (s.n_kv - len(lp.kept_kv_groups)) * s.group_cost,
                "mlp": (s.intermediate - len(lp.kept_channels)) * s.channel_cost}
        achieved = (gone["attn"] + gone["mlp"]) if kind is None else gone[kind]
        rows.append(RateRow(layer, kind or "layer", imp, size, rate, achieved / size))
    return rows


# ---- the layerwise / blockwise allocators -------------------------------------------------------

def nonuniform_plan(shapes, scores: UnitScores, imp: LayerImportance, granularity: str, layers: range,
                    target: int, section: RatesConfig) -> tuple[list[LayerPlan], list[RateRow]]:
    """Items (layer or attention/MLP block), their rates, and the units that meet them."""
    if granularity == "layer":
        items = [(i, None) for i in layers]
        values = [imp.layer[i] for i in layers]
    else:
        items = [(i, k) for i in layers for k in ("attn", "mlp")]
        values = [(imp.attn if k == "attn" else imp.mlp)[i] for i, k in items]
    sizes = [item_size(shapes[i], k) for i, k in items]
    rates = allocate_rates(values, sizes, target, section.pruning_strategy, section.alpha,
                           section.min_pruning_rate, section.max_pruning_rate)
    kept = units_from_rates(shapes, scores, items, rates, section.min_pruning_rate,
                            section.max_pruning_rate)
    return kept, rate_rows(items, values, sizes, rates, shapes, kept)


def _nonuniform(granularity: str):
    def allocate(req: AllocationRequest) -> Allocation:
        section = req.section or RatesConfig()
        target = check_reachable(req.shapes, req.layers, req.ratio)
        imp = req.layer_importance
        if imp is None:  # library use: measure on the first importance_samples calibration windows
            imp = compute_layer_importance(req.model, req.batches[: section.importance_samples],
                                           section.importance_method, granularity, req.batch_size,
                                           req.model_name)
        imp.check_compatible(req.model_name, req.shapes, granularity)
        kept, rows = nonuniform_plan(req.shapes, req.scores, imp, granularity, req.layers, target, section)
        return Allocation(kept, rates=rows, layer_importance=imp)
    allocate.__doc__ = f"Per-{granularity} rates from {granularity} importance, units ranked inside each {granularity}."
    return allocate


ALLOCATORS.register("layerwise", Allocator(_nonuniform("layer"), section="rates", importance="layer",
                                           summary="one rate per decoder layer from layer importance"))
ALLOCATORS.register("blockwise", Allocator(_nonuniform("block"), section="rates", importance="block",
                                           summary="one rate per attention / MLP block from block importance"))
