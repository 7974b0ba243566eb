"""Keep-masks from scores, and the model-level mask helpers (measure, extract, re-apply).

Tensor-level rules (scores S [rows, cols], higher = more important; masks are ``True`` = kept):

* **unstructured, per output row** (Wanda's comparison group): each row removes exactly
  ``removed_count(cols, s)`` = the nearest integer to s * cols (halves round up) weights — its
  lowest scores; ties go by column index (the lower index is removed first: stable sort).
  So every row's sparsity is within 1 / (2 cols) of s, identical for all rows.
* **N:M**: each row is cut into groups of M consecutive input columns; each group keeps its N
  highest scores (ties: the lower column index is kept) and zeroes the other M - N.
* **block tiers** (block_hybrid): the matrix is tiled into B x B blocks; tile score = the sum of
  its scores. Tiles are ranked per matrix from the highest score down (ties: row-major tile
  order) and split at the cumulative boundaries c1 = r(f_dense * n), c2 = r((f_dense + f_nm) * n)
  (r = nearest integer, halves up; n = number of tiles): ranks [0, c1) stay dense, [c1, c2) are
  made N:M inside (the N:M rule above, restricted to the tile), [c2, n) are removed entirely.
  Achieved sparsity = (n_nm * (1 - N/M) + n_removed) / n exactly (M divides B).

Model-level: the weights that count are the 7 projection weight matrices (q, k, v, o, gate, up,
down) of every decoder layer; biases, embeddings, lm_head and norms are never pruned or counted.
Sparsity is measured from the weights themselves (exact zeros), so it is what a checkpoint holds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gqaprune import arch
from gqaprune.errors import UserError

TIER_DENSE, TIER_NM, TIER_REMOVED = 0, 1, 2


def removed_count(n: int, sparsity: float) -> int:
    """Weights removed out of ``n``: nearest integer to sparsity * n, halves up."""
    return min(n, max(0, math.floor(sparsity * n + 0.5)))


def unstructured_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """scores [R, C] -> keep mask [R, C]: the lowest ``removed_count(C, s)`` of each row removed."""
    rows, cols = scores.shape
    k = removed_count(cols, sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        lowest = torch.sort(scores, dim=1, stable=True).indices[:, :k]       # [R, k]
        keep.scatter_(1, lowest, False)
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """scores [R, C] (M | C) -> keep mask: the N highest of every M consecutive columns of a row."""
    rows, cols = scores.shape
    if cols % m:
        raise UserError(f"M={m} does not divide the input dimension {cols}", "use an M dividing it")
    groups = scores.reshape(rows, cols // m, m)                              # [R, C/M, M]
    top = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return keep.reshape(rows, cols)


def tile_sums(scores: torch.Tensor, block: int) -> torch.Tensor:
    """scores [R, C] -> per-tile sums [R/B, C/B]."""
    rows, cols = scores.shape
    return scores.reshape(rows // block, block, cols // block, block).sum(dim=(1, 3))


def tier_boundaries(n_tiles: int, fractions: tuple[float, float, float]) -> tuple[int, int]:
    """Cumulative rank boundaries (c1, c2): dense [0, c1), N:M [c1, c2), removed [c2, n)."""
    c1 = removed_count(n_tiles, fractions[0])
    c2 = max(c1, removed_count(n_tiles, fractions[0] + fractions[1]))
    return c1, c2


def tile_tiers(tile_scores: torch.Tensor, fractions: tuple[float, float, float]) -> torch.Tensor:
    """tile scores [r, c] -> tier id per tile (0 dense, 1 N:M, 2 removed), highest score densest."""
    flat = tile_scores.flatten()
    order = torch.sort(flat, descending=True, stable=True).indices          # rank -> tile
    c1, c2 = tier_boundaries(flat.numel(), fractions)
    tiers = torch.empty(flat.numel(), dtype=torch.long, device=flat.device)
    tiers[order[:c1]], tiers[order[c1:c2]], tiers[order[c2:]] = TIER_DENSE, TIER_NM, TIER_REMOVED
    return tiers.reshape(tile_scores.shape)


def block_hybrid_mask(scores: torch.Tensor, block: int, fractions: tuple[float, float, float],
                      n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [R, C] -> (keep mask [R, C], tier per tile [R/B, C/B]); see the module docstring."""
    tiers = tile_tiers(tile_sums(scores, block), fractions)
    per_weight = tiers.repeat_interleave(block, 0).repeat_interleave(block, 1)   # [R, C]
    keep = per_weight == TIER_DENSE
    keep |= (per_weight == TIER_NM) & nm_mask(scores, n, m)   # N:M groups never straddle tiles (M | B)
    return keep, tiers


# ---- model level --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProjectionSparsity:
    """Zeros of one projection weight matrix (measured from the weights)."""
    layer: int
    projection: str          # e.g. "self_attn.q_proj"
    rows: int
    cols: int
    zeros: int
    target: float | None = None   # the rate this matrix was pruned at (None when only measured)

    @property
    def total(self) -> int:
        return self.rows * self.cols

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total


def measure(model, targets: dict[int, float] | None = None) -> list[ProjectionSparsity]:
    """Zeros of every counted weight matrix (7 projections per decoder layer), in layer order."""
    out = []
    for i, layer in enumerate(arch.decoder_layers(model)):
        for name, lin in arch.named_linears(layer):
            w = lin.weight
            out.append(ProjectionSparsity(i, name, w.shape[0], w.shape[1], int((w == 0).sum()),
                                          None if targets is None else targets.get(i)))
    return out


def overall_sparsity(rows: list[ProjectionSparsity]) -> float:
    """Zeros / weights over the counted matrices (parameter-weighted)."""
    return sum(r.zeros for r in rows) / max(1, sum(r.total for r in rows))


@dataclass(frozen=True)
class NMCheck:
    """Does every group of M consecutive input weights of every row hold at most N non-zeros?"""
    pattern: str
    groups: int              # groups checked over all counted matrices
    exact: int               # groups with exactly N non-zeros
    violations: int          # groups with more than N non-zeros

    @property
    def ok(self) -> bool:
        return self.violations == 0


def nm_check(model, n: int, m: int) -> NMCheck:
    groups = exact = bad = 0
    for layer in arch.decoder_layers(model):
        for _, lin in arch.named_linears(layer):
            w = lin.weight
            nonzero = (w != 0).reshape(w.shape[0], -1, m).sum(-1)             # [R, C/M]
            groups += nonzero.numel()
            exact += int((nonzero == n).sum())
            bad += int((nonzero > n).sum())
    return NMCheck(f"{n}:{m}", groups, exact, bad)


def weight_masks(model, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Non-zero pattern of every counted weight: {"<layer>.<block>.<proj>": bool [rows, cols]}.

    Keys do not depend on wrappers (a peft model gives the same keys as its base model), so masks
    taken before fine-tuning re-apply after ``merge_and_unload``. Memory: 1 byte per weight.
    """
    return {f"{i}.{name}": (lin.weight != 0).to(device)
            for i, layer in enumerate(arch.decoder_layers(model))
            for name, lin in arch.named_linears(layer)}


@torch.no_grad()
def apply_masks(model, masks: dict[str, torch.Tensor]) -> int:
    """Zero every weight whose mask entry is False (in place); returns the weights newly zeroed.

    Use after a LoRA merge (W + BA is dense) to restore the sparse model's zero pattern.
    """
    expected = {f"{i}.{name}": lin for i, layer in enumerate(arch.decoder_layers(model))
                for name, lin in arch.named_linears(layer)}
    missing = sorted(set(expected) - set(masks))
    if missing:
        raise UserError(f"masks miss {len(missing)} projection(s), e.g. {missing[0]}",
                        "take the masks with weight_masks() from the same (sparse) model")
    changed = 0
    for key, lin in expected.items():
        mask, w = masks[key], lin.weight
        if tuple(mask.shape) != tuple(w.shape):
            raise UserError(f"mask for {key} has shape {tuple(mask.shape)}, the weight {tuple(w.shape)}",
                            "take the masks with weight_masks() from the same (sparse) model")
        drop = ~mask.to(w.device)
        changed += int((w[drop] != 0).sum())
        w.masked_fill_(drop, 0)
    return changed
