"""Floor 3: unstructured and semi-structured sparsity (Wanda, SparseGPT, magnitude, N:M, the
block three-tier hybrid, OWL layer rates). Masks zero weights in place; the model stays dense.

Public API:
    SparsityConfig                                   settings (validated, help text per field)
    sparsify(model, calibration_ids, config, batch_size=4, progress=True) -> SparsityOutcome
    measure(model) / overall_sparsity(rows) / nm_check(model, n, m)    sparsity of any model
    weight_masks(model) / apply_masks(model, masks)  keep a zero pattern across LoRA merges
    save_compressed(...)                             compressed-tensors export (see compressed.py)
"""
from gqaprune.sparsity.compressed import save_compressed
from gqaprune.sparsity.config import METHODS, SparsityConfig, parse_pattern
from gqaprune.sparsity.masks import (NMCheck, ProjectionSparsity, apply_masks, measure, nm_check,
                                     overall_sparsity, weight_masks)
from gqaprune.sparsity.outcome import WEIGHTS_COUNTED, SparsityOutcome, sparsity_figure
from gqaprune.sparsity.pipeline import sparsify

__all__ = ["METHODS", "SparsityConfig", "parse_pattern", "NMCheck", "ProjectionSparsity", "apply_masks",
           "measure", "nm_check", "overall_sparsity", "weight_masks", "WEIGHTS_COUNTED",
           "SparsityOutcome", "sparsity_figure", "sparsify", "save_compressed"]
