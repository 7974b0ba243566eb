"""Training-free recovery: refit each pruned layer's output projections by least squares.

Structured pruning removes columns of ``o_proj`` (the pruned heads' values) and ``down_proj``
(the pruned MLP channels), so each layer writes something different into the residual stream.
Here the plan is applied **layer by layer** and, right after cutting layer l, its ``o_proj`` and
then its ``down_proj`` are refit on calibration tokens so that the pruned layer reproduces the
dense model (see :data:`TARGETS` for exactly which dense quantity):

* inputs X [n, k] of the projection (k = kept columns) come from the *pruned* model, whose
  earlier layers are already corrected, so their corrections are taken into account;
* targets Y [n, H] come from the *dense* model (a copy of layer l taken just before its surgery);
* only the normal-equation statistics are accumulated chunk by chunk (X^T X [k, k],
  X^T Y [k, H], sums), never X itself: float32 products per chunk summed in float64; solves
  (Cholesky) run in float64 on the weights' device; new weights keep the model dtype. The knob
  ``reconstruct_stats_dtype=float32`` keeps X^T X, X^T Y and the solve in float32 instead (half
  the memory of the largest solve; errors are still evaluated in float64, column block by block).

Variants (``mode``):

* ``lstsq``  – full refit of the kept columns, ridge-regularised towards the pruned weights W0:
  ``(X^T X + lam I) W^T = X^T (Y - b) + lam W0^T`` with ``lam = damping * mean(diag(X^T X))``
  and b the projection's existing bias (if any). W = W0 is feasible, so the calibration error
  never rises; directions the calibration data never excites keep their original weights.
* ``bias``   – FLAP-style bias compensation: weights unchanged, the mean output change over
  the calibration tokens is added as a bias, ``b_new = b + mean_t(Y_t - (W0 x_t + b))``; with its
  default (local) target that is FLAP's ``W[:, removed] @ mean_t(x_t[removed])``. Adds a bias to
  o_proj/down_proj (stock Llama/Qwen2/Mistral have none); the per-layer flags
  :data:`CFG_O_BIAS` / :data:`CFG_DOWN_BIAS` make such checkpoints reload (see checkpoint.py).

Memory: besides the model, two hidden-state buffers of the calibration set (dense and pruned
stream, ``samples x seq_len x H`` in the model dtype; one for the local target), one dense
decoder layer (deep copy) and one projection's statistics (``lstsq``: (k^2 + k H) float64;
``bias``: O(H)). Never a second model. The solve's peak (k = kept columns, s = bytes of the
statistics dtype, 8 for float64): X^T X, the damped copy A and its Cholesky factor, 3 k^2 s, plus
X^T Y and w0, 2 k H s; A is freed before the two triangular solves (then X^T X, L and ~5 k H s:
X^T Y, w0, the right-hand side, the intermediate and the solution). ``benchmarks/bench_memory.py`` measures it.
Cost per layer: attention blocks of the pruned and dense layer (o_proj pass), both full layers
(down_proj pass), the pruned MLP (advance), plus accumulating the statistics.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from gqaprune.config import Section, knob
from gqaprune.errors import UserError
from gqaprune.registry import Registry
from gqaprune import arch
from gqaprune.arch import CFG_DOWN_BIAS, CFG_O_BIAS
from gqaprune.calibrate import LayerWalker, StopForward
from gqaprune.structured.plan import PruningPlan
from gqaprune.structured.surgery import apply_plan, prune_layer, record_layer_sizes
from gqaprune.structured.units import model_shapes

# mode -> the target it refits to by default: the one measured best on stories260K (README): the
# full refit absorbs the accumulated drift; bias compensation is FLAP's (the removed columns' mean).
MODES: Registry[str] = Registry("reconstruct mode")
MODES.register("none", "local")
MODES.register("lstsq", "residual")
MODES.register("bias", "local")
# Which dense quantity the refit projection's output must match (see ``_targets``):
#   residual – the dense residual stream after the sub-block: Y = dense_after - pruned_before
#              (also absorbs the drift accumulated by earlier layers);
#   dense    – the dense sub-block's output on the dense model's own hidden states;
#   local    – the dense sub-block applied to the pruned model's hidden states (mimic the function).
TARGETS = ("residual", "dense", "local")
PROJECTIONS = ("o_proj", "down_proj")
DEFAULT_DAMPING = 0.05       # the refit's ridge, relative to mean(diag(X^T X))

# Per-layer bool lists recording which o_proj / down_proj carry a bias (gqaprune.arch.CFG_O_BIAS,
# CFG_DOWN_BIAS): written when reconstruction adds biases, read by checkpoint.py and remote code.

AUTO_DAMPING_START = 1e-10   # first relative damping tried when a solve is singular
AUTO_DAMPING_MAX = 1.0
# Smallest Cholesky pivot share accepted without raising the damping, by precision of the chunk
# products (float32 sums carry ~1e-7 relative noise; float64 ~1e-16).
PIVOT_TOL = {False: 1e-6, True: 1e-12}
STATS_DTYPES = ("float64", "float32")
ERROR_BLOCK = 1024           # columns of X^T X converted to float64 at a time (float32 statistics)


@dataclass(frozen=True)
class ReconstructionConfig(Section):
    """reconstruction after surgery (refit o_proj / down_proj, no training)"""
    reconstruct: str = knob("lstsq", "lstsq: least-squares refit of the kept columns; bias: FLAP-style "
                            "bias compensation; none: surgery only", choices=lambda: MODES.names(),
                            kind="reconstruct mode")
    reconstruct_samples: int = knob(128, "calibration sequences for the reconstruction", low=1,
                                    fix="pass a larger reconstruct_samples (default 128)")
    reconstruct_seq_len: int = knob(128, "tokens per reconstruction sequence (BOS first)", low=2,
                                    fix="pass a larger reconstruct_seq_len (default 128)")
    reconstruct_stats_dtype: str = knob("float64", "lstsq: dtype of X^T X, X^T Y and the Cholesky solve; "
                                        "float32 halves the largest solve's memory", choices=STATS_DTYPES,
                                        kind="reconstruct_stats_dtype",
                                        fix="use float64 (default) or float32")
    # Not flags: set by code (the pipeline passes the root ``damping`` knob and the calibration
    # batch size).
    damping: float = DEFAULT_DAMPING   # ridge, relative to mean(diag(X^T X)), >= 0
    target: str | None = None          # None: the mode's default target (MODES)
    batch_size: int = 8
    show_progress: bool = True

    def __post_init__(self):
        if self.target is None and self.reconstruct in MODES:
            object.__setattr__(self, "target", MODES.get(self.reconstruct))
        super().__post_init__()

    def check(self) -> None:
        if not (isinstance(self.damping, (int, float)) and math.isfinite(self.damping) and self.damping >= 0):
            raise UserError(f"damping must be a finite number >= 0, got {self.damping}",
                            "pass e.g. --damping 0.05 (relative to the mean diagonal of X^T X)")
        if self.target not in TARGETS:
            raise UserError(f"unknown reconstruction target '{self.target}'", f"use one of {', '.join(TARGETS)}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}", "pass a positive batch_size")

    @property
    def mode(self) -> str:
        return self.reconstruct


@dataclass
class ProjectionReport:
    """One refit: relative errors ||X W^T + b - Y||_F / ||Y||_F on the calibration tokens."""
    layer: int
    proj: str
    err_before: float
    err_after: float
    tokens: int
    columns: int
    damping: float          # relative damping actually used (may exceed the requested one)
    time_s: float


@dataclass
class ReconstructResult:
    settings: ReconstructionConfig
    reports: list[ProjectionReport] = field(default_factory=list)
    time_s: float = 0.0

    def rows(self) -> list[dict]:
        return [asdict(r) for r in self.reports]


# ---- normal equations ------------------------------------------------------------------------
class NormalEquations:
    """Running statistics of a linear least-squares problem Y ~ X W^T + b, never storing X.

    xtx [k, k] = sum x x^T, xty [k, H] = sum x y^T (both in ``dtype``), sx [k], sy [H],
    yy = sum ||y||^2 (float64), n tokens.
    """

    def __init__(self, k: int, h: int, device, dtype: torch.dtype = torch.float64):
        f64 = dict(dtype=torch.float64, device=device)
        self.xtx = torch.zeros(k, k, dtype=dtype, device=device)
        self.xty = torch.zeros(k, h, dtype=dtype, device=device)
        self.sx = torch.zeros(k, **f64)
        self.sy = torch.zeros(h, **f64)
        self.yy = torch.zeros((), **f64)
        self.n = 0
        self.exact = True           # all chunk products in float64 so far

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """x [..., k], y [..., H] (any leading shape, flattened to tokens).

        A chunk's products run in float32 (float64 for float64 activations: fast on GPUs whose
        float64 throughput is 1/64) and are summed into the float64 accumulators.
        """
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.exact = self.exact and dt == torch.float64 and self.xtx.dtype == torch.float64
        x = x.reshape(-1, x.shape[-1]).to(self.sx.device, dt)             # [n, k]
        y = y.reshape(-1, y.shape[-1]).to(self.sx.device, dt)             # [n, H]
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.sx += x.sum(0, dtype=torch.float64)
        self.sy += y.sum(0, dtype=torch.float64)
        self.yy += y.double().square().sum()
        self.n += x.shape[0]

    def sq_error(self, w: torch.Tensor, b: torch.Tensor | None = None) -> float:
        """sum_t ||W x_t + b - y_t||^2 from the statistics (w [H, k], b [H], float64)."""
        wx = self._quad(w) - 2 * (w * self.xty.T).sum() + self.yy
        if b is not None:
            wx = wx + 2 * b @ (w @ self.sx - self.sy) + self.n * (b @ b)
        return max(float(wx), 0.0)

    def _quad(self, w: torch.Tensor) -> torch.Tensor:
        """sum_t ||W x_t||^2 = sum(W X^T X * W) in float64; float32 statistics are converted one
        column block [k, ERROR_BLOCK] at a time (never a float64 copy of X^T X)."""
        w = w.to(torch.float64)
        if self.xtx.dtype == torch.float64:
            return (w @ self.xtx * w).sum()
        total = torch.zeros((), dtype=torch.float64, device=w.device)
        for j in range(0, w.shape[1], ERROR_BLOCK):
            block = self.xtx[:, j: j + ERROR_BLOCK].to(torch.float64)         # [k, c]
            total += ((w @ block) * w[:, j: j + ERROR_BLOCK]).sum()
        return total

    def rel_error(self, w: torch.Tensor, b: torch.Tensor | None = None) -> float:
        return math.sqrt(self.sq_error(w, b) / max(float(self.yy), 1e-300))

    def solve(self, w0: torch.Tensor, b: torch.Tensor | None, damping: float) -> tuple[torch.Tensor, float]:
        """Ridge refit towards w0: (X^T X + lam I) W^T = X^T (Y - b) + lam w0^T.

        Returns (W [H, k] in the statistics dtype, relative damping used). A (numerically) singular system –
        rank-deficient X with damping 0 – is retried with growing damping; X == 0 keeps w0.
        Singular means a Cholesky pivot L_ii^2 / (A_ii + lam), the share of column i not explained
        by the columns before it, below the statistics' precision (PIVOT_TOL).
        """
        a, rhs = self.xtx, self.xty
        if b is not None:
            rhs = rhs - (self.sx[:, None] * b[None, :]).to(a.dtype)     # X^T (Y - 1 b^T)
        scale = float(a.diagonal().to(torch.float64).mean())
        if not scale > 0:                                                 # no signal at all
            return w0.clone(), damping
        tiny = max(1e-300, torch.finfo(a.dtype).tiny)
        rel = damping
        while True:
            lam = rel * scale
            damped = a.clone()                                            # A = X^T X + lam I [k, k]
            damped.diagonal().add_(lam)
            chol, info = torch.linalg.cholesky_ex(damped)
            pivots = chol.diagonal() ** 2 / damped.diagonal().clamp_min(tiny)
            del damped                                                    # peak: X^T X, A, L
            if int(info) == 0 and float(pivots.min()) >= PIVOT_TOL[self.exact]:
                # two triangular solves: cholesky_solve would copy L into another layout (+k^2)
                z = torch.linalg.solve_triangular(chol, rhs + lam * w0.T.to(a.dtype), upper=False)
                w = torch.linalg.solve_triangular(chol.mT, z, upper=True).T      # [H, k]
                del z
                if bool(torch.isfinite(w).all()):
                    return w, rel
            if rel >= AUTO_DAMPING_MAX:
                return w0.clone(), rel
            rel = max(rel * 10, AUTO_DAMPING_START)


# ---- tracing one layer ------------------------------------------------------------------------
@dataclass
class _Trace:
    """Intermediate tensors of one decoder layer forward ([b, T, .] each)."""
    inp: torch.Tensor
    o_in: torch.Tensor | None = None
    o_out: torch.Tensor | None = None
    mid: torch.Tensor | None = None       # residual stream after attention = inp + o_out
    down_in: torch.Tensor | None = None
    down_out: torch.Tensor | None = None
    out: torch.Tensor | None = None       # None when stopped after attention


@torch.no_grad()
def trace_layer(layer, h: torch.Tensor, kwargs: dict, attention_only: bool = False) -> _Trace:
    """Run one decoder layer (or only its attention block) recording projection inputs/outputs.

    Relies on the Llama/Qwen2/Mistral layer structure: mid = h + o_proj(.), out = mid +
    mlp(post_attention_layernorm(mid)).
    """
    tr = _Trace(inp=h)

    def save(name, use_output, stop=False):
        def fn(_m, args, out=None):
            setattr(tr, name, out if use_output else args[0])
            if stop:
                raise StopForward
        return fn

    handles = [layer.self_attn.o_proj.register_forward_pre_hook(save("o_in", False)),
               layer.self_attn.o_proj.register_forward_hook(save("o_out", True, attention_only))]
    if not attention_only:
        handles += [layer.mlp.down_proj.register_forward_pre_hook(save("down_in", False)),
                    layer.mlp.down_proj.register_forward_hook(save("down_out", True))]
    try:
        out = layer(h, **kwargs)
        tr.out = out[0] if isinstance(out, tuple) else out
    except StopForward:
        pass
    finally:
        for hd in handles:
            hd.remove()
    tr.mid = h + tr.o_out
    return tr


mlp_block = arch.mlp_half   # the MLP half of a decoder layer: residual after attention -> output


def _targets(proj: str, target: str, pruned: _Trace, dense: _Trace | None, dense_layer) -> torch.Tensor:
    """Y [b, T, H]: what the refit projection's output should be for these tokens.

    o_proj (attention block) and down_proj (MLP block) with pruned input h and block output
    h + f(h): residual -> dense_after - h; dense -> f_dense(h_dense); local -> f_dense(h).
    Differences of residual streams are taken in float32 at least (bf16 would round them).
    """
    def diff(a, b):
        dt = torch.promote_types(a.dtype, torch.float32)
        return a.to(dt) - b.to(dt)

    if proj == "o_proj":
        if target == "residual":
            return diff(dense.mid, pruned.inp)
        return dense.o_out                           # dense: on dense stream; local: dense_layer ran on h
    if target == "residual":
        return diff(dense.out, pruned.mid)
    if target == "dense":
        return dense.down_out
    return dense_layer.mlp(dense_layer.post_attention_layernorm(pruned.mid))  # local


@dataclass
class _Streams:
    """Calibration hidden states [b, T, H] per chunk entering the current layer: ``pruned`` from
    the pruned (already corrected) model, ``dense`` from the dense model (None for target local)."""
    pruned: list[torch.Tensor]
    dense: list[torch.Tensor] | None
    kwargs: list[dict]


# ---- the refit of one projection ---------------------------------------------------------------
@torch.no_grad()
def _refit(layer, dense_layer, proj: str, layer_idx: int, streams: _Streams,
           settings: ReconstructionConfig) -> ProjectionReport:
    """Accumulate statistics over all chunks, solve, and write the new weights/bias of ``proj``.

    o_proj runs only the attention blocks. The down_proj pass, the last use of the layer inputs,
    replaces them in ``streams`` by the pruned residual after attention and the dense layer
    output, so that advancing the streams costs only the pruned MLP (:func:`advance`).
    """
    t0 = time.perf_counter()
    lin: nn.Linear = layer.self_attn.o_proj if proj == "o_proj" else layer.mlp.down_proj
    w0 = lin.weight.detach().to(getattr(torch, settings.reconstruct_stats_dtype))   # [H, k]
    b0 = lin.bias.detach().to(torch.float64) if lin.bias is not None else None
    stats = (NormalEquations(w0.shape[1], w0.shape[0], w0.device, getattr(torch, settings.reconstruct_stats_dtype))
             if settings.mode == "lstsq" else None)
    shift = ShiftStats(w0.shape[0], w0.device) if settings.mode == "bias" else None
    local, attn = settings.target == "local", proj == "o_proj"
    for c, kw in enumerate(streams.kwargs):
        hp = streams.pruned[c]
        pruned = trace_layer(layer, hp, kw, attention_only=attn)
        dense = None
        if attn:
            dense = trace_layer(dense_layer, hp if local else streams.dense[c], kw, attention_only=True)
        elif not local:
            dense = trace_layer(dense_layer, streams.dense[c], kw)
            streams.dense[c] = dense.out
        y = _targets(proj, settings.target, pruned, dense, dense_layer)       # [b, T, H]
        x = pruned.o_in if attn else pruned.down_in                          # [b, T, k]
        if stats is not None:
            stats.add(x, y)
        else:
            shift.add(lin(x), y)
        if not attn:
            streams.pruned[c] = pruned.mid
    if stats is not None:
        before = stats.rel_error(w0, b0)
        w, used = stats.solve(w0, b0, settings.damping)
        after = stats.rel_error(w, b0)
        lin.weight.copy_(w.to(lin.weight.dtype))
        n = stats.n
    else:
        before, after = shift.rel_error(False), shift.rel_error(True)
        _set_bias(lin, (b0 if b0 is not None else 0) + shift.mean_change())
        used, n = 0.0, shift.n
    return ProjectionReport(layer_idx, proj, before, after, n, w0.shape[1], used,
                            time.perf_counter() - t0)


@torch.no_grad()
def advance(layer, streams: _Streams) -> None:
    """After the down_proj refit: pruned stream (holding the residual after attention) -> output."""
    streams.pruned = [mlp_block(layer, mid) for mid in streams.pruned]


class ShiftStats:
    """Bias mode: statistics of the output change d = y - (W0 x + b0) (O(H) memory).

    The bias c minimising sum_t ||d_t - c||^2 is mean(d); the error falls from sum ||d||^2 to
    sum ||d||^2 - n ||mean d||^2.
    """

    def __init__(self, h: int, device):
        self.sd = torch.zeros(h, dtype=torch.float64, device=device)
        self.dd = 0.0
        self.yy = 0.0
        self.n = 0

    def add(self, pred: torch.Tensor, y: torch.Tensor) -> None:
        y = y.reshape(-1, y.shape[-1]).to(torch.float64)
        d = y - pred.reshape(-1, pred.shape[-1]).to(torch.float64)       # [n, H]
        self.sd += d.sum(0).to(self.sd.device)
        self.dd += float((d * d).sum())
        self.yy += float((y * y).sum())
        self.n += d.shape[0]

    def mean_change(self) -> torch.Tensor:
        return self.sd / max(self.n, 1)

    def rel_error(self, compensated: bool) -> float:
        m = self.mean_change()
        err = self.dd - (self.n * float(m @ m) if compensated else 0.0)
        return math.sqrt(max(err, 0.0) / max(self.yy, 1e-300))


def _set_bias(lin: nn.Linear, bias: torch.Tensor) -> None:
    """Write (or add) the bias of ``lin`` in its own dtype/device."""
    bias = bias.to(device=lin.weight.device, dtype=lin.weight.dtype)
    if lin.bias is None:
        lin.bias = nn.Parameter(bias, requires_grad=lin.weight.requires_grad)
    else:
        lin.bias.copy_(bias)


def record_bias_flags(model) -> bool:
    """Write per-layer o_proj/down_proj bias flags into the config if any projection has one.

    Flags make checkpoint.save_model choose the remote-code form, whose modeling file builds
    these biases (stock classes would silently drop them on load)."""
    layers = arch.decoder_layers(model)
    o = [layer.self_attn.o_proj.bias is not None for layer in layers]
    down = [layer.mlp.down_proj.bias is not None for layer in layers]
    if any(o) or any(down):
        setattr(model.config, CFG_O_BIAS, o)
        setattr(model.config, CFG_DOWN_BIAS, down)
        return True
    return False


# ---- the whole model ---------------------------------------------------------------------------
def min_tokens_needed(plan: PruningPlan) -> int:
    """Tokens needed for an unregularised (damping 0) solve: the largest number of kept columns."""
    cols = [max(len(lp.kept_kv_groups) * s.group_size * s.head_dim, len(lp.kept_channels))
            for s, lp in zip(plan.original, plan.layers)]
    return max(cols)


def check_calibration(plan: PruningPlan, n_tokens: int, settings: ReconstructionConfig) -> None:
    """Damping 0 with fewer tokens than kept columns is under-determined: refuse it up front."""
    need = min_tokens_needed(plan)
    if settings.mode == "lstsq" and settings.damping == 0 and n_tokens < need:
        raise UserError(f"least-squares reconstruction with damping 0 is under-determined: "
                        f"{n_tokens} calibration tokens < {need} kept columns",
                        f"use reconstruct_samples x reconstruct_seq_len >= {need} tokens, "
                        f"or damping > 0 (e.g. 0.05)")


@torch.no_grad()
def prune_and_reconstruct(model, plan: PruningPlan, batches: torch.Tensor | None,
                          settings: ReconstructionConfig) -> ReconstructResult:
    """The one commit path: apply ``plan`` and (unless mode ``none``) refit o_proj then down_proj
    of each pruned layer, layer by layer.

    batches: LongTensor [n, T] of calibration token ids (unused, may be None, for mode none). The
    resulting architecture is exactly that of ``surgery.apply_plan`` (plus o_proj/down_proj biases
    in ``bias`` mode).
    """
    result = ReconstructResult(settings)
    t0 = time.perf_counter()
    if settings.mode == "none":
        apply_plan(model, plan)
        result.time_s = time.perf_counter() - t0
        return result
    shapes = model_shapes(model)
    plan.check_compatible(shapes)
    check_calibration(plan, batches.numel(), settings)
    _reconstruct_layers(model, arch.decoder_layers(model), shapes, plan, batches, settings, result)
    record_layer_sizes(model)
    if settings.mode == "bias":
        record_bias_flags(model)
    result.time_s = time.perf_counter() - t0
    return result


def _reconstruct_layers(model, layers, shapes, plan, batches, settings, result) -> None:
    """The layer loop on the walker: copy dense layer l, cut it, refit o_proj then down_proj."""
    walker = LayerWalker(model, batches, settings.batch_size,
                         dense="layer" if settings.target == "local" else "stream",
                         progress=settings.show_progress, desc=f"reconstruct ({settings.mode})")
    for step in walker:
        shape, lp = shapes[step.index], plan.layers[step.index]
        prune_layer(step.layer, shape, lp.kept_kv_groups, lp.kept_channels)
        streams = _Streams(list(step.inputs), None if step.dense_inputs is None else list(step.dense_inputs),
                           step.kwargs)
        for proj in PROJECTIONS:
            result.reports.append(_refit(step.layer, step.dense_layer, proj, step.index, streams, settings))
        advance(step.layer, streams)
        step.outputs, step.dense_outputs = streams.pruned, streams.dense


def error_figure(rows: list[dict], title: str):
    """Per layer and projection: relative reconstruction error before vs after the refit."""
    from gqaprune.plots import legend_outside, plt, set_suptitle

    projs = sorted({r["proj"] for r in rows}, key=PROJECTIONS.index)
    fig, axes = plt.subplots(1, len(projs), figsize=(4.5 * len(projs), 3.4), squeeze=False)
    for ax, proj in zip(axes[0], projs):
        sel = [r for r in rows if r["proj"] == proj]
        layers = [r["layer"] for r in sel]
        ax.bar([x - 0.2 for x in layers], [r["err_before"] for r in sel], 0.4, label="before")
        ax.bar([x + 0.2 for x in layers], [r["err_after"] for r in sel], 0.4, label="after")
        ax.set_title(proj, fontsize=9)
        ax.set_xlabel("decoder layer")
        ax.set_xticks(layers)
        ax.set_ylabel("relative error ||XW^T+b-Y|| / ||Y||")
    legend_outside(axes[0][-1])        # the panels share their two series: one legend
    set_suptitle(fig, title)
    fig.tight_layout()
    return fig
