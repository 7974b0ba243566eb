"""OWL (Yin et al. 2024): outlier-weighted layer-wise sparsity.

Layer outlier ratio (the paper's "layerwise outlier distribution"): over all Wanda scores
A_ij = |W_ij| * ||X_j||_2 of the layer's 7 projection matrices, the share of scores above
``owl_m`` x their mean (the mean over the whole layer). Layers with more outliers keep more
weights. Rates, as in the OWL reference code, with r_l the outlier ratios and s the target:

    kept_l = 2 lambda (r_l - min r) / (max r - min r)           (in [0, 2 lambda]; 0 if all equal)
    kept_l = kept_l - mean_w(kept) + (1 - s);   rate_l = 1 - kept_l

``mean_w`` is weighted by the layers' counted weights, so the parameter-weighted mean rate — the
model's overall sparsity before per-row rounding — equals s exactly (for equal layers it is the
plain mean of the reference code). Rates span exactly 2 lambda; a rate outside [0, 1) is refused.

The outlier ratios come from the dense model, layer by layer through the walker (one pass per
layer: the statistics pass also gives the layer's outputs), before any layer is pruned.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gqaprune import arch
from gqaprune.calibrate import LayerWalker
from gqaprune.errors import UserError
from gqaprune.sparsity.scores import wanda_scores
from gqaprune.sparsity.stats import collect


@dataclass(frozen=True)
class OwlResult:
    outlier_ratios: tuple[float, ...]     # per layer: share of scores > m x layer mean
    rates: tuple[float, ...]             # per-layer sparsity
    layer_weights: tuple[int, ...]        # counted weights per layer (weights of the mean)
    target: float
    owl_lambda: float
    owl_m: float


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Share of all entries of ``scores`` (one layer's matrices) above m x their joint mean."""
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.double().sum()) for s in scores) / total
    return sum(int((s > m * mean).sum()) for s in scores) / total


def owl_rates(ratios: list[float], target: float, owl_lambda: float,
              layer_weights: list[int] | None = None) -> list[float]:
    """Per-layer sparsity from outlier ratios (module docstring); weighted mean = ``target``."""
    r = torch.tensor(ratios, dtype=torch.float64)
    w = torch.tensor(layer_weights or [1] * len(ratios), dtype=torch.float64)
    span = r.max() - r.min()
    kept = (r - r.min()) / span * 2 * owl_lambda if span > 0 else torch.zeros_like(r)
    kept = kept - (kept * w).sum() / w.sum() + (1 - target)
    rates = (1 - kept).tolist()
    if min(rates) < 0 or max(rates) >= 1:
        raise UserError(f"OWL rates {min(rates):.3f}..{max(rates):.3f} leave [0, 1) for sparsity "
                        f"{target} with owl_lambda {owl_lambda}",
                        "use a smaller owl_lambda (rates span 2 x owl_lambda around the target)")
    return rates


def layer_outlier_ratios(model, ids: torch.Tensor, owl_m: float, batch_size: int,
                         progress: bool = True, on_step=None) -> list[float]:
    """Outlier ratio of every decoder layer of the (dense) model; ``on_step(step, stats)`` lets the
    caller account memory / passes."""
    ratios = []
    for step in LayerWalker(model, ids, batch_size, progress=progress, desc="owl outliers"):
        stats, outputs = collect(step.layer, step.inputs, step.kwargs)
        scores = [wanda_scores(lin.weight, stats.col_sq_of(name)) for name, lin in arch.named_linears(step.layer)]
        ratios.append(outlier_ratio(scores, owl_m))
        step.outputs = outputs          # the layer is unchanged: its statistics pass is the advance
        if on_step is not None:
            on_step(step, stats)
    return ratios
