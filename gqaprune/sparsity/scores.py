"""Importance scores of individual weights (higher = keep).

* ``magnitude``: |W_ij|.
* ``wanda`` (Sun et al. 2023): |W_ij| * ||X_j||_2, with X [tokens, in] the layer input over the
  calibration tokens, so ||X_j||_2 = sqrt(sum_t x_tj^2). Only the per-column sums of squares are
  accumulated (``col_sq`` [in]); their scale (sum vs. mean over tokens) does not change any
  ranking, since rows are compared within themselves.
"""
from __future__ import annotations

import torch


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] -> |W| in float32."""
    return weight.detach().float().abs()


def wanda_scores(weight: torch.Tensor, col_sq: torch.Tensor) -> torch.Tensor:
    """weight [out, in], col_sq [in] = sum_t x_tj^2 -> |W_ij| * ||X_j||_2 [out, in] in float32."""
    return weight.detach().float().abs() * col_sq.float().sqrt().to(weight.device)[None, :]
