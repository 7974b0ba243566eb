"""SparseGPT (Frantar & Alistarh 2023): prune one linear layer with inverse-Hessian updates.

Problem: given W [R, C] and H = X^T X / n [C, C] of the layer input, zero weights and update the
remaining ones so that ||W X^T - W_hat X^T|| stays small. The algorithm (as in the paper and its
reference code):

1. dead inputs (H_jj = 0) get H_jj = 1 (their weights never matter; they are pruned first);
   H += lambda I with lambda = damping * mean(diag H) (raised x10 while Cholesky fails);
2. U = upper Cholesky factor of H^-1; row j of U holds the OBS update coefficients of column j
   once columns < j are fixed;
3. columns are processed left to right in blocks of ``blocksize`` (lazy batch updates): at the
   start of a block its mask is chosen from the current (already updated) weights with the OBS
   cost w^2 / U_jj^2; then column by column: zero the pruned entries, err = (w - q) / U_jj,
   W[:, j:] -= err U[j, j:] inside the block; after the block, the accumulated errors update all
   later columns at once (W[:, i2:] -= Err U[i1:i2, i2:]).

Unstructured mask selection (``selection``):
* ``"block"`` (the paper's adaptive mask selection, default): at the start of block [i1, i2) the
  ``removed_count(R * i2, s) - removed_count(R * i1, s)`` lowest-cost entries of the whole
  block [R, i2 - i1] are removed (ties: row-major order), so rows get uneven sparsity but every
  matrix ends with exactly ``removed_count(R * C, s)`` zeros (the reference code thresholds with
  ``<=`` at index int(n s), one or more extra weights per block; the count here is exact);
* ``"row"``: Wanda's comparison group — row r removes ``removed_count(i2, s) -
  removed_count(i1, s)`` of the block's columns, so each row ends with exactly
  ``removed_count(C, s)`` zeros, the count Wanda and magnitude remove.
N:M: at each
group start (column j with j % M == 0) every row removes the M - N lowest-cost entries of
columns j..j+M-1 (costs from the weights updated so far) — exactly the reference rule.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gqaprune.errors import UserError
from gqaprune.sparsity.masks import removed_count

MAX_DAMPING = 1e3


@dataclass(frozen=True)
class SparseGPTResult:
    weight: torch.Tensor     # [R, C] updated weights (input dtype), zeros where pruned
    keep: torch.Tensor       # [R, C] bool
    damping: float           # relative damping actually used


def inverse_cholesky(H: torch.Tensor, damping: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damping * mean(diag H) I)^-1, and the damping used."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    scale = float(torch.diag(H).mean())
    rel = damping
    while rel <= MAX_DAMPING:
        L, info = torch.linalg.cholesky_ex(H + rel * scale * eye)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0:
                return U, rel
        rel = max(rel * 10, 1e-6)
    raise UserError("the calibration Hessian stays singular even with damping 1e3",
                    "use more calibration tokens or hessian_dtype=float64")


def _lowest(cost: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [R, k] of the k lowest costs per row (ties: lower column first)."""
    return torch.sort(cost, dim=1, stable=True).indices[:, :k]


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                    nm: tuple[int, int] | None = None, blocksize: int = 128, damping: float = 0.01,
                    dtype: torch.dtype = torch.float32, selection: str = "block") -> SparseGPTResult:
    """weight [R, C], hessian [C, C] (X^T X / n) -> pruned + updated weights (see module doc)."""
    W = weight.detach().to(dtype).clone()                                     # [R, C]
    H = hessian.to(device=W.device, dtype=dtype).clone()                       # [C, C]
    R, C = W.shape
    dead = torch.diag(H) == 0                                                  # [C]
    H[dead, dead] = 1
    U, used = inverse_cholesky(H, damping)                                     # [C, C] upper
    pruned = torch.zeros(R, C, dtype=torch.bool, device=W.device)
    for i1 in range(0, C, blocksize):
        i2 = min(i1 + blocksize, C)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]                         # [R, b], [b, b]
        d, dead1 = torch.diag(U1), dead[i1:i2]                                 # [b]
        P1 = pruned[:, i1:i2]                                                  # view [R, b]
        Err1 = torch.zeros_like(W1)
        if nm is None:
            cost = (W1 ** 2 / d[None, :] ** 2).masked_fill(dead1[None, :], -1.0)   # [R, b]
            if selection == "row":
                k = removed_count(i2, sparsity) - removed_count(i1, sparsity)
                P1.scatter_(1, _lowest(cost, k), True)
            else:
                k = removed_count(R * i2, sparsity) - removed_count(R * i1, sparsity)
                flat = torch.zeros(cost.numel(), dtype=torch.bool, device=W.device)
                flat[_lowest(cost.reshape(1, -1), k)[0]] = True
                P1 |= flat.reshape(cost.shape)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                g = slice(i, i + nm[1])
                cost = (W1[:, g] ** 2 / d[None, g] ** 2).masked_fill(dead1[None, g], -1.0)
                P1[:, g].scatter_(1, _lowest(cost, nm[1] - nm[0]), True)
            w = W1[:, i]
            q = w.masked_fill(P1[:, i], 0.0)
            err = (w - q) / d[i]                                               # [R]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    W.masked_fill_(pruned, 0.0)
    return SparseGPTResult(W.to(weight.dtype), ~pruned, used)
