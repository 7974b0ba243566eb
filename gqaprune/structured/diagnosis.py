"""Gradient diagnosis of a Taylor-based plan: are some layers over-pruned because of gradient scale?

For every pruned layer l (projection weights only):

    grad_norm_l       = ||g_l||_2                   g = gradients summed over calibration batches
    grad_mean_l       = mean |g_l|
    mean_importance_l = sum_u score_u^power / P_l   (per-parameter Taylor importance of the layer)

and, over the pruned layers (a ratio max / min, with min floored at 1e-12 * max so that a layer
with zero gradient reads as 1e12 instead of infinity):

    grad_norm_ratio = ratio of grad_norm_l,  grad_mean_ratio = ratio of grad_mean_l,
    mean_ratio      = ratio of mean_importance_l   (what a global ranking actually compares)

A layer is an *extreme pruning layer* when it, or its attention or its MLP block, lost more than
90% of its parameters. The verdict names those layers and the parameter that fixes it.
"""
from __future__ import annotations

from gqaprune.structured.importance import UnitScores
from gqaprune.structured.plan import PruningPlan

EXTREME_THRESHOLD = 0.9
RATIO_WARN = 100.0     # gradient scales this far apart are worth a note even without extremes
_CAP = 1e12


def scale_ratio(values: list[float]) -> float:
    top = max(values) if values else 0.0
    if top <= 0:
        return 1.0
    return top / max(min(values), top / _CAP)


def diagnose(plan: PruningPlan, scores: UnitScores | None, layers: range | None = None) -> dict | None:
    """Diagnosis dict (JSON-ready), or None when the scores carry no gradient statistics."""
    stats = (scores.extras or {}).get("gradient_stats") if scores is not None else None
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
        pruned = {"pruned_frac": r["pruned_frac"], "pruned_attn_frac": 1 - r["kept_attn_frac"],
                  "pruned_mlp_frac": 1 - r["kept_mlp_frac"]}
        rows.append({"layer": i, "grad_norm": stats[i]["grad_norm"], "grad_mean": stats[i]["grad_mean"],
                     "mean_importance": total / s.params, **pruned,
                     "extreme": max(pruned.values()) > EXTREME_THRESHOLD})
    extreme = [r["layer"] for r in rows if r["extreme"]]
    return {"threshold": EXTREME_THRESHOLD, "method": plan.method, "layers": rows,
            "grad_norm_ratio": scale_ratio([r["grad_norm"] for r in rows]),
            "grad_mean_ratio": scale_ratio([r["grad_mean"] for r in rows]),
            "mean_ratio": scale_ratio([r["mean_importance"] for r in rows]),
            "extreme_pruning_layers": extreme, "num_extreme_pruning_layers": len(extreme)}


def remedy(diag: dict, settings: dict) -> str:
    """Which parameter to set, given the method and the conditioning already in use."""
    method = diag["method"]
    if method in ("layerwise", "blockwise"):
        return (f"lower max_pruning_rate (now {settings.get('max_pruning_rate')}) so that no "
                f"{'block' if method == 'blockwise' else 'layer'} can lose that much, or lower alpha "
                f"(now {settings.get('alpha')}) to spread the rates less")
    only_blocks = all(r["pruned_frac"] <= EXTREME_THRESHOLD for r in diag["layers"] if r["extreme"])
    scale_skew = max(diag["grad_mean_ratio"], diag["mean_ratio"]) > RATIO_WARN
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


def verdict(diag: dict, settings: dict) -> str:
    """One paragraph for the console: what happened, why, and what to set."""
    rows = {r["layer"]: r for r in diag["layers"]}
    scales = (f"per-layer gradient means differ by {diag['grad_mean_ratio']:.3g}x (norms "
              f"{diag['grad_norm_ratio']:.3g}x) and per-parameter Taylor importance by "
              f"{diag['mean_ratio']:.3g}x across the pruned layers")
    if diag["extreme_pruning_layers"]:
        names = ", ".join(f"{i} (attention {rows[i]['pruned_attn_frac']:.0%}, MLP "
                          f"{rows[i]['pruned_mlp_frac']:.0%}, layer {rows[i]['pruned_frac']:.0%})"
                          for i in diag["extreme_pruning_layers"])
        cause = ("a single ranking across layers removes the units of low-score layers first"
                 if diag["method"] not in ("layerwise", "blockwise")
                 else "the rate allocation allowed it")
        return (f"Gradient diagnosis: EXTREME PRUNING in {len(diag['extreme_pruning_layers'])} of "
                f"{len(rows)} layers (more than {EXTREME_THRESHOLD:.0%} of the layer or of its "
                f"attention/MLP block removed): layer {names}. The {scales}; {cause}. "
                f"Suggested remedy: {remedy(diag, settings)}.")
    worst = max(diag["layers"], key=lambda r: r["pruned_frac"])
    note = ""
    if max(diag["grad_mean_ratio"], diag["mean_ratio"]) > RATIO_WARN and \
            settings.get("normalization", "none") == "none" and diag["method"] == "taylor":
        note = " Scales this far apart can still skew the ranking; compare with normalization=log."
    return (f"Gradient diagnosis: no layer lost more than {EXTREME_THRESHOLD:.0%} of its parameters "
            f"(most pruned: layer {worst['layer']}, {worst['pruned_frac']:.0%}); {scales}. "
            f"No remedy needed.{note}")


def diagnosis_figure(diag: dict, title: str, rates: list[dict] | None = None):
    """Two panels: pruned fractions per layer (with target rates) and gradient scales (log)."""
    from gqaprune.plots import plt
    rows = diag["layers"]
    x = [r["layer"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.45 * len(rows) + 2), 6), sharex=True)
    width = 0.27
    for k, (key, label) in enumerate((("pruned_attn_frac", "attention"), ("pruned_mlp_frac", "MLP"),
                                      ("pruned_frac", "layer"))):
        top.bar([v + (k - 1) * width for v in x], [r[key] for r in rows], width, label=label)
    for r in rates or []:
        off = {"attn": -width, "mlp": 0.0, "layer": width}[r["block"]]
        top.plot([r["layer"] + off], [r["target_rate"]], "k_", markersize=12)
    top.axhline(EXTREME_THRESHOLD, color="red", linestyle="--", linewidth=1, label="extreme (90%)")
    top.set_ylim(0, 1)
    top.set_ylabel("fraction pruned")
    top.legend(fontsize=7, ncol=4)
    top.set_title(title, fontsize=10)
    bottom.semilogy(x, [max(r["grad_norm"], 1e-30) for r in rows], "o-", label="grad norm")
    bottom.semilogy(x, [max(r["grad_mean"], 1e-30) for r in rows], "s-", label="grad mean |g|")
    bottom.semilogy(x, [max(r["mean_importance"], 1e-30) for r in rows], "^-", label="Taylor score / param")
    bottom.set_xlabel("decoder layer")
    bottom.set_ylabel("scale (log)")
    bottom.set_xticks(x)
    bottom.legend(fontsize=7)
    fig.tight_layout()
    return fig


def rates_figure(rows: list[dict], title: str):
    """Importance per layer/block (bars) and target vs achieved pruning rate (markers)."""
    from gqaprune.plots import plt
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.45 * len(rows) + 2), 5.5), sharex=True)
    blocks = sorted({r["block"] for r in rows})
    width = 0.8 / len(blocks)
    for k, blk in enumerate(blocks):
        sel = [r for r in rows if r["block"] == blk]
        xs = [r["layer"] + (k - (len(blocks) - 1) / 2) * width for r in sel]
        top.bar(xs, [r["importance"] for r in sel], width, label=blk)
        bottom.bar(xs, [r["achieved_rate"] for r in sel], width, label=f"{blk} achieved", alpha=0.7)
        bottom.plot(xs, [r["target_rate"] for r in sel], "k_", markersize=14)
    top.set_ylabel("importance (removal: nats/token)", fontsize=8)
    top.set_title(title, fontsize=10)
    top.legend(fontsize=7)
    bottom.set_ylabel("pruning rate (bar) / target (-)")
    bottom.set_xlabel("decoder layer")
    bottom.set_ylim(0, 1)
    bottom.set_xticks(sorted({r["layer"] for r in rows}))
    bottom.legend(fontsize=7)
    fig.tight_layout()
    return fig
