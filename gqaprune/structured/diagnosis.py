"""Gradient diagnosis of a Taylor-based plan: are some layers over-pruned because of gradient scale?

For every pruned layer l (projection weights only):

    grad_norm_l       = ||g_l||_2                   g = gradients summed over calibration batches
    grad_mean_l       = mean |g_l|
    mean_importance_l = sum_u score_u^power / P_l   (per-parameter Taylor importance of the layer)

and, over the pruned layers (a ratio max / min, with min floored at 1e-12 * max so that a layer
with zero gradient reads as 1e12 instead of infinity):

    grad_norm_ratio = ratio of grad_norm_l,  grad_mean_ratio = ratio of grad_mean_l,
    mean_ratio      = ratio of mean_importance_l   (raw scores, before any conditioning)

With score conditioning (global taylor: clipping / normalisation), ``mean_ratio_conditioned`` is
the same ratio of the per-layer mean ranking key *after* clipping and normalisation (what the
global ranking actually compared): a working remedy brings it near 1 while mean_ratio, a property
of the raw scores, cannot change. Normalised keys can be negative (log, zscore); their per-layer
means are shifted by (min + spread) before the ratio, so 1.0 still means "layers look alike".

A layer is an *extreme pruning layer* when it, or its attention or its MLP block, lost more than
90% of its parameters. The verdict names those layers and the parameter that fixes it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from gqaprune.structured.plan import PruningPlan
from gqaprune.structured.scoring import UnitScores

EXTREME_THRESHOLD = 0.9
RATIO_WARN = 100.0     # gradient scales this far apart are worth a note even without extremes
_CAP = 1e12


@dataclass(frozen=True)
class DiagnosisRow:
    layer: int
    grad_norm: float
    grad_mean: float
    mean_importance: float         # sum_u score_u^power / P_l on the raw scores
    pruned_frac: float
    pruned_attn_frac: float
    pruned_mlp_frac: float
    extreme: bool
    mean_key: float | None = None  # sum_u key_u * cost_u / P_l on the conditioned keys (global ranking)


@dataclass
class Diagnosis:
    """Gradient diagnosis of one Taylor-based plan (module docstring)."""
    method: str
    layers: list[DiagnosisRow]
    grad_norm_ratio: float
    grad_mean_ratio: float
    mean_ratio: float                          # per-parameter importance, raw scores
    extreme_pruning_layers: list[int]
    threshold: float = EXTREME_THRESHOLD
    mean_ratio_conditioned: float | None = None  # the same after clipping / normalisation
    verdict: str = ""
    conditioning: dict | None = None
    block_correction: list = field(default_factory=list)

    @property
    def num_extreme_pruning_layers(self) -> int:
        return len(self.extreme_pruning_layers)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["num_extreme_pruning_layers"] = self.num_extreme_pruning_layers
        return out


def scale_ratio(values: list[float]) -> float:
    top = max(values) if values else 0.0
    if top <= 0:
        return 1.0
    return top / max(min(values), top / _CAP)


def _shifted_ratio(values: list[float]) -> float:
    """max/min of per-layer mean keys that may be negative (log / zscore keys): shifted to start at
    the smallest positive spread, so 1.0 means the layers look alike to the ranking."""
    low = min(values) if values else 0.0
    if low > 0:
        return scale_ratio(values)
    spread = (max(values) - low) if values else 0.0
    return 1.0 if spread <= 0 else scale_ratio([v - low + spread for v in values])


def diagnose(plan: PruningPlan, scores: UnitScores | None, layers: range | None = None,
             keys: UnitScores | None = None) -> Diagnosis | None:
    """The diagnosis, or None when the scores carry no gradient statistics. ``keys``: the
    conditioned ranking keys (power 0) the global ranking actually compared, if any."""
    stats = scores.gradient_stats if scores is not None else None
    if not stats:
        return None
    summary = plan.layer_summary()
    layers = layers if layers is not None else range(len(summary))
    p = scores.power if scores.power > 0 else 1.0
    rows = []
    for i in layers:
        s, r = plan.original[i], summary[i]
        total = float(scores.attn[i].double().clamp_min(0).pow(p).sum() +
                      scores.mlp[i].double().clamp_min(0).pow(p).sum())
        pruned = (r["pruned_frac"], 1 - r["kept_attn_frac"], 1 - r["kept_mlp_frac"])
        mean_key = None
        if keys is not None:  # the same per-parameter mean, on the keys the ranking compared
            mean_key = float(keys.attn[i].double().sum() * s.group_cost +
                             keys.mlp[i].double().sum() * s.channel_cost) / s.params
        rows.append(DiagnosisRow(i, stats[i].grad_norm, stats[i].grad_mean, total / s.params, *pruned,
                                 max(pruned) > EXTREME_THRESHOLD, mean_key))
    return Diagnosis(plan.method, rows, scale_ratio([r.grad_norm for r in rows]),
                     scale_ratio([r.grad_mean for r in rows]), scale_ratio([r.mean_importance for r in rows]),
                     [r.layer for r in rows if r.extreme],
                     mean_ratio_conditioned=None if keys is None else _shifted_ratio([r.mean_key for r in rows]))


def remedy(diag: dict, settings: dict) -> str:
    """Which parameter to set, given the method and the conditioning already in use."""
    method = diag.method
    if method in ("layerwise", "blockwise"):
        return (f"lower max_pruning_rate (now {settings.get('max_pruning_rate')}) so that no "
                f"{'block' if method == 'blockwise' else 'layer'} can lose that much, or lower alpha "
                f"(now {settings.get('alpha')}) to spread the rates less")
    only_blocks = all(r.pruned_frac <= EXTREME_THRESHOLD for r in diag.layers if r.extreme)
    scale_skew = max(diag.grad_mean_ratio, diag.mean_ratio) > RATIO_WARN
    steps = []
    if settings.get("normalization", "none") == "none":
        steps.append("normalization=log (per-layer score normalisation; the order inside each layer "
                     "is kept, layers become comparable)")
    if settings.get("clip_low", 0) <= 0 and settings.get("clip_high", 100) >= 100:
        steps.append("clip_low=5 clip_high=95 (percentile clipping of outlier units)")
    steps.append("method=layerwise (per-layer rates clamped by min_pruning_rate/max_pruning_rate, "
                 "defaults 0.15/0.5)")
    if only_blocks and not settings.get("temperature"):
        balance = ("temperature=1 (moves each layer's attention/MLP split toward balance: a block, "
                   "not a whole layer, is over-pruned)")
        # Comparable scales across layers: the skew is between attention and MLP, fix that first.
        steps.insert(len(steps) if scale_skew else 0, balance)
    return "rerun with " + "; or ".join(steps)


def verdict(diag: Diagnosis, settings: dict) -> str:
    """One paragraph for the console: what happened, why, and what to set."""
    rows = {r.layer: r for r in diag.layers}
    scales = (f"per-layer gradient means differ by {diag.grad_mean_ratio:.3g}x (norms "
              f"{diag.grad_norm_ratio:.3g}x) and per-parameter Taylor importance by "
              f"{diag.mean_ratio:.3g}x across the pruned layers")
    if diag.extreme_pruning_layers:
        names = ", ".join(f"{i} (attention {rows[i].pruned_attn_frac:.0%}, MLP "
                          f"{rows[i].pruned_mlp_frac:.0%}, layer {rows[i].pruned_frac:.0%})"
                          for i in diag.extreme_pruning_layers)
        cause = ("a single ranking across layers removes the units of low-score layers first"
                 if diag.method not in ("layerwise", "blockwise")
                 else "the rate allocation allowed it")
        return (f"Gradient diagnosis: EXTREME PRUNING in {len(diag.extreme_pruning_layers)} of "
                f"{len(rows)} layers (more than {EXTREME_THRESHOLD:.0%} of the layer or of its "
                f"attention/MLP block removed): layer {names}. The {scales}; {cause}. "
                f"Suggested remedy: {remedy(diag, settings)}.")
    worst = max(diag.layers, key=lambda r: r.pruned_frac)
    note = ""
    if max(diag.grad_mean_ratio, diag.mean_ratio) > RATIO_WARN and \
            settings.get("normalization", "none") == "none" and diag.method == "taylor":
        note = " Scales this far apart can still skew the ranking; compare with normalization=log."
    return (f"Gradient diagnosis: no layer lost more than {EXTREME_THRESHOLD:.0%} of its parameters "
            f"(most pruned: layer {worst.layer}, {worst.pruned_frac:.0%}); {scales}. "
            f"No remedy needed.{note}")


def diagnosis_figure(diag: Diagnosis, title: str, rates: list | None = None):
    """Two panels: pruned fractions per layer (with target rates) and gradient scales (log)."""
    from gqaprune.plots import legend_outside, plt, set_title
    rows = diag.layers
    x = [r.layer for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.45 * len(rows) + 2), 6), sharex=True)
    width = 0.27
    for k, (key, label) in enumerate((("pruned_attn_frac", "attention"), ("pruned_mlp_frac", "MLP"),
                                      ("pruned_frac", "layer"))):
        top.bar([v + (k - 1) * width for v in x], [getattr(r, key) for r in rows], width, label=label)
    for r in rates or []:
        off = {"attn": -width, "mlp": 0.0, "layer": width}[r.block]
        top.plot([r.layer + off], [r.target_rate], "k_", markersize=12)
    top.axhline(EXTREME_THRESHOLD, color="red", linestyle="--", linewidth=1, label="extreme (90%)")
    top.set_ylim(0, 1)
    top.set_ylabel("fraction pruned")
    legend_outside(top, fontsize=7)
    set_title(top, title)
    bottom.semilogy(x, [max(r.grad_norm, 1e-30) for r in rows], "o-", label="grad norm")
    bottom.semilogy(x, [max(r.grad_mean, 1e-30) for r in rows], "s-", label="grad mean |g|")
    bottom.semilogy(x, [max(r.mean_importance, 1e-30) for r in rows], "^-", label="Taylor score / param")
    bottom.set_xlabel("decoder layer")
    bottom.set_ylabel("scale (log)")
    bottom.set_xticks(x)
    legend_outside(bottom, fontsize=7)
    fig.tight_layout()
    return fig


def rates_figure(rows: list, title: str):
    """Importance per layer/block (bars) and target vs achieved pruning rate (markers)."""
    from gqaprune.plots import legend_outside, plt, set_title
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.45 * len(rows) + 2), 5.5), sharex=True)
    blocks = sorted({r.block for r in rows})
    width = 0.8 / len(blocks)
    for k, blk in enumerate(blocks):
        sel = [r for r in rows if r.block == blk]
        xs = [r.layer + (k - (len(blocks) - 1) / 2) * width for r in sel]
        top.bar(xs, [r.importance for r in sel], width, label=blk)
        bottom.bar(xs, [r.achieved_rate for r in sel], width, label=f"{blk} achieved", alpha=0.7)
        bottom.plot(xs, [r.target_rate for r in sel], "k_", markersize=14)
    top.set_ylabel("importance (removal: nats/token)", fontsize=8)
    set_title(top, title)
    legend_outside(top, fontsize=7)
    bottom.set_ylabel("pruning rate (bar) / target (-)")
    bottom.set_xlabel("decoder layer")
    bottom.set_ylim(0, 1)
    bottom.set_xticks(sorted({r.layer for r in rows}))
    legend_outside(bottom, fontsize=7)
    fig.tight_layout()
    return fig
