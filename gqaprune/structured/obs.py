"""Reconstruction-aware structured selection (``obs``): remove the KV groups and MLP channels that
the least-squares refit of o_proj / down_proj cannot make up for (structured OBS, ZipLM-style).

Layer by layer, on the *already pruned* model's inputs (``calibrate.LayerWalker``, dense stream
kept for the targets), with h the pruned and h* the dense hidden state entering layer l:

1. Pass A (one forward of the unmodified layer l on h, and of its dense copy on h*): statistics
   of o_proj, X = attention values [n, n_heads*hd], Y = (h* + attn*(h*)) - h (the dense residual
   stream after attention minus the pruned one: the refit also absorbs earlier layers' drift),
   and of down_proj, X = SwiGLU activations [n, I], Y = out*(h*) - mid (mid = h + attn(h)).
2. Refit both projections to their targets (ridge towards the current weights, see ``obs_math``)
   and remove greedily, one unit at a time, whichever KV group (S = its G*hd o_proj columns) or
   MLP channel (one down_proj column) has the smallest exact OBS error per parameter removed,
   updating W and H^-1 after each removal, until the layer's budget is met (``obs_alloc``).
3. Cut the removed KV groups (q/k/v rows incl. Qwen2 biases, o_proj columns) and write o_proj's
   ridge refit on the kept columns. Pass B: with the new attention, the down_proj statistics are
   taken again (they changed), the channels are re-selected for the rest of the layer's budget,
   cut, and down_proj's refit is written. The layer output then feeds layer l+1.

The weights written are always the direct refit on the kept columns (``obs_math.refit_kept``),
which is where the greedy OBS updates end; so the result depends only on the kept sets and the
calibration data, and :func:`obs_commit` replays a plan bit-exact.

Memory beyond the model: the walker's two hidden-state buffers (pruned and dense stream, overwritten
in place; one with ``target=local``), one dense layer copy, and one layer's statistics:
X^T X + X^T Y of o_proj and down_proj ((k^2 + kH) each, ``stats_dtype``) plus the greedy state
(W and H^-1 of both, same size again) and a transient float64 factorisation of one k x k matrix.
Never activations of more than one layer, never a second model.
"""
from __future__ import annotations

import hashlib
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields

import torch

from gqaprune import arch
from gqaprune.calibrate import LayerWalker
from gqaprune.errors import UserError
from gqaprune.structured.allocation import check_reachable, layer_range
from gqaprune.structured.joint import JOINT_METHODS, JointMethod
from gqaprune.structured.obs_alloc import (ALLOCATIONS, ERROR_SCALES, LayerCurve, depth_budgets,
                                           global_budgets, profile_curves, uniform_budgets)
from gqaprune.structured.obs_math import DTYPES, GramStats, ObsProjection, greedy_remove, refit_kept
from gqaprune.config import Section, knob
from gqaprune.structured.plan import DataInfo, LayerPlan, Provenance, PruningPlan
from gqaprune.structured.reconstruct import trace_layer
from gqaprune.structured.surgery import prune_layer, record_layer_sizes
from gqaprune.structured.units import LayerShape, group_rows, layer_shape, model_shapes

METHOD = "obs"
PROJECTIONS = ("o_proj", "down_proj")
TARGETS = ("residual", "local")


@dataclass(frozen=True)
class ObsSettings:
    pruning_ratio: float = field(default=0.2, metadata={
        "help": "fraction of the prunable (decoder projection) parameters to remove"})
    allocation: str = field(default="global", metadata={
        "help": "how the removal is spread over layers: uniform (same fraction per layer), global "
                "(ranking of normalised OBS errors from a profile pass), depth (increasing with depth)",
        "choices": ALLOCATIONS})
    damping: float = field(default=0.05, metadata={
        "help": "ridge strength relative to mean(diag(X^T X)) of each projection's inputs (>= 0)"})
    stats_dtype: str = field(default="float32", metadata={
        "help": "dtype of the accumulated X^T X / X^T Y and of the greedy state",
        "choices": tuple(DTYPES)})
    batch_size: int = field(default=8, metadata={"help": "calibration sequences per forward chunk"})
    max_layer_rate: float = field(default=0.8, metadata={
        "help": "global / depth: the largest fraction of one layer's parameters that may be removed"})
    depth_spread: float = field(default=0.5, metadata={
        "help": "depth: rates grow linearly from (1 - spread) to (1 + spread) times the mean, in [0, 1)"})
    error_scale: str = field(default="stream", metadata={
        "help": "global: divide each layer's OBS errors by the energy of its output residual stream "
                "(stream) or compare them raw (none)", "choices": ERROR_SCALES})
    target: str = field(default="residual", metadata={
        "help": "what the refit output must match: residual (the dense residual stream, absorbing "
                "earlier layers' drift) or local (the unpruned layer applied to the pruned model's "
                "inputs)", "choices": TARGETS})
    mlp_reselect: bool = field(default=True, metadata={
        "help": "re-select the MLP channels on statistics taken after the layer's attention is cut "
                "(false: keep the channels of the joint choice, only refit)"})
    layer_start: int | None = field(default=None, metadata={"help": "first pruned layer (default 0)"})
    layer_end: int | None = field(default=None, metadata={
        "help": "end (exclusive) of the pruned layers (default: all); other layers are left untouched"})

    def validate(self) -> "ObsSettings":
        if not 0.0 < self.pruning_ratio < 1.0:
            raise UserError(f"pruning_ratio must be in (0, 1), got {self.pruning_ratio}",
                            "pass e.g. 0.2 for 20%")
        for name in ("allocation", "stats_dtype", "error_scale", "target"):
            choices = _field(name).metadata["choices"]
            if getattr(self, name) not in choices:
                raise UserError(f"unknown {name} '{getattr(self, name)}'", f"use one of {', '.join(choices)}")
        if not (self.damping >= 0 and math.isfinite(self.damping)):
            raise UserError(f"damping must be a finite number >= 0, got {self.damping}",
                            "pass e.g. 0.05 (relative to the mean diagonal of X^T X)")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}", "pass a positive batch_size")
        if not 0.0 < self.max_layer_rate <= 1.0:
            raise UserError(f"max_layer_rate must be in (0, 1], got {self.max_layer_rate}", "pass e.g. 0.8")
        if not 0.0 <= self.depth_spread < 1.0:
            raise UserError(f"depth_spread must be in [0, 1), got {self.depth_spread}", "pass e.g. 0.5")
        return self

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.stats_dtype]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ObsSettings":
        """Settings recorded in a plan's provenance (``plan.provenance["settings"]``); keys this
        version does not know are an error, missing keys take their defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown obs settings {', '.join(unknown)}",
                            f"use only {', '.join(sorted(known))}")
        return cls(**data).validate()


def _field(name: str):
    return next(f for f in fields(ObsSettings) if f.name == name)


# ---- results -----------------------------------------------------------------------------------
@dataclass
class ObsProjectionReport:
    """Relative errors ||X_K W_K^T - Y||_F / ||Y||_F of one projection on the calibration tokens.

    err_dense: all columns, current weights (what the drift of earlier layers leaves);
    err_refit: all columns refit; err_pruned: kept columns, uncompensated (surgery alone);
    err_after: kept columns, compensated. obs_error: sqrt(sum of the greedy steps' exact errors /
    ||Y||^2) (NaN when replaying fixed kept sets).
    """
    layer: int
    proj: str
    columns: int
    columns_kept: int
    tokens: int
    err_dense: float
    err_refit: float
    err_pruned: float
    err_after: float
    obs_error: float


@dataclass
class ObsLayerReport:
    layer: int
    params: int
    budget: float                 # parameters this layer was asked to remove (incl. carried rounding)
    removed_params: int
    removed_kv_groups: list[int]
    removed_channels: list[int]
    time_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.removed_params / self.params


@dataclass
class ObsTimings:
    profile_s: float = 0.0        # global allocation: the profile pass
    forward_s: float = 0.0        # layer forwards + accumulating statistics
    select_s: float = 0.0         # greedy OBS removal
    solve_s: float = 0.0          # refits on the kept columns, error reports
    total_s: float = 0.0


@dataclass
class ObsResult:
    plan: PruningPlan
    settings: ObsSettings
    layers: list[ObsLayerReport] = field(default_factory=list)
    projections: list[ObsProjectionReport] = field(default_factory=list)
    timings: ObsTimings = field(default_factory=ObsTimings)
    stats_bytes: int = 0          # peak statistics + greedy state held at once
    curves: list[LayerCurve] = field(default_factory=list)   # global allocation's profiles

    def layer_rows(self) -> list[dict]:
        return [{**asdict(r), "removed_kv_groups": len(r.removed_kv_groups),
                 "removed_channels": len(r.removed_channels), "rate": r.rate} for r in self.layers]

    def projection_rows(self) -> list[dict]:
        return [asdict(r) for r in self.projections]

    def figure(self, title: str):
        return obs_figure(self, title)


# ---- the layer walk ----------------------------------------------------------------------------
def _diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a - b in float32 at least (bf16 would round differences of residual streams)."""
    dt = torch.promote_types(a.dtype, torch.float32)
    return a.to(dt) - b.to(dt)


def _minus_bias(y: torch.Tensor, lin) -> torch.Tensor:
    """The target of W x when the projection keeps a (fixed) bias: y - b."""
    return y if lin.bias is None else y - lin.bias.detach().to(y.dtype)


@dataclass
class _Walk:
    settings: ObsSettings
    shapes: list[LayerShape]
    budgets: list[float]
    fixed: PruningPlan | None              # replay: kept sets given
    result: ObsResult
    kept: list[LayerPlan] = field(default_factory=list)
    carry: float = 0.0


def _write(lin, w: torch.Tensor) -> None:
    lin.weight.copy_(w.to(device=lin.weight.device, dtype=lin.weight.dtype))


def _report(walk: _Walk, layer: int, proj: str, stats: GramStats, w0: torch.Tensor, kept: torch.Tensor,
            w_kept: torch.Tensor, obs_sum: float | None) -> None:
    k, d = w0.shape[1], walk.settings.damping
    refit = refit_kept(stats, w0, torch.arange(k), d)
    walk.result.projections.append(ObsProjectionReport(
        layer, proj, k, kept.numel(), stats.n, stats.rel_error(w0.double()), stats.rel_error(refit),
        stats.rel_error(w0.double()[:, kept], kept), stats.rel_error(w_kept, kept),
        math.sqrt(obs_sum / max(stats.yy, 1e-300)) if obs_sum is not None else math.nan))


@contextmanager
def _timed(timings: ObsTimings, name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        setattr(timings, name, getattr(timings, name) + time.perf_counter() - t0)


def _pass_a(walk: _Walk, step, shape: LayerShape) -> tuple[GramStats, GramStats | None]:
    """Statistics of o_proj (and of down_proj for the joint choice) on the unmodified layer.

    The walker's lists are overwritten chunk by chunk (dense inputs -> dense outputs here; pruned
    inputs -> residual after attention -> outputs in pass B), so two hidden-state buffers suffice.
    """
    st, layer = walk.settings, step.layer
    attn, mlp, device = layer.self_attn, layer.mlp, arch.model_device(layer)
    o_st = GramStats(shape.n_heads * shape.head_dim, shape.hidden, st.dtype, device)
    d_st = GramStats(shape.intermediate, shape.hidden, st.dtype, device) if walk.fixed is None else None
    dense = step.dense_inputs
    for c, (h, kw) in enumerate(zip(step.inputs, step.kwargs)):
        tr = trace_layer(layer, h, kw)
        if st.target == "local":     # layer l is still unmodified: its own outputs on h are the targets
            o_y, d_y = tr.o_out, tr.down_out
        else:
            dn = tr if dense[c] is h else trace_layer(step.dense_layer, dense[c], kw)  # layer 0: same input
            o_y, d_y = _diff(dn.mid, h), _diff(dn.out, tr.mid)
            dense[c] = dn.out
        o_st.add(tr.o_in, _minus_bias(o_y, attn.o_proj))
        if d_st is not None:
            d_st.add(tr.down_in, _minus_bias(d_y, mlp.down_proj))
    return o_st, d_st


def _choose_jointly(walk: _Walk, shape: LayerShape, o_st: GramStats, d_st: GramStats, w_o, w_d,
                    budget: float) -> tuple[list[int], list[int], float, float]:
    """Greedy OBS over KV groups and channels together: (kept groups, kept channels, OBS error
    of the removed groups, of the removed channels)."""
    st = walk.settings
    projs = {"attn": ObsProjection(o_st, w_o, shape.group_size * shape.head_dim, st.damping, st.dtype),
             "mlp": ObsProjection(d_st, w_d, 1, st.damping, st.dtype)}
    held = o_st.nbytes() + d_st.nbytes() + sum(p.nbytes() for p in projs.values())
    walk.result.stats_bytes = max(walk.result.stats_bytes, held)
    steps = greedy_remove(projs, {"attn": shape.group_cost, "mlp": shape.channel_cost}, budget)
    return (projs["attn"].kept_groups(), projs["mlp"].kept_groups(),
            sum(r.error for r in steps if r.kind == "attn"), sum(r.error for r in steps if r.kind == "mlp"))


def _pass_b(walk: _Walk, step, shape: LayerShape) -> GramStats:
    """down_proj statistics with the cut, compensated attention (the MLP still whole)."""
    st, layer = walk.settings, step.layer
    d_st = GramStats(shape.intermediate, shape.hidden, st.dtype, arch.model_device(layer))
    stream = step.inputs
    for c, kw in enumerate(step.kwargs):
        tr = trace_layer(layer, stream[c], kw)
        y = tr.down_out if st.target == "local" else _diff(step.dense_inputs[c], tr.mid)
        d_st.add(tr.down_in, _minus_bias(y, layer.mlp.down_proj))
        stream[c] = tr.mid
    return d_st


def _choose_channels(walk: _Walk, shape: LayerShape, d_st: GramStats, w_d, budget: float):
    """Greedy OBS over the channels alone: (kept channels, OBS error of the removed ones)."""
    st = walk.settings
    proj = ObsProjection(d_st, w_d, 1, st.damping, st.dtype)
    steps = greedy_remove({"mlp": proj}, {"mlp": shape.channel_cost}, budget)
    return proj.kept_groups(), sum(r.error for r in steps)


def _cut_and_refit(walk: _Walk, index: int, layer, proj: str, shape: LayerShape, stats: GramStats, w0,
                   kept: list[int], obs_error: float | None) -> None:
    """Surgery of one half of the layer, then the ridge refit of its output projection."""
    st = walk.settings
    if proj == "o_proj":
        cols = group_rows(shape, kept, "q")
        prune_layer(layer, shape, kept, list(range(shape.intermediate)))
        lin = layer.self_attn.o_proj
    else:
        cols = torch.tensor(kept, dtype=torch.long)
        prune_layer(layer, layer_shape(layer), list(range(layer_shape(layer).n_kv)), kept)
        lin = layer.mlp.down_proj
    w = refit_kept(stats, w0, cols, st.damping)
    _write(lin, w)
    _report(walk, index, proj, stats, w0, cols, w, obs_error)


@torch.no_grad()
def _layer(walk: _Walk, step) -> None:
    """Passes A and B of one layer (module docstring); sets step.outputs / step.dense_outputs."""
    t, layer, i = walk.result.timings, step.layer, step.index
    shape, fixed = walk.shapes[i], walk.fixed
    budget = walk.budgets[i] + walk.carry
    t0 = time.perf_counter()
    with _timed(t, "forward_s"):
        o_st, d_st = _pass_a(walk, step, shape)
    w_o = layer.self_attn.o_proj.weight.detach().clone()                      # [H, n_heads*hd]
    w_d = layer.mlp.down_proj.weight.detach().clone()                         # [H, I]
    obs_o = obs_d = None
    with _timed(t, "select_s"):
        if fixed is None:
            groups, channels, obs_o, obs_d = _choose_jointly(walk, shape, o_st, d_st, w_o, w_d, budget)
        else:
            groups = sorted(fixed.layers[i].kept_kv_groups)
    del d_st
    with _timed(t, "solve_s"):
        _cut_and_refit(walk, i, layer, "o_proj", shape, o_st, w_o, groups, obs_o)
    del o_st
    with _timed(t, "forward_s"):
        d_st = _pass_b(walk, step, shape)
    removed_attn = (shape.n_kv - len(groups)) * shape.group_cost
    with _timed(t, "select_s"):
        if fixed is not None:
            channels = sorted(fixed.layers[i].kept_channels)
        elif walk.settings.mlp_reselect:
            channels, obs_d = _choose_channels(walk, shape, d_st, w_d, budget - removed_attn)
    with _timed(t, "solve_s"):
        _cut_and_refit(walk, i, layer, "down_proj", shape, d_st, w_d, channels, obs_d)
    with _timed(t, "forward_s"):                        # residual after attention -> layer output
        for c, mid in enumerate(step.inputs):
            step.inputs[c] = arch.mlp_half(layer, mid)
        step.outputs = step.inputs
        step.dense_outputs = step.dense_inputs if walk.settings.target == "residual" else None
    removed = removed_attn + (shape.intermediate - len(channels)) * shape.channel_cost
    walk.carry = budget - removed
    walk.kept[i] = LayerPlan(groups, channels)
    walk.result.layers.append(ObsLayerReport(
        i, shape.params, budget, removed, [g for g in range(shape.n_kv) if g not in groups],
        [c for c in range(shape.intermediate) if c not in channels], time.perf_counter() - t0))


def _run(model, ids: torch.Tensor, walk: _Walk, layers: range, progress: bool) -> None:
    dense = "none" if walk.settings.target == "local" else "stream"
    walker = LayerWalker(model, ids, walk.settings.batch_size, dense=dense, progress=progress,
                         desc=METHOD if walk.fixed is None else f"{METHOD} (replay)")
    for step in walker:
        if step.index in layers:
            _layer(walk, step)
    record_layer_sizes(model)


def _check_ids(ids) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long or ids.numel() == 0:
        raise UserError("calibration_ids must be a non-empty LongTensor [N, T]",
                        "pass the windows of gqaprune.data.calibration_batches")


def calibration_fingerprint(ids: torch.Tensor) -> str:
    """sha256 of the calibration token ids (a replay is bit-exact only on the same ids)."""
    return hashlib.sha256(ids.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def budgets_for(model, ids, settings: ObsSettings, shapes: list[LayerShape], layers: range,
                progress: bool) -> tuple[list[float], list[LayerCurve]]:
    """Per-layer parameter budgets under ``settings.allocation`` (``obs_alloc``)."""
    target = check_reachable(shapes, layers, settings.pruning_ratio)
    if settings.allocation == "uniform":
        return uniform_budgets(shapes, layers, target), []
    room = settings.max_layer_rate * sum(shapes[i].params for i in layers)
    if target > room:
        raise UserError(f"max_layer_rate {settings.max_layer_rate} allows removing at most "
                        f"{room / sum(s.params for s in shapes):.3f} of the model",
                        "raise max_layer_rate or lower pruning_ratio")
    if settings.allocation == "depth":
        return depth_budgets(shapes, layers, target, settings.depth_spread, settings.max_layer_rate), []
    curves = profile_curves(model, ids, layers, settings.batch_size, settings.damping, settings.dtype,
                            settings.max_layer_rate, settings.error_scale, progress)
    return global_budgets(shapes, curves, target), curves


def _provenance(given: Provenance | dict | None, settings: ObsSettings, ids: torch.Tensor) -> Provenance:
    """The caller's provenance (its calibration dataset and seed) plus the settings and the exact
    calibration shape and fingerprint of these token ids."""
    prov = given if isinstance(given, Provenance) else Provenance()
    cal = prov.calibration
    raw = (given or {}).get("calibration", {}) if isinstance(given, dict) else {}
    dataset = cal.dataset if cal else str(raw.get("dataset", ""))
    seed = cal.seed if cal else int(raw.get("seed", 0))
    info = DataInfo(dataset, int(ids.shape[0]), int(ids.shape[1]), seed, calibration_fingerprint(ids))
    return Provenance(settings=settings.to_dict(), calibration=info, extra=dict(prov.extra))


def obs_prune(model, calibration_ids: torch.Tensor, settings: ObsSettings, model_name: str = "",
              progress: bool = True, provenance: Provenance | dict | None = None) -> ObsResult:
    """Select and remove KV groups / MLP channels layer by layer with OBS compensation.

    calibration_ids: LongTensor [N, T]. Prunes ``model`` in place (surgery + compensated o_proj /
    down_proj) and returns the plan (provenance: settings, calibration shape and fingerprint, plus
    ``provenance``, whose "calibration" entry, e.g. dataset and seed, is merged), per-layer /
    per-projection reports and timings.
    """
    settings.validate()
    _check_ids(calibration_ids)
    t0 = time.perf_counter()
    shapes = model_shapes(model)
    layers = layer_range(len(shapes), settings.layer_start, settings.layer_end)
    budgets, curves = budgets_for(model, calibration_ids, settings, shapes, layers, progress)
    plan = PruningPlan(model_name, METHOD, settings.pruning_ratio, shapes, [],
                       _provenance(provenance, settings, calibration_ids))
    result = ObsResult(plan, settings, curves=curves)
    result.timings.profile_s = time.perf_counter() - t0
    walk = _Walk(settings, shapes, budgets, None, result,
                 kept=[LayerPlan(list(range(s.n_kv)), list(range(s.intermediate))) for s in shapes])
    _run(model, calibration_ids, walk, layers, progress)
    plan.layers = walk.kept
    result.timings.total_s = time.perf_counter() - t0
    return result


def obs_commit(model, plan: PruningPlan, calibration_ids: torch.Tensor, settings: ObsSettings,
               progress: bool = True) -> ObsResult:
    """Replay ``plan``: the same surgery and compensation for its fixed kept sets.

    Layers whose kept sets are complete are refit too (as ``obs_prune`` does in its range) unless
    they lie outside ``settings``' layer range. Bit-exact with ``obs_prune`` on the same model,
    calibration ids and settings.
    """
    settings.validate()
    _check_ids(calibration_ids)
    t0 = time.perf_counter()
    shapes = model_shapes(model)
    plan.check_compatible(shapes)
    layers = layer_range(len(shapes), settings.layer_start, settings.layer_end)
    for i, (s, lp) in enumerate(zip(shapes, plan.layers)):
        if i not in layers and (len(lp.kept_kv_groups) < s.n_kv or len(lp.kept_channels) < s.intermediate):
            raise UserError(f"plan prunes layer {i}, outside layer_start/layer_end",
                            "replay with the layer range the plan was made with")
    result = ObsResult(plan, settings)
    walk = _Walk(settings, shapes, [0.0] * len(shapes), plan, result,
                 kept=[LayerPlan(list(lp.kept_kv_groups), list(lp.kept_channels)) for lp in plan.layers])
    _run(model, calibration_ids, walk, layers, progress)
    result.timings.total_s = time.perf_counter() - t0
    return result


# ---- figure ------------------------------------------------------------------------------------
def obs_figure(result: ObsResult, title: str):
    """Top: fraction removed per layer (attention, MLP, layer). Bottom: relative errors per
    projection — surgery alone vs after OBS compensation (log scale)."""
    from gqaprune.plots import legend_outside, plt, set_title

    rows = result.plan.layer_summary()
    x = [r["layer"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.5 * len(rows) + 2), 6), sharex=True)
    width = 0.27
    for k, (key, label) in enumerate((("kept_attn_frac", "attention"), ("kept_mlp_frac", "MLP"),
                                      ("kept_frac", "layer"))):
        top.bar([v + (k - 1) * width for v in x], [1 - r[key] for r in rows], width, label=label)
    top.set_ylim(0, 1)
    top.set_ylabel("fraction removed")
    legend_outside(top, fontsize=7)
    set_title(top, title)
    for proj, marker in zip(PROJECTIONS, ("o", "s")):
        sel = [r for r in result.projections if r.proj == proj]
        xs = [r.layer for r in sel]
        bottom.semilogy(xs, [max(r.err_pruned, 1e-12) for r in sel], marker + "--",
                        label=f"{proj} surgery only")
        bottom.semilogy(xs, [max(r.err_after, 1e-12) for r in sel], marker + "-", label=f"{proj} compensated")
    bottom.set_ylabel("||XW^T - Y|| / ||Y||")
    bottom.set_xlabel("decoder layer")
    bottom.set_xticks(x)
    legend_outside(bottom, fontsize=7)
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class ObsConfig(Section):
    """obs (reconstruction-aware selection with OBS compensation)"""
    obs_allocation: str = knob("global", "how the removal is spread over layers: uniform, global (normalised "
                               "OBS error curves of a profile pass), depth (increasing with depth)",
                               choices=ALLOCATIONS)
    obs_stats_dtype: str = knob("float32", "dtype of the accumulated X^T X / X^T Y and the greedy state",
                                choices=tuple(DTYPES))
    obs_max_layer_rate: float = knob(0.8, "global / depth: largest fraction of one layer removed",
                                     low=0.0, high=1.0, low_open=True)
    obs_depth_spread: float = knob(0.5, "depth: rates grow from (1 - spread) to (1 + spread) x the mean",
                                   low=0.0, high=1.0, high_open=True)
    obs_error_scale: str = knob("stream", "global: errors divided by the output residual stream's energy "
                                "(stream) or raw (none)", choices=ERROR_SCALES)
    obs_target: str = knob("residual", "refit to the dense residual stream (residual) or to the unpruned "
                           "layer on the pruned inputs (local)", choices=TARGETS)
    obs_mlp_reselect: bool = knob(True, "re-select the MLP channels after the layer's attention is cut")

    def settings(self, pruning_ratio: float, damping: float, batch_size: int,
                 layer_start: int | None, layer_end: int | None) -> ObsSettings:
        return ObsSettings(pruning_ratio, self.obs_allocation, damping, self.obs_stats_dtype, batch_size,
                           self.obs_max_layer_rate, self.obs_depth_spread, self.obs_error_scale,
                           self.obs_target, self.obs_mlp_reselect, layer_start, layer_end).validate()


def _run_method(model, ids, cfg, *, batch_size: int, damping: float, model_name: str = "",
                provenance: Provenance | None = None, progress: bool = True) -> ObsResult:
    """The ``obs`` method on the structured config section (``cfg.obs`` + shared knobs)."""
    settings = cfg.obs.settings(cfg.pruning_ratio, damping, batch_size, cfg.layer_start, cfg.layer_end)
    return obs_prune(model, ids, settings, model_name, progress, provenance)


def _replay_method(model, plan: PruningPlan, ids, *, progress: bool = True) -> ObsResult:
    """Replay an obs plan with the settings it records (bit-exact on the same calibration ids)."""
    settings = ObsSettings.from_dict(plan.provenance.settings)
    fp = plan.provenance.calibration.fingerprint if plan.provenance.calibration else None
    if fp and fp != calibration_fingerprint(ids):
        raise UserError("these calibration windows are not the ones the obs plan was made with "
                        "(fingerprint differs), so the compensated weights would differ",
                        "replay with the plan's calibration dataset, samples, length and seed "
                        "(calibration_dataset=auto uses the recorded dataset)")
    return obs_commit(model, plan, ids, settings, progress)


JOINT_METHODS.register(METHOD, JointMethod(_run_method, _replay_method, section="obs",
                                           summary="reconstruction-aware selection: structured OBS, layer by layer"))
