"""Structured OBS on one linear projection: statistics, refit, greedy removal of column groups.

For a projection y = W x (W [H, k], x [k]) and calibration tokens X [n, k] with targets Y [n, H]:

    H     = X^T X + lam I,   lam = damping * mean(diag(X^T X))        (the damped Hessian, [k, k])
    J(W)  = ||X W^T - Y||^2 + lam ||W - W0||^2                        (ridge towards W0)
    W*    = argmin J = (X^T Y + lam W0^T)^T H^-1                      (the refit of all columns)

J(W) = J(W*) + tr((W - W*) H (W - W*)^T), so removing the columns S (W_S = 0) and re-fitting the
rest optimally costs the OBS error (ZipLM / Optimal Brain Surgeon for column groups)

    err(S) = tr(W_S ((H^-1)_SS)^-1 W_S^T)
    W      <- W - W_S ((H^-1)_SS)^-1 (H^-1)_S.        (the compensation of the kept columns)
    H^-1   <- H^-1 - (H^-1)_.S ((H^-1)_SS)^-1 (H^-1)_S.  (the inverse of H restricted to the rest)

Every step is exact, so a sequence of removals costs the sum of its errors and leaves exactly the
ridge refit on the kept columns (:func:`refit_kept`, used for the weights actually written, so
that the result depends only on the kept set and replays bit-exact).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class GramStats:
    """Running statistics of Y ~ X W^T, never storing X: xtx [k, k], xty [k, H], yy, n.

    Chunk products and sums run in ``dtype`` (float32 by default: half the memory of float64;
    float64 for ill-conditioned inputs or exact tests).
    """

    def __init__(self, k: int, h: int | None, dtype: torch.dtype, device):
        self.dtype = dtype
        self.xtx = torch.zeros(k, k, dtype=dtype, device=device)
        self.xty = torch.zeros(k, h, dtype=dtype, device=device) if h is not None else None
        self.yy = 0.0
        self.n = 0

    def add(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """x [..., k], y [..., H] (leading dims flattened to tokens)."""
        x = x.reshape(-1, x.shape[-1]).to(self.xtx.device, self.dtype)           # [n, k]
        self.xtx += x.T @ x
        if y is not None:
            y = y.reshape(-1, y.shape[-1]).to(self.xtx.device, self.dtype)       # [n, H]
            self.xty += x.T @ y
            self.yy += float(y.double().square().sum())
        self.n += x.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.xtx, self.xty) if t is not None)

    def lam(self, damping: float) -> float:
        """The ridge lam = damping * mean(diag X^T X)."""
        return damping * float(self.xtx.diagonal().double().mean())

    def sq_error(self, w: torch.Tensor, cols: torch.Tensor | None = None) -> float:
        """||X_cols W^T - Y||^2 from the statistics (w [H, len(cols)], float64; cols None: all)."""
        xtx, xty = self.xtx.double(), self.xty.double()
        if cols is not None:
            xtx, xty = xtx[cols][:, cols], xty[cols]
        return max(float((w @ xtx * w).sum() - 2 * (w * xty.T).sum() + self.yy), 0.0)

    def rel_error(self, w: torch.Tensor, cols: torch.Tensor | None = None) -> float:
        return math.sqrt(self.sq_error(w, cols) / max(self.yy, 1e-300))


def factor(xtx: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """Cholesky factor of X^T X + lam I (float64) and the lam used: a singular system (a zero or
    duplicated column with damping 0) is retried with lam raised to 1e-12 * max(diag), then x10;
    all-zero statistics use lam = 1 (W* = W0)."""
    a = xtx.double()
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    top = float(a.diagonal().abs().max()) if a.numel() else 0.0
    if top == 0:
        lam = max(lam, 1.0)
    while True:
        chol, info = torch.linalg.cholesky_ex(a + lam * eye)
        if int(info) == 0:
            return chol, lam
        lam = max(10 * lam, 1e-12 * top)


def refit_kept(stats: GramStats, w0: torch.Tensor, kept: torch.Tensor, damping: float) -> torch.Tensor:
    """Ridge refit of the kept columns: (X_K^T X_K + lam I) W_K^T = X_K^T Y + lam W0_K^T.

    w0 [H, k] (the current weights, any dtype), kept: column indices. Returns W_K [H, |K|] float64.
    lam comes from the full statistics, as in the OBS steps, so this equals their end point
    (unless a singular system needed more ridge, see :func:`factor`).
    """
    chol, lam = factor(stats.xtx[kept][:, kept], stats.lam(damping))
    rhs = stats.xty[kept].double() + lam * w0.double()[:, kept].T                # [|K|, H]
    return torch.cholesky_solve(rhs, chol).T


@dataclass
class Removal:
    """One greedy step: the unit removed and the exact increase of J."""
    kind: str
    index: int
    error: float
    cost: int


class ObsProjection:
    """Greedy structured OBS on W [H, k] whose columns form ``n`` equal contiguous groups.

    Keeps W (the compensated weights so far) and H^-1 restricted to the kept columns (zero rows
    and columns for removed ones), both in ``dtype``.
    """

    def __init__(self, stats: GramStats, w0: torch.Tensor, group_width: int, damping: float,
                 dtype: torch.dtype = torch.float64, refit: bool = True):
        k = stats.xtx.shape[0]
        if k % group_width:
            raise ValueError(f"{k} columns do not split into groups of {group_width}")
        self.width, self.n = group_width, k // group_width
        chol, lam = factor(stats.xtx, stats.lam(damping))
        hinv = torch.cholesky_inverse(chol)                                       # [k, k] float64
        w = w0.double()
        if refit:                                   # W* = (X^T Y + lam W0^T)^T H^-1
            w = (hinv @ (stats.xty.double() + lam * w.T)).T
        self.w = w.to(dtype)                                                       # [H, k]
        self.hinv = hinv.to(dtype)
        self.alive = torch.ones(self.n, dtype=torch.bool)
        self._errors: torch.Tensor | None = None

    def errors(self) -> torch.Tensor:
        """err(S_j) for every group j ([n] float64; +inf for removed groups), cached until the
        next removal."""
        if self._errors is None:
            self._errors = self._compute_errors()
        return self._errors

    def _compute_errors(self) -> torch.Tensor:
        s, n = self.width, self.n
        out = torch.full((n,), math.inf, dtype=torch.float64)
        idx = self.alive.nonzero().flatten()
        if idx.numel() == 0:
            return out
        if s == 1:
            diag = self.hinv.diagonal()[idx]
            err = self.w[:, idx].square().sum(0) / diag
        else:
            blocks = self.hinv.view(n, s, n, s)[idx, :, idx, :]                     # [m, s, s]
            ws = self.w.view(-1, n, s)[:, idx, :].permute(1, 2, 0)                # [m, s, H]
            chol, _ = torch.linalg.cholesky_ex(blocks)
            z = torch.linalg.solve_triangular(chol, ws, upper=False)               # L^-1 W_S^T
            err = z.square().sum((1, 2))
        out[idx] = err.double().clamp_min(0)
        return out

    def cols(self, j: int) -> slice:
        return slice(j * self.width, (j + 1) * self.width)

    def remove(self, j: int) -> None:
        """Remove group j and compensate the kept columns (module docstring)."""
        S = self.cols(j)
        block = self.hinv[S, S]                                                    # [s, s]
        rows = self.hinv[S, :]                                                     # [s, k]
        coef = torch.linalg.solve(block, rows)                                     # ((H^-1)_SS)^-1 (H^-1)_S.
        self.w -= self.w[:, S] @ coef
        self.hinv -= self.hinv[:, S] @ coef
        self.w[:, S] = 0
        self.hinv[S, :] = 0
        self.hinv[:, S] = 0
        self.alive[j] = False
        self._errors = None

    def nbytes(self) -> int:
        return self.w.numel() * self.w.element_size() + self.hinv.numel() * self.hinv.element_size()

    def kept_groups(self) -> list[int]:
        return self.alive.nonzero().flatten().tolist()


def greedy_remove(projs: dict[str, ObsProjection], costs: dict[str, int], budget: float) -> list[Removal]:
    """Remove, one at a time, the unit with the least OBS error per parameter that still fits.

    projs: kind -> projection ("attn": KV groups of o_proj, "mlp": channels of down_proj);
    costs: parameters removed with one unit of each kind. A unit fits while removed + cost / 2
    <= budget, so the total ends within half of the smallest unit of the budget (when the budget
    is reachable); every kind keeps at least one unit. Ties break by kind, then index.
    """
    steps: list[Removal] = []
    done = 0.0
    while True:
        best = None
        for kind in sorted(projs):
            p = projs[kind]
            if int(p.alive.sum()) <= 1 or done + costs[kind] / 2 > budget:
                continue
            err = p.errors()
            j = int(torch.argmin(err))
            key = float(err[j]) / costs[kind]
            if best is None or key < best[0]:
                best = (key, kind, j, float(err[j]))
        if best is None:
            return steps
        _, kind, j, err = best
        projs[kind].remove(j)
        done += costs[kind]
        steps.append(Removal(kind, j, err, costs[kind]))
