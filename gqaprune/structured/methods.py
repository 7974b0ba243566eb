"""Structured methods: a named combination of a scorer and an allocator, and ``select``.

A method decides *which* units go (a :class:`PruningPlan`); committing the plan (surgery,
optionally with a refit) is the pipeline's single commit path. Because a method is only a pair
of registry names, ``layerwise`` with magnitude scores is a configuration (``scorer=magnitude``),
not new code.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from gqaprune.errors import UserError
from gqaprune.registry import Registry
from gqaprune.structured import conditioning, obs, rates, scorers  # noqa: F401  (register allocators, scorers, obs)
from gqaprune.structured.allocation import ALLOCATORS, Allocation, AllocationRequest, Allocator, layer_range
from gqaprune.structured.joint import JOINT_METHODS, JointMethod
from gqaprune.structured.plan import PruningPlan, Provenance
from gqaprune.structured.scoring import SCORERS, Scorer, UnitScores
from gqaprune.structured.units import model_shapes

AUTO = "auto"


@dataclass(frozen=True)
class Method:
    scorer: str
    allocator: str
    summary: str = ""


METHODS: Registry[Method] = Registry("method")
METHODS.register("taylor", Method("taylor", "global", "global ranking of Taylor scores per parameter"))
METHODS.register("magnitude", Method("magnitude", "global", "global ranking of L2 norms per parameter"))
METHODS.register("random", Method("random", "global", "random units (the baseline)"))
METHODS.register("layerwise", Method("taylor", "layerwise", "per-layer rates from layer importance, "
                                     "Taylor inside each layer"))
METHODS.register("blockwise", Method("taylor", "blockwise", "per-block rates from block importance, "
                                     "Taylor inside each block"))


@dataclass(frozen=True)
class Resolved:
    method: str
    scorer_name: str
    scorer: Scorer | None
    allocator_name: str
    allocator: Allocator | None
    joint: JointMethod | None = None     # a method that selects and commits in one walk (obs)

    @property
    def importance(self) -> str | None:
        """Granularity of the layer importance the allocator needs (None: none)."""
        return None if self.allocator is None else self.allocator.importance

    @property
    def needs_calibration(self) -> bool:
        if self.joint is not None:
            return True
        return self.scorer.needs_calibration or self.allocator.importance is not None

    @property
    def sections(self) -> set[str]:
        """Config sections this combination reads (the refit section only outside joint methods)."""
        if self.joint is not None:
            return {self.joint.section}
        return {s for s in (self.scorer.section, self.allocator.section) if s} | {"reconstruction"}


def method_names() -> tuple[str, ...]:
    """The registered methods, then every scorer that is not one: a scorer's name as a method
    means that scorer with the global allocator (so a new scorer is a method at once)."""
    return (*METHODS.names(), *JOINT_METHODS.names(), *(s for s in SCORERS.names() if s not in METHODS))


def method_spec(method: str) -> Method:
    if method not in METHODS and method in SCORERS:
        return Method(method, "global", SCORERS.get(method).summary)
    if method not in METHODS:
        raise UserError(f"unknown method '{method}'", f"use one of {', '.join(method_names())}")
    return METHODS.get(method)


def resolve(method: str, scorer: str = AUTO) -> Resolved:
    if method in JOINT_METHODS:
        return Resolved(method, method, None, method, None, JOINT_METHODS.get(method))
    spec = method_spec(method)
    name = spec.scorer if scorer == AUTO else scorer
    return Resolved(method, name, SCORERS.get(name), spec.allocator, ALLOCATORS.get(spec.allocator))


@dataclass
class Selection:
    """What a method decided, and how."""
    plan: PruningPlan
    scores: UnitScores | None
    allocation: Allocation
    scoring_time_s: float


def select(model, batches, method: str, cfg, *, batch_size: int = 4, seed: int = 0, model_name: str = "",
           layer_importance=None, provenance: Provenance | None = None) -> Selection:
    """Score the units and allocate: ``cfg`` is the structured config section
    (``gqaprune.structured.config.StructuredConfig``), batches LongTensor [N, T] or None."""
    r = resolve(method, cfg.scorer)
    shapes = model_shapes(model)
    layers = layer_range(len(shapes), cfg.layer_start, cfg.layer_end)
    t0 = time.perf_counter()
    scores = r.scorer(model, batches, getattr(cfg, r.scorer.section) if r.scorer.section else None,
                      batch_size=batch_size, seed=seed)
    elapsed = time.perf_counter() - t0
    alloc = r.allocator(AllocationRequest(
        model, batches, shapes, scores, layers, cfg.pruning_ratio,
        getattr(cfg, r.allocator.section) if r.allocator.section else None, batch_size, model_name,
        layer_importance))
    prov = (provenance or Provenance()).with_selection(cfg, r, seed, batch_size, alloc)
    plan = PruningPlan(model_name, method, cfg.pruning_ratio, shapes, alloc.kept, prov)
    return Selection(plan, scores, alloc, elapsed)
