"""Mask-preserving merge: a sparse model keeps its zero pattern through LoRA fine-tuning.

LoRA trains a dense update B A beside every frozen weight W, and the merge writes
W' = W + (lora_alpha / lora_r) B A, which is dense again: a Wanda / SparseGPT / magnitude
sparsified model would silently lose its sparsity. So the zero pattern of the projection weights
is taken *before* LoRA is attached (``sparsity.weight_masks``: bool [rows, cols] per matrix, 1 byte
per weight, on CPU) and re-applied *after* the merge (``sparsity.apply_masks``): the saved model
is M ⊙ W', with exactly the zeros it came with (the kept weights hold their fine-tuned values).

When (``keep_mask``):
  * ``auto`` (default) - when the model is sparse: at least one projection weight matrix has
    ``MIN_ZERO_SHARE`` (1%) or more exact zeros. Trained dense weights and structurally pruned
    ones (sliced, not zeroed) have essentially no exact zeros, so dense models merge as before,
    while any sparsified matrix (every sparsity method removes far more than 1%) is detected.
  * ``true`` - always take and re-apply the pattern (a dense model keeps its exact zeros, if any);
  * ``false`` - never: the plain dense merge.

Which weights count: the 7 projection matrices (q, k, v, o, gate, up, down) of every decoder
layer (``gqaprune.sparsity.WEIGHTS_COUNTED``); biases, embeddings, lm_head and norms are not
masked. Training itself is unchanged: the adapter learns on the sparse base with a dense update;
the losses logged during training are those of the unmasked adapted model, so the validation loss
of the masked merged model is measured separately when the mask changed weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gqaprune.config import Section, knob
from gqaprune.finetune.lora import merge
from gqaprune.sparsity.masks import apply_masks, measure, overall_sparsity, weight_masks

AUTO, ALWAYS, NEVER = "auto", "true", "false"
KEEP_MASK_CHOICES = (AUTO, ALWAYS, NEVER)
MIN_ZERO_SHARE = 0.01   # auto: a projection matrix with this share of exact zeros makes the model sparse


@dataclass(frozen=True)
class MaskConfig(Section):
    """sparse models: keep the zero pattern of the projection weights across the LoRA merge"""
    # (no percent sign in help texts: argparse formats them with %)
    keep_mask: str = knob(AUTO, f"auto: when a share >= {MIN_ZERO_SHARE:g} of some projection weight matrix "
                          "is exactly zero (a sparsified model); true: always; false: plain dense merge",
                          choices=KEEP_MASK_CHOICES)

    def __post_init__(self):
        object.__setattr__(self, "keep_mask", str(self.keep_mask).lower())
        super().__post_init__()


@dataclass
class ZeroPattern:
    """The base model's zeros, measured before LoRA; ``masks`` is None when they are not kept."""
    sparsity: float                            # zeros / weights over the counted matrices
    max_share: float                           # the largest zero share of one matrix
    masks: dict[str, torch.Tensor] | None      # {"<layer>.<block>.<proj>": bool [rows, cols]}
    reason: str                                # why the pattern is (not) kept, for the log

    @property
    def kept(self) -> bool:
        return self.masks is not None


def zero_pattern(model: nn.Module, keep_mask: str = AUTO) -> ZeroPattern:
    """Measure the zeros of ``model``'s projections and take their masks if ``keep_mask`` says so."""
    rows = measure(model)
    sparsity = overall_sparsity(rows)
    share = max((r.sparsity for r in rows), default=0.0)
    sparse = share >= MIN_ZERO_SHARE
    if keep_mask == NEVER:
        keep, reason = False, "keep_mask false: plain dense merge"
    elif keep_mask == ALWAYS:
        keep, reason = True, "keep_mask true"
    else:
        keep = sparse
        reason = (f"sparse model (a projection matrix has {share:.1%} zeros >= {MIN_ZERO_SHARE:.0%})" if sparse
                  else f"dense model (at most {share:.2%} zeros per projection matrix < {MIN_ZERO_SHARE:.0%})")
    return ZeroPattern(sparsity, share, weight_masks(model) if keep else None, reason)


@dataclass(frozen=True)
class MaskInfo:
    """What the merge did with the zero pattern (logged)."""
    kept: bool
    reason: str
    sparsity_before: float     # zeros / weights of the counted matrices before LoRA
    sparsity_after: float      # ... of the merged model that is saved
    rezeroed: int              # weights the merge made non-zero that the mask set back to zero


def merge_keeping_zeros(peft_model, pattern: ZeroPattern) -> tuple[nn.Module, MaskInfo]:
    """``merge`` (W + s B A), then the pattern's masks re-applied when it keeps them."""
    merged = merge(peft_model)
    rezeroed = apply_masks(merged, pattern.masks) if pattern.kept else 0
    after = overall_sparsity(measure(merged))
    return merged, MaskInfo(pattern.kept, pattern.reason, pattern.sparsity, after, rezeroed)
