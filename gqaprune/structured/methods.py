"""Registry of structured pruning methods: (model, calibration batches, settings) -> plan.

A method decides *which* units go; surgery is separate (see ``surgery.apply_plan``).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from gqaprune.errors import UserError
from gqaprune.structured.allocation import check_reachable, global_plan_layers, layer_range
from gqaprune.structured.conditioning import Conditioning, conditioned_plan
from gqaprune.structured.importance import ScoreSettings, UnitScores, get_scorer
from gqaprune.structured.layer_importance import compute_layer_importance
from gqaprune.structured.plan import PruningPlan
from gqaprune.structured.rates import (allocate_rates, check_rate_settings, item_size, rate_rows,
                                       units_from_rates)
from gqaprune.structured.units import model_shapes


@dataclass(frozen=True)
class PruneSettings:
    method: str = "taylor"
    pruning_ratio: float = 0.2
    layer_start: int | None = None
    layer_end: int | None = None
    taylor_variant: str = "vector"
    taylor_order: int = 1
    batch_size: int = 4
    seed: int = 0
    # layerwise / blockwise (see rates.py, layer_importance.py)
    importance_method: str = "removal"
    importance_samples: int = 32
    pruning_strategy: str = "inverse"
    alpha: float = 1.0
    min_pruning_rate: float = 0.15
    max_pruning_rate: float = 0.5
    layer_importance: object = None     # a LayerImportance to reuse; None: measure it
    # score conditioning of the global taylor ranking (see conditioning.py)
    normalization: str = "none"
    clip_low: float = 0.0
    clip_high: float = 100.0
    temperature: float = 0.0
    tau: float = 0.0
    model_name: str = ""
    provenance: dict = field(default_factory=dict)  # calibration data etc., copied into the plan

    def score_settings(self) -> ScoreSettings:
        return ScoreSettings(self.taylor_variant, self.taylor_order, self.batch_size, self.seed)

    def conditioning(self) -> Conditioning:
        return Conditioning(self.normalization, self.clip_low, self.clip_high, self.temperature, self.tau)


@dataclass
class MethodResult:
    plan: PruningPlan
    scores: UnitScores | None
    scoring_time_s: float
    diagnostics: dict = field(default_factory=dict)


MethodFn = Callable[[object, torch.Tensor | None, PruneSettings], MethodResult]
METHODS: dict[str, MethodFn] = {}
NEEDS_CALIBRATION: set[str] = set()


def register_method(name: str, needs_calibration: bool = True):
    def deco(fn: MethodFn) -> MethodFn:
        METHODS[name] = fn
        if needs_calibration:
            NEEDS_CALIBRATION.add(name)
        return fn
    return deco


def get_method(name: str) -> MethodFn:
    if name not in METHODS:
        raise UserError(f"unknown method '{name}'", f"use one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def make_plan(model, settings: PruneSettings, layers_kept, extra_provenance: dict | None = None) -> PruningPlan:
    prov = {"settings": {k: v for k, v in asdict(settings).items()
                         if k not in ("provenance", "layer_importance")},
            **settings.provenance, **(extra_provenance or {})}
    return PruningPlan(settings.model_name, settings.method, settings.pruning_ratio,
                       model_shapes(model), layers_kept, prov)


def _global(scorer: str):
    def method(model, batches, settings: PruneSettings) -> MethodResult:
        shapes = model_shapes(model)
        layers = layer_range(len(shapes), settings.layer_start, settings.layer_end)
        t0 = time.perf_counter()
        scores = get_scorer(scorer)(model, batches, settings.score_settings())
        elapsed = time.perf_counter() - t0
        if scorer == "taylor":  # conditioning; the defaults give the plain global ranking
            kept, info = conditioned_plan(shapes, scores, settings.pruning_ratio, layers,
                                          settings.conditioning())
            return MethodResult(make_plan(model, settings, kept, {"conditioning": info["conditioning"]}),
                                scores, elapsed, info)
        kept = global_plan_layers(shapes, scores, settings.pruning_ratio, layers)
        return MethodResult(make_plan(model, settings, kept), scores, elapsed)
    method.__doc__ = f"Global ranking of {scorer} scores (per-parameter) across the model."
    return method


register_method("taylor")(_global("taylor"))
register_method("magnitude", needs_calibration=False)(_global("magnitude"))
register_method("random", needs_calibration=False)(_global("random"))


def _nonuniform(granularity: str):
    def method(model, batches, settings: PruneSettings) -> MethodResult:
        shapes = model_shapes(model)
        layers = layer_range(len(shapes), settings.layer_start, settings.layer_end)
        target = check_reachable(shapes, layers, settings.pruning_ratio)
        check_rate_settings(settings.pruning_strategy, settings.alpha, settings.min_pruning_rate,
                            settings.max_pruning_rate)
        t0 = time.perf_counter()
        imp = settings.layer_importance
        if imp is None:
            imp = compute_layer_importance(model, batches[: settings.importance_samples],
                                           settings.importance_method, granularity,
                                           settings.batch_size, settings.model_name)
        imp.check_compatible(settings.model_name, shapes, granularity)
        scores = get_scorer("taylor")(model, batches, settings.score_settings())
        elapsed = time.perf_counter() - t0
        kept, rows = nonuniform_plan(shapes, scores, imp, granularity, layers, target, settings)
        prov = {"layer_importance": {"method": imp.method, "granularity": imp.granularity,
                                     "layer": imp.layer, "attn": imp.attn, "mlp": imp.mlp},
                "rates": rows}
        return MethodResult(make_plan(model, settings, kept, prov), scores, elapsed,
                            {"layer_rates": rows, "layer_importance": imp})
    method.__doc__ = (f"Per-{granularity} pruning rates from {granularity} importance (rates.py); "
                      "Taylor ranks the units inside each " + granularity + ".")
    return method


def nonuniform_plan(shapes, scores: UnitScores, imp, granularity: str, layers: range, target: int,
                    settings: PruneSettings):
    """Items (layer or attention/MLP block), their rates, and the units that meet them."""
    if granularity == "layer":
        items = [(i, None) for i in layers]
        values = [imp.layer[i] for i in layers]
    else:
        items = [(i, k) for i in layers for k in ("attn", "mlp")]
        values = [(imp.attn if k == "attn" else imp.mlp)[i] for i, k in items]
    sizes = [item_size(shapes[i], k) for i, k in items]
    rates = allocate_rates(values, sizes, target, settings.pruning_strategy, settings.alpha,
                           settings.min_pruning_rate, settings.max_pruning_rate)
    kept = units_from_rates(shapes, scores, items, rates, settings.min_pruning_rate,
                            settings.max_pruning_rate)
    return kept, rate_rows(items, values, sizes, rates, shapes, kept)


register_method("layerwise")(_nonuniform("layer"))
register_method("blockwise")(_nonuniform("block"))


def run_method(model, batches, settings: PruneSettings) -> MethodResult:
    return get_method(settings.method)(model, batches, settings)
