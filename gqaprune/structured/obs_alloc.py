"""How many parameters each decoder layer gives up under ``obs`` (its budget), by rule.

Let P_l be layer l's prunable parameters, R = round(ratio * sum_l P_l) the parameters to remove
(``allocation.check_reachable``), and L the layers in the pruned range.

* ``uniform``: b_l = R * P_l / sum_{l in L} P_l (the same fraction in every pruned layer).
* ``depth``: a linearly increasing schedule (SlimGPT-style: later layers lose more),
  r_l = c * (1 + spread * (2 t_l - 1)), t_l = position of l in the range in [0, 1], clipped to
  [0, max_layer_rate] with c solved so that sum r_l P_l = R (``rates.allocate_rates``).
* ``global``: a global ranking of normalised OBS errors. A profile pass on the unpruned model
  (:func:`profile_curves`) runs the greedy removal of every layer on its own inputs up to
  ``max_layer_rate`` and records the cumulative error E_l(p) after p parameters are removed.
  With s_l the energy of the layer's output residual stream (``error_scale=stream``; 1 for
  ``none``), the budgets minimise sum_l E_l(b_l) / s_l subject to sum_l b_l = R: the lower convex
  hulls of the curves are merged by slope (normalised error per parameter, cheapest first), as a
  global ranking of removals would, and the last segment taken is cut to meet R exactly.

The sequential pass then removes units in each layer until its budget (plus the rounding carried
from earlier layers) is met, so the achieved total is within one unit of R.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gqaprune import arch
from gqaprune.calibrate import LayerWalker
from gqaprune.structured.obs_math import GramStats, ObsProjection, greedy_remove
from gqaprune.structured.rates import allocate_rates
from gqaprune.structured.reconstruct import trace_layer
from gqaprune.structured.units import LayerShape, layer_shape

ALLOCATIONS = ("uniform", "global", "depth")
ERROR_SCALES = ("stream", "none")


@dataclass
class LayerCurve:
    """Greedy removal profile of one layer: cumulative parameters and errors after each step."""
    layer: int
    params: list[float] = field(default_factory=lambda: [0.0])
    errors: list[float] = field(default_factory=lambda: [0.0])
    scale: float = 1.0           # s_l: energy of the layer's output residual stream

    def hull(self) -> list[tuple[float, float]]:
        """Lower convex hull of (params, error / scale) from the origin, as (dp, de) segments."""
        pts = [(p, e / self.scale) for p, e in zip(self.params, self.errors)]
        hull: list[tuple[float, float]] = []
        for pt in pts:
            while len(hull) >= 2 and _cross(hull[-2], hull[-1], pt) <= 0:
                hull.pop()
            hull.append(pt)
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(hull, hull[1:])]


def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def uniform_budgets(shapes: list[LayerShape], layers: range, target: int) -> list[float]:
    size = sum(shapes[i].params for i in layers)
    return [target * s.params / size if i in layers else 0.0 for i, s in enumerate(shapes)]


def depth_budgets(shapes: list[LayerShape], layers: range, target: int, spread: float,
                  max_rate: float) -> list[float]:
    n = len(layers)
    ts = [k / (n - 1) if n > 1 else 0.5 for k in range(n)]
    sizes = [shapes[i].params for i in layers]
    # allocate_rates("proportional", alpha 1) gives rates proportional to importance / size.
    values = [(1 + spread * (2 * t - 1)) * p for t, p in zip(ts, sizes)]
    rates = allocate_rates(values, sizes, target, "proportional", 1.0, 0.0, max_rate)
    out = [0.0] * len(shapes)
    for i, r, p in zip(layers, rates, sizes):
        out[i] = r * p
    return out


def global_budgets(shapes: list[LayerShape], curves: list[LayerCurve], target: int) -> list[float]:
    """Merge the curves' hull segments by slope until ``target`` parameters are removed."""
    segs = []
    for c in curves:
        segs += [(de / dp, c.layer, dp) for dp, de in c.hull() if dp > 0]
    segs.sort(key=lambda s: (s[0], s[1]))
    out, total = [0.0] * len(shapes), 0.0
    for _, layer, dp in segs:
        if total >= target:
            break
        take = min(dp, target - total)
        out[layer] += take
        total += take
    if total < target:     # the profiles stop near max_layer_rate: spread the rest by size
        live = [c.layer for c in curves]
        size = sum(shapes[i].params for i in live)
        for i in live:
            out[i] += (target - total) * shapes[i].params / size
    return out


@torch.no_grad()
def profile_curves(model, ids: torch.Tensor, layers: range, batch_size: int, damping: float,
                   dtype: torch.dtype, max_rate: float, scale: str, progress: bool) -> list[LayerCurve]:
    """One walk over the *unpruned* model: per layer, the statistics of o_proj / down_proj inputs
    and the greedy OBS removal (no refit: the targets are the layer's own outputs) up to
    ``max_rate`` of its parameters. Nothing is modified."""
    curves = []
    for step in LayerWalker(model, ids, batch_size, progress=progress, desc="obs profile"):
        if step.index not in layers:
            continue
        shape = layer_shape(step.layer)
        o = GramStats(shape.n_heads * shape.head_dim, None, dtype, arch.model_device(model))
        d = GramStats(shape.intermediate, None, dtype, arch.model_device(model))
        energy, outs = 0.0, []
        for h, kw in zip(step.inputs, step.kwargs):
            tr = trace_layer(step.layer, h, kw)
            o.add(tr.o_in)
            d.add(tr.down_in)
            energy += float(tr.out.double().square().sum())
            outs.append(tr.out)
        step.outputs = outs
        projs = {"attn": ObsProjection(o, step.layer.self_attn.o_proj.weight.detach(),
                                       shape.group_size * shape.head_dim, damping, dtype, refit=False),
                 "mlp": ObsProjection(d, step.layer.mlp.down_proj.weight.detach(), 1, damping, dtype,
                                      refit=False)}
        costs = {"attn": shape.group_cost, "mlp": shape.channel_cost}
        curve = LayerCurve(step.index, scale=energy if scale == "stream" else 1.0)
        for r in greedy_remove(projs, costs, max_rate * shape.params):
            curve.params.append(curve.params[-1] + r.cost)
            curve.errors.append(curve.errors[-1] + r.error)
        curves.append(curve)
    return curves
