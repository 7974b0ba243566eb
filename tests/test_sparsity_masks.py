"""Sparsity masks on hand-built tensors: exact Wanda masks per output row, the rounding rule,
N:M groups, block tiers."""
import pytest
import torch

from gqaprune.sparsity.masks import (TIER_DENSE, TIER_NM, TIER_REMOVED, block_hybrid_mask, nm_mask,
                                     removed_count, tier_boundaries, tile_sums, tile_tiers,
                                     unstructured_row_mask)
from gqaprune.sparsity.scores import magnitude_scores, wanda_scores

# W [2, 4] and X [2 tokens, 4 inputs]: ||X_j||_2 = (5, 1, 1, 2).
W = torch.tensor([[1.0, -2.0, 3.0, 0.5],
                  [4.0, 1.0, -1.0, 2.0]])
X = torch.tensor([[3.0, 0.0, 1.0, 0.0],
                  [4.0, 1.0, 0.0, 2.0]])


def test_wanda_scores_exact():
    scores = wanda_scores(W, (X ** 2).sum(0))
    assert torch.equal(scores, torch.tensor([[5.0, 2.0, 3.0, 1.0], [20.0, 1.0, 1.0, 4.0]]))


def test_wanda_mask_exact_per_output_row_and_differs_from_magnitude():
    keep = unstructured_row_mask(wanda_scores(W, (X ** 2).sum(0)), 0.5)
    # row 0 scores (5, 2, 3, 1): drop cols 3, 1; row 1 (20, 1, 1, 4): drop the tied cols 1, 2
    assert keep.tolist() == [[True, False, True, False], [True, False, False, True]]
    # magnitude alone would keep |-2|, |3| in row 0: the activations change the decision
    assert unstructured_row_mask(magnitude_scores(W), 0.5)[0].tolist() == [False, True, True, False]


def test_rows_are_compared_within_themselves():
    scores = wanda_scores(W, (X ** 2).sum(0))
    scaled = scores.clone()
    scaled[1] *= 1000                      # another row's scale changes nothing in row 0
    assert torch.equal(unstructured_row_mask(scores, 0.5), unstructured_row_mask(scaled, 0.5))


def test_ties_remove_the_lower_column_first():
    keep = unstructured_row_mask(torch.ones(1, 4), 0.5)
    assert keep.tolist() == [[False, False, True, True]]


@pytest.mark.parametrize("n,s,expected", [(100, 0.29, 29), (10, 0.3, 3), (10, 0.05, 1), (10, 0.04, 0),
                                          (2, 0.25, 1), (172, 0.5, 86), (64, 0.0, 0), (7, 0.99, 7)])
def test_removed_count_is_nearest_integer_halves_up(n, s, expected):
    assert removed_count(n, s) == expected


@pytest.mark.parametrize("cols", [10, 64, 100, 172])
@pytest.mark.parametrize("s", [0.1, 0.25, 0.29, 0.5, 0.7])
def test_unstructured_sparsity_equals_target_in_every_row(cols, s):
    scores = torch.rand(9, cols, generator=torch.Generator().manual_seed(cols))
    keep = unstructured_row_mask(scores, s)
    zeros = (~keep).sum(1)
    assert torch.all(zeros == removed_count(cols, s))
    assert abs(zeros[0].item() / cols - s) <= 0.5 / cols
    # the removed ones are the row's lowest scores: every removed score <= every kept score
    assert torch.all(scores.masked_fill(keep, -1.0).max(1).values <= scores.masked_fill(~keep, 2.0).min(1).values)


def test_nm_mask_exact():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 0.0, 5.0, 6.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[True, False, True, False, False, False, True, True]]
    assert nm_mask(scores, 1, 4).tolist() == [[True, False, False, False, False, False, False, True]]
    # ties keep the lower column
    assert nm_mask(torch.ones(1, 4), 2, 4).tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 4), (1, 2), (5, 16)])
def test_every_nm_group_holds_exactly_n_nonzeros(n, m):
    scores = torch.rand(12, 4 * m, generator=torch.Generator().manual_seed(m + n))
    keep = nm_mask(scores, n, m)
    assert torch.all(keep.reshape(12, 4, m).sum(-1) == n)


def test_tile_sums_and_tiers_exact():
    scores = torch.arange(16.0).reshape(4, 4)                 # 2x2 tiles of a 4x4 matrix
    assert tile_sums(scores, 2).tolist() == [[10.0, 18.0], [42.0, 50.0]]
    tiers = tile_tiers(tile_sums(scores, 2), (0.25, 0.5, 0.25))
    assert tiers.tolist() == [[TIER_REMOVED, TIER_NM], [TIER_NM, TIER_DENSE]]
    assert tier_boundaries(10, (0.35, 0.45, 0.2)) == (4, 8)     # 3.5 -> 4, 8.0 -> 8: 4 / 4 / 2 tiles


@pytest.mark.parametrize("fractions", [(0.35, 0.45, 0.2), (0.25, 0.5, 0.25), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)])
def test_block_tiers_match_the_fractions(fractions):
    B, n, m = 4, 2, 4
    scores = torch.rand(16, 20 * 4, generator=torch.Generator().manual_seed(1))   # 4 x 20 = 80 tiles
    keep, tiers = block_hybrid_mask(scores, B, fractions, n, m)
    counts = torch.bincount(tiers.flatten(), minlength=3).tolist()
    c1, c2 = tier_boundaries(80, fractions)
    assert counts == [c1, c2 - c1, 80 - c2]
    assert counts == [round(f * 80) for f in fractions]                     # exact here
    per_weight = tiers.repeat_interleave(B, 0).repeat_interleave(B, 1)
    assert keep[per_weight == TIER_DENSE].all() and not keep[per_weight == TIER_REMOVED].any()
    groups = keep.reshape(16, -1, m).sum(-1)                                # [16, 20]
    nm_groups = (per_weight == TIER_NM).reshape(16, -1, m).all(-1)
    assert torch.all(groups[nm_groups] == n)
    achieved = 1 - keep.double().mean().item()
    expected = (counts[1] * (1 - n / m) + counts[2]) / 80
    assert achieved == pytest.approx(expected, abs=1e-12)


def test_block_tiers_rank_by_summed_score():
    # 8x8 matrix, 4x4 tiles with sums 1, 4 / 3, 2 (one weight carries each tile's score)
    scores = torch.zeros(8, 8)
    scores[0, 0], scores[0, 4], scores[4, 0], scores[4, 4] = 1.0, 4.0, 3.0, 2.0
    keep, tiers = block_hybrid_mask(scores, 4, (0.25, 0.5, 0.25), 2, 4)
    assert tiers.tolist() == [[TIER_REMOVED, TIER_DENSE], [TIER_NM, TIER_NM]]
    assert keep[:4, 4:].all() and not keep[:4, :4].any()
    assert keep[4:].sum().item() == 4 * 2 * 2     # 4 rows x 2 tiles x one 4-group holding N=2
