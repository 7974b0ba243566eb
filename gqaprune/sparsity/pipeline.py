"""The one entry: ``sparsify(model, calibration_ids, config) -> SparsityOutcome``.

Flow (weights are zeroed in place; the model stays a normal dense Hugging Face model):

1. ``config.validate(model)``; calibration windows are required unless the method is
   magnitude_unstructured without OWL.
2. OWL (optional): one walk over the *dense* model gives every layer's outlier ratio, hence the
   per-layer rates (``owl.py``); otherwise every layer gets the target.
3. magnitude_unstructured: |W| per row, no calibration. Otherwise one walk with
   ``gqaprune.calibrate.LayerWalker`` over the model as sparsified so far: for layer l, one
   hooked pass of the calibration set through the (still dense) layer accumulates its
   statistics (``stats.py``: ||X_j||^2, plus H = X^T X for sparsegpt), the 7 projections are
   pruned, and the walker advances the calibration set through the pruned layer. Memory: one
   layer's inputs (and its outputs while advancing) plus one layer's statistics, never every
   layer's activations.
4. The zeros are measured from the weights (``masks.measure``), with the N:M check.
"""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from gqaprune import arch
from gqaprune.calibrate import LayerWalker
from gqaprune.errors import UserError
from gqaprune.sparsity import masks as mk
from gqaprune.sparsity import owl as owl_mod
from gqaprune.sparsity.config import SparsityConfig
from gqaprune.sparsity.outcome import CalibrationReport, SparsityOutcome, TierCount, Timings
from gqaprune.sparsity.scores import magnitude_scores, wanda_scores
from gqaprune.sparsity.sparsegpt import sparsegpt_prune
from gqaprune.sparsity.stats import LayerStats, collect


class _Meter:
    """Calibration passes and the largest statistics / activations held at once."""

    def __init__(self):
        self.passes, self.stats_bytes, self.act_bytes = 0, 0, 0

    def step(self, step, stats: LayerStats, passes: int) -> None:
        self.passes += passes
        self.stats_bytes = max(self.stats_bytes, stats.nbytes)
        self.act_bytes = max(self.act_bytes, sum(h.numel() * h.element_size() for h in step.inputs))


def _keep_mask(scores: torch.Tensor, rate: float, nm) -> torch.Tensor:
    return mk.nm_mask(scores, *nm) if nm else mk.unstructured_row_mask(scores, rate)


@torch.no_grad()
def prune_layer(layer, index: int, stats: LayerStats | None, rate: float,
                config: SparsityConfig) -> tuple[list[TierCount], float | None]:
    """Prune the 7 projections of one decoder layer in place at ``rate`` (weights' own dtype)."""
    nm, tiers, damping = config.nm, [], None
    for name, lin in arch.named_linears(layer):
        w = lin.weight
        if config.method == "magnitude_unstructured":
            keep = _keep_mask(magnitude_scores(w), rate, nm)
        elif config.method == "wanda":
            keep = _keep_mask(wanda_scores(w, stats.col_sq_of(name)), rate, nm)
        elif config.method == "block_hybrid":
            keep, tile = mk.block_hybrid_mask(wanda_scores(w, stats.col_sq_of(name)), config.block_size,
                                              config.tier_fractions, *nm)
            counts = torch.bincount(tile.flatten(), minlength=3).tolist()
            tiers.append(TierCount(index, name, *counts))
        else:  # sparsegpt
            res = sparsegpt_prune(w, stats.hessian_of(name), rate, nm, config.sparsegpt_blocksize,
                                  config.damping, getattr(torch, config.hessian_dtype),
                                  config.sparsegpt_selection)
            w.copy_(res.weight)
            keep, damping = res.keep, max(damping or 0.0, res.damping)
        w.masked_fill_(~keep.to(w.device), 0)
    return tiers, damping


def _check_inputs(model, ids, config: SparsityConfig, batch_size: int) -> None:
    arch.check_architecture(model)
    config.validate(model)
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}", "pass a positive batch_size")
    if config.needs_calibration:
        if ids is None:
            what = config.method + (" with owl" if config.owl else "")
            raise UserError(f"{what} needs calibration token windows",
                            "pass calibration_ids [N, T] (gqaprune.data.calibration_batches)")
        if ids.dim() != 2 or ids.dtype != torch.long:
            raise UserError(f"calibration_ids must be a LongTensor [N, T], got {ids.dtype} {tuple(ids.shape)}",
                            "pass token windows from gqaprune.data.calibration_batches")


def sparsify(model, calibration_ids: torch.Tensor | None, config: SparsityConfig, batch_size: int = 4,
             progress: bool = True) -> SparsityOutcome:
    """Sparsify ``model`` in place (see the module docstring) and report what was done."""
    t_start = time.perf_counter()
    _check_inputs(model, calibration_ids, config, batch_size)
    layers = arch.decoder_layers(model)
    target, meter, owl_result = config.target_sparsity(), _Meter(), None
    rates = [target] * len(layers)
    if config.owl:
        ratios = owl_mod.layer_outlier_ratios(model, calibration_ids, config.owl_m, batch_size, progress,
                                              on_step=lambda step, stats: meter.step(step, stats, 1))
        sizes = [sum(lin.weight.numel() for _, lin in arch.named_linears(layer)) for layer in layers]
        rates = owl_mod.owl_rates(ratios, target, config.owl_lambda, sizes)
        owl_result = owl_mod.OwlResult(tuple(ratios), tuple(rates), tuple(sizes), target,
                                       config.owl_lambda, config.owl_m)
    t_owl = time.perf_counter() - t_start
    tiers, damping, t_stats, t_prune = [], None, 0.0, 0.0

    def run(layer, index, stats):
        nonlocal damping, t_prune
        t0 = time.perf_counter()
        layer_tiers, layer_damping = prune_layer(layer, index, stats, rates[index], config)
        tiers.extend(layer_tiers)
        if layer_damping is not None:
            damping = max(damping or 0.0, layer_damping)
        t_prune += time.perf_counter() - t0

    if config.method == "magnitude_unstructured":
        for i, layer in enumerate(tqdm(layers, desc="magnitude", leave=False, disable=not progress)):
            run(layer, i, None)
    else:
        hessian = config.method == "sparsegpt"
        walker = LayerWalker(model, calibration_ids, batch_size, progress=progress, desc=config.method)
        for step in walker:
            t0 = time.perf_counter()
            stats, _ = collect(step.layer, step.inputs, step.kwargs, hessian, getattr(torch, config.hessian_dtype))
            t_stats += time.perf_counter() - t0
            meter.step(step, stats, 2)           # statistics pass + the walker's advance pass
            run(step.layer, step.index, stats)
            del stats
    return _outcome(model, config, target, rates, owl_result, tiers, damping, meter, calibration_ids,
                    Timings(time.perf_counter() - t_start, t_owl, t_stats, t_prune,
                            time.perf_counter() - t_start - t_owl - t_stats - t_prune))


def _outcome(model, config, target, rates, owl_result, tiers, damping, meter, ids, timings) -> SparsityOutcome:
    rows = mk.measure(model, dict(enumerate(rates)))
    nm = config.nm
    calibration = None
    if config.needs_calibration:
        calibration = CalibrationReport(int(ids.shape[0]), int(ids.shape[1]), meter.passes,
                                        len(rates), meter.stats_bytes, meter.act_bytes,
                                        meter.act_bytes * len(rates))
    return SparsityOutcome(
        config=config, target=target, layer_rates=tuple(rates), projections=tuple(rows),
        overall_sparsity=mk.overall_sparsity(rows), counted_weights=sum(r.total for r in rows),
        zero_weights=sum(r.zeros for r in rows), owl=owl_result,
        nm_check=mk.nm_check(model, *nm) if nm and config.method != "block_hybrid" else None,
        tiers=tuple(tiers), max_damping=damping, calibration=calibration, timings=timings)
