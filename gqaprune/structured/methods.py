"""Registry of structured pruning methods: (model, calibration batches, settings) -> plan.

A method decides *which* units go; surgery is separate (see ``surgery.apply_plan``).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from gqaprune.errors import UserError
from gqaprune.structured.allocation import global_plan_layers, layer_range
from gqaprune.structured.importance import ScoreSettings, UnitScores, get_scorer
from gqaprune.structured.plan import PruningPlan
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
    model_name: str = ""
    provenance: dict = field(default_factory=dict)  # calibration data etc., copied into the plan

    def score_settings(self) -> ScoreSettings:
        return ScoreSettings(self.taylor_variant, self.taylor_order, self.batch_size, self.seed)


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
    prov = {"settings": {k: v for k, v in asdict(settings).items() if k != "provenance"},
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
        kept = global_plan_layers(shapes, scores, settings.pruning_ratio, layers)
        return MethodResult(make_plan(model, settings, kept), scores, elapsed)
    method.__doc__ = f"Global ranking of {scorer} scores (per-parameter) across the model."
    return method


register_method("taylor")(_global("taylor"))
register_method("magnitude", needs_calibration=False)(_global("magnitude"))
register_method("random", needs_calibration=False)(_global("random"))


def run_method(model, batches, settings: PruneSettings) -> MethodResult:
    return get_method(settings.method)(model, batches, settings)
