"""Score conditioning for the global ``taylor`` ranking: per-layer normalisation, clipping, and a
block-level (attention vs MLP) correction.

Why: a global ranking compares raw Taylor scores across layers. When gradient scales differ by
orders of magnitude between layers, the low-gradient layers lose nearly all their units. Each
step below is a parameter; with the defaults (none, 0, 100, T = 0) the plan is exactly the plain
global ranking.

Let k_u = score_u ** power / cost_u be the per-parameter key of unit u (``allocation.ranking_key``)
and K_l the keys of all units (KV groups and MLP channels) of layer l.

1. Clipping (``clip_low``, ``clip_high`` percentiles, 0 <= low < high <= 100), per layer:
       k_u <- min(max(k_u, Q_l(low)), Q_l(high)),   Q_l = percentile of K_l (linear interpolation)
   It tames outlier units before the layer statistics below are taken (ties keep index order).

2. Normalisation (``normalization``), per layer, a non-decreasing map, so the order of the units
   inside a layer never changes; only how layers compare with each other does. (A monotone map
   applied to all keys alike, e.g. log k, would not change a global ranking at all; every option
   therefore removes a per-layer scale.)
       none:   k
       log:    ln(k + e_l) - mean_{K_l} ln(k + e_l)     (divide by the layer's geometric mean),
               e_l = 1e-8 * mean(K_l) (+1e-30) keeps zero scores finite
       minmax: (k - min K_l) / (max K_l - min K_l)      (0 if the layer is constant)
       zscore: (k - mean K_l) / std K_l                 (0 if the layer is constant)
       sqrt:   sqrt(k) / mean_{K_l} sqrt(k)
   Units are then removed globally, lowest normalised key first, as in ``allocation``.

3. Block correction (temperature ``T`` >= 0, gate ``tau`` >= 0), per pruned layer l, after step 2.
   Let A_l, M_l be the parameters the global ranking removed from the attention and the MLP
   block (sizes P^a_l, P^m_l), a = A_l / P^a_l, m = M_l / P^m_l, b = (A_l + M_l) / P_l. With
       lambda = T / (1 + T)                                     (T = 0 -> 0, T -> inf -> 1)
       a'     = (1 - lambda) * a + lambda * b
   the layer removes round(a' * P^a_l / group_cost) KV groups and spends the rest of its budget
   A_l + M_l (plus the rounding error carried from earlier layers) on MLP channels, each block
   losing its least important units (by normalised key). The layer's total is unchanged, only its
   attention/MLP split moves toward balance (a = m = b).
   Gate: the correction applies only when the block the ranking pruned harder is not
   unimportant: its relative per-parameter importance
       rho = (sum_{u in block} s_u^power / P_block) / (sum_{u in layer} s_u^power / P_l)
   (on raw scores s) must be >= tau. tau = 0 corrects every layer; tau = 1 only layers whose
   harder-pruned block is at least as important per parameter as the layer average.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from gqaprune.config import Section, knob
from gqaprune.errors import UserError
from gqaprune.registry import Registry
from gqaprune.structured.allocation import (ALLOCATORS, Allocation, AllocationRequest, Allocator,
                                             check_reachable, global_plan_layers, kept_from_removed,
                                             ranking_key)
from gqaprune.structured.plan import LayerPlan
from gqaprune.structured.scoring import UnitScores
from gqaprune.structured.units import LayerShape

# keys [n] float64 of one layer -> normalised keys, order inside the layer preserved (step 2)
NORMALIZATIONS: Registry = Registry("normalization")


@dataclass(frozen=True)
class Conditioning(Section):
    """score conditioning of the global ranking (allocator global)"""
    normalization: str = knob("none", "per-layer normalisation of the ranking keys",
                              choices=lambda: NORMALIZATIONS.names())
    clip_low: float = knob(0.0, "lower percentile clip per layer (0 <= clip_low < clip_high)")
    clip_high: float = knob(100.0, "upper percentile clip per layer (<= 100)")
    temperature: float = knob(0.0, "T >= 0: 0 = pure global ranking, larger moves attention/MLP toward balance",
                              low=0.0, fix="pass 0 for pure global ranking or e.g. 1 to balance attention/MLP")
    tau: float = knob(0.0, "gate: correct a layer only if rho >= tau", low=0.0,
                      fix="pass 0 to correct every layer or e.g. 1")

    def check(self) -> None:
        if not 0.0 <= self.clip_low < self.clip_high <= 100.0:
            raise UserError(f"clip percentiles must satisfy 0 <= clip_low < clip_high <= 100 "
                            f"(got {self.clip_low}, {self.clip_high})", "pass e.g. clip_low=5 clip_high=95")

    def is_identity(self) -> bool:
        return self == Conditioning()

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BlockCorrectionRow:
    """Step 3 for one layer: relative block importances, the gate, rates before and after."""
    layer: int
    rho_attn: float
    rho_mlp: float
    gated: bool
    attn_rate_global: float
    mlp_rate_global: float
    attn_rate: float
    mlp_rate: float


@dataclass(frozen=True)
class ConditioningInfo:
    conditioning: Conditioning
    block_correction: list[BlockCorrectionRow]

    def to_dict(self) -> dict:
        return {"conditioning": self.conditioning.to_dict(),
                "block_correction": [asdict(r) for r in self.block_correction]}


# ---- steps 1 and 2 -----------------------------------------------------------------------------

def clip_keys(keys: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """keys [n] float64 -> keys clamped to their [low, high] percentiles."""
    if low <= 0.0 and high >= 100.0:
        return keys
    q = torch.quantile(keys, torch.tensor([low / 100, high / 100], dtype=keys.dtype))
    return keys.clamp(float(q[0]), float(q[1]))


@NORMALIZATIONS.register("none")
def _none(keys: torch.Tensor) -> torch.Tensor:
    return keys


@NORMALIZATIONS.register("log")
def _log(keys: torch.Tensor) -> torch.Tensor:
    logk = torch.log(keys.clamp_min(0) + 1e-8 * float(keys.clamp_min(0).mean()) + 1e-30)
    return logk - logk.mean()


@NORMALIZATIONS.register("minmax")
def _minmax(keys: torch.Tensor) -> torch.Tensor:
    span = float(keys.max() - keys.min())
    return (keys - keys.min()) / span if span > 0 else torch.zeros_like(keys)


@NORMALIZATIONS.register("zscore")
def _zscore(keys: torch.Tensor) -> torch.Tensor:
    std = float(keys.std(unbiased=False)) if keys.numel() > 1 else 0.0
    return (keys - keys.mean()) / std if std > 0 else torch.zeros_like(keys)


@NORMALIZATIONS.register("sqrt")
def _sqrt(keys: torch.Tensor) -> torch.Tensor:
    root = keys.clamp_min(0).sqrt()
    mean = float(root.mean())
    return root / mean if mean > 0 else root


def normalize_keys(keys: torch.Tensor, how: str) -> torch.Tensor:
    """keys [n] float64 (>= 0 for taylor) -> per-layer normalised keys, order preserved."""
    return NORMALIZATIONS.get(how)(keys)


def conditioned_keys(shapes: list[LayerShape], scores: UnitScores, cond: Conditioning) -> UnitScores:
    """Per-parameter keys after clipping and normalisation, as UnitScores with power 0 (rank as is)."""
    attn, mlp = [], []
    for i, s in enumerate(shapes):
        ka = ranking_key(scores.attn[i], scores.power, s.group_cost)   # [n_kv]
        km = ranking_key(scores.mlp[i], scores.power, s.channel_cost)  # [I]
        both = normalize_keys(clip_keys(torch.cat([ka, km]), cond.clip_low, cond.clip_high),
                              cond.normalization)
        attn.append(both[: s.n_kv])
        mlp.append(both[s.n_kv:])
    return UnitScores(attn, mlp, power=0.0, gradient_stats=scores.gradient_stats)


# ---- step 3 ------------------------------------------------------------------------------------

def block_rho(shape: LayerShape, scores: UnitScores, layer: int) -> tuple[float, float]:
    """(rho_attn, rho_mlp): per-parameter raw importance of each block relative to its layer."""
    p = scores.power if scores.power > 0 else 1.0
    ia = float(scores.attn[layer].double().clamp_min(0).pow(p).sum())
    im = float(scores.mlp[layer].double().clamp_min(0).pow(p).sum())
    whole = (ia + im) / shape.params
    if whole <= 0:
        return 1.0, 1.0
    return (ia / shape.attn_params) / whole, (im / shape.mlp_params) / whole


def _lowest(keys: torch.Tensor, count: int) -> set[int]:
    """Indices of the ``count`` smallest keys, ties by index (the order a global ranking uses)."""
    order = sorted(range(keys.numel()), key=lambda j: (float(keys[j]), j))
    return set(order[:count])


def block_correction(shapes: list[LayerShape], kept: list[LayerPlan], keys: UnitScores,
                     scores: UnitScores, layers: range, temperature: float,
                     tau: float) -> tuple[list[LayerPlan], list[BlockCorrectionRow]]:
    """Move each layer's attention/MLP split toward balance (see step 3); returns (kept, rows)."""
    lam = temperature / (1.0 + temperature)
    removed = {i: {"attn": set(), "mlp": set()} for i in range(len(shapes))}
    rows, carry = [], 0.0
    for i in layers:
        s, lp = shapes[i], kept[i]
        n_attn = s.n_kv - len(lp.kept_kv_groups)
        n_mlp = s.intermediate - len(lp.kept_channels)
        A, M = n_attn * s.group_cost, n_mlp * s.channel_cost
        a, m, b = A / s.attn_params, M / s.mlp_params, (A + M) / s.params
        rho_a, rho_m = block_rho(s, scores, i)
        harder = rho_a if a > m else rho_m
        gated = a != m and harder >= tau and lam > 0
        a_new = (1 - lam) * a + lam * b if gated else a
        groups = min(max(round(a_new * s.attn_params / s.group_cost), 0), s.n_kv - 1)
        mlp_budget = A + M - groups * s.group_cost + carry
        channels = min(max(round(mlp_budget / s.channel_cost), 0), s.intermediate - 1)
        carry = mlp_budget - channels * s.channel_cost
        removed[i]["attn"] = _lowest(keys.attn[i], groups)
        removed[i]["mlp"] = _lowest(keys.mlp[i], channels)
        rows.append(BlockCorrectionRow(i, rho_a, rho_m, bool(gated), a, m,
                                       groups * s.group_cost / s.attn_params,
                                       channels * s.channel_cost / s.mlp_params))
    return kept_from_removed(shapes, removed), rows


def conditioned_plan(shapes: list[LayerShape], scores: UnitScores, ratio: float, layers: range,
                     cond: Conditioning) -> tuple[list[LayerPlan], ConditioningInfo]:
    """Global ranking on conditioned keys, then the block correction. Returns (kept, info)."""
    check_reachable(shapes, layers, ratio)
    keys = conditioned_keys(shapes, scores, cond)
    kept = global_plan_layers(shapes, keys, ratio, layers)
    kept, rows = block_correction(shapes, kept, keys, scores, layers, cond.temperature, cond.tau)
    return kept, ConditioningInfo(cond, rows)


def _global(req: AllocationRequest) -> Allocation:
    """The units with the lowest (conditioned) per-parameter keys go first, across all layers."""
    kept, info = conditioned_plan(req.shapes, req.scores, req.ratio, req.layers, req.section or Conditioning())
    return Allocation(kept, conditioning=info)


ALLOCATORS.register("global", Allocator(_global, section="conditioning",
                                        summary="one ranking of units per parameter across the model"))
