"""What a sparsity run produced (typed), its table rows / flat metrics, and its figure.

Which weights count (``WEIGHTS_COUNTED``): the 7 projection weight matrices (q, k, v, o, gate,
up, down) of every decoder layer. Biases, embeddings, lm_head and norms are never pruned and are
not counted. Sparsity = exact zeros / weights, measured from the weights after pruning.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from gqaprune.plots import legend_outside, plt, set_title
from gqaprune.sparsity.config import SparsityConfig
from gqaprune.sparsity.masks import NMCheck, ProjectionSparsity
from gqaprune.sparsity.owl import OwlResult

WEIGHTS_COUNTED = ("the 7 projection weight matrices (q/k/v/o, gate/up/down) of every decoder "
                   "layer; biases, embeddings, lm_head and norms are never pruned nor counted")


@dataclass(frozen=True)
class TierCount:
    """block_hybrid: tiles of one matrix per tier."""
    layer: int
    projection: str
    dense: int
    nm: int
    removed: int

    @property
    def tiles(self) -> int:
        return self.dense + self.nm + self.removed


@dataclass(frozen=True)
class CalibrationReport:
    samples: int                      # calibration windows N
    seq_len: int                      # tokens per window T
    layer_passes: int                 # passes of the whole calibration set through one decoder layer
    n_layers: int
    peak_stats_bytes: int             # largest statistics held at once (one layer's)
    layer_activation_bytes: int       # one layer's inputs for the whole calibration set [N, T, H]
    all_layers_activation_bytes: int  # what holding every layer's inputs at once would take

    @property
    def forward_equivalents(self) -> float:
        """Layer passes in units of one calibration forward through the decoder stack."""
        return self.layer_passes / self.n_layers


@dataclass(frozen=True)
class Timings:
    total_s: float
    owl_s: float          # OWL outlier pass (0 without owl)
    statistics_s: float   # hooked statistics passes of the pruning walk
    prune_s: float        # masks, SparseGPT solves, zeroing
    walk_s: float         # the rest: capturing layer 0's inputs, advancing the pruned layers


@dataclass(frozen=True)
class SparsityOutcome:
    config: SparsityConfig
    target: float                           # model-level target sparsity
    layer_rates: tuple[float, ...]          # sparsity each layer was pruned at
    projections: tuple[ProjectionSparsity, ...]
    overall_sparsity: float                 # zeros / counted weights (WEIGHTS_COUNTED)
    counted_weights: int
    zero_weights: int
    owl: OwlResult | None
    nm_check: NMCheck | None                # N:M patterns of wanda / sparsegpt / magnitude
    tiers: tuple[TierCount, ...]            # block_hybrid only
    max_damping: float | None               # sparsegpt: largest relative damping used
    calibration: CalibrationReport | None   # None for magnitude without owl
    timings: Timings
    weights_counted: str = WEIGHTS_COUNTED

    # ---- tables --------------------------------------------------------------------------------
    def layer_rows(self) -> list[dict]:
        """One row per decoder layer: target, achieved (whole layer, attention, MLP), OWL ratio."""
        rows = []
        for i, rate in enumerate(self.layer_rates):
            mats = [p for p in self.projections if p.layer == i]
            frac = lambda ps: sum(p.zeros for p in ps) / max(1, sum(p.total for p in ps))  # noqa: E731
            rows.append({"layer": i, "target": rate, "sparsity": frac(mats),
                         "attn_sparsity": frac([p for p in mats if p.projection.startswith("self_attn")]),
                         "mlp_sparsity": frac([p for p in mats if p.projection.startswith("mlp")]),
                         "outlier_ratio": self.owl.outlier_ratios[i] if self.owl else None})
        return rows

    def projection_rows(self) -> list[dict]:
        tiers = {(t.layer, t.projection): t for t in self.tiers}
        rows = []
        for p in self.projections:
            row = {**asdict(p), "total": p.total, "sparsity": p.sparsity}
            if (p.layer, p.projection) in tiers:
                t = tiers[(p.layer, p.projection)]
                row.update(tiles_dense=t.dense, tiles_nm=t.nm, tiles_removed=t.removed)
            rows.append(row)
        return rows

    def metrics(self) -> dict[str, float]:
        """Flat numeric metrics (names without the run's prefix)."""
        out = {"target_sparsity": self.target, "overall_sparsity": self.overall_sparsity,
               "counted_weights": float(self.counted_weights), "zero_weights": float(self.zero_weights),
               "sparsify_time_s": self.timings.total_s, "owl_time_s": self.timings.owl_s,
               "statistics_time_s": self.timings.statistics_s, "prune_time_s": self.timings.prune_s}
        for row in self.layer_rows():
            out[f"layer_{row['layer']:02d}_sparsity"] = row["sparsity"]
            out[f"layer_{row['layer']:02d}_target"] = row["target"]
        if self.nm_check is not None:
            out.update(nm_groups=float(self.nm_check.groups), nm_violations=float(self.nm_check.violations))
        if self.calibration is not None:
            c = self.calibration
            out.update(calibration_layer_passes=float(c.layer_passes),
                       calibration_forward_equivalents=c.forward_equivalents,
                       peak_stats_mb=c.peak_stats_bytes / 2**20,
                       layer_activation_mb=c.layer_activation_bytes / 2**20,
                       all_layers_activation_mb=c.all_layers_activation_bytes / 2**20)
        if self.max_damping is not None:
            out["max_damping"] = self.max_damping
        return out

    def figure(self):
        return sparsity_figure(self)


def sparsity_figure(outcome: SparsityOutcome):
    """Grouped bars per layer (attention, MLP, whole layer) with each layer's target marked."""
    rows = outcome.layer_rows()
    layers = [r["layer"] for r in rows]
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows) + 2), 3.6))
    for k, (key, label) in enumerate((("attn_sparsity", "attention"), ("mlp_sparsity", "MLP"),
                                      ("sparsity", "layer"))):
        ax.bar([x + (k - 1) * width for x in layers], [r[key] for r in rows], width, label=label)
    ax.scatter(layers, [r["target"] for r in rows], marker="_", s=300, color="black", zorder=3,
               label="layer target")
    ax.axhline(outcome.target, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("fraction of weights zero")
    ax.set_ylim(0, 1)
    ax.set_xticks(layers)
    c = outcome.config
    set_title(ax, f"{c.method} {c.sparsity_pattern}{' + OWL' if c.owl else ''}: overall "
                  f"{outcome.overall_sparsity:.1%} of the projection weights")
    legend_outside(ax)
    fig.tight_layout()
    return fig
