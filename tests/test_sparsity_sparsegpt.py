"""SparseGPT on hand-built layers: exact OBS updates, identity-Hessian = magnitude, exact row
counts and N:M groups, and a lower layer reconstruction error than Wanda and magnitude."""
import pytest
import torch

from gqaprune.errors import UserError
from gqaprune.sparsity.masks import nm_mask, removed_count, unstructured_row_mask
from gqaprune.sparsity.scores import magnitude_scores, wanda_scores
from gqaprune.sparsity.sparsegpt import inverse_cholesky, sparsegpt_prune


def test_two_column_update_is_the_exact_obs_compensation():
    # H = [[1, rho], [rho, 1]]: pruning w1 moves its contribution onto w2: w2' = w2 + rho * w1.
    rho = 0.5
    H = torch.tensor([[1.0, rho], [rho, 1.0]], dtype=torch.float64)
    res = sparsegpt_prune(torch.tensor([[1.0, 2.0]], dtype=torch.float64), H, 0.5, damping=0.0,
                          dtype=torch.float64)
    # costs w^2 / U_jj^2: col 0 -> 1 * (1 - rho^2) = 0.75, col 1 -> 4: col 0 is pruned
    assert res.keep.tolist() == [[False, True]]
    assert torch.allclose(res.weight, torch.tensor([[0.0, 2.5]], dtype=torch.float64), atol=1e-12)


def test_identity_hessian_is_magnitude_pruning_without_updates():
    W = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    row = sparsegpt_prune(W, torch.eye(32), 0.5, blocksize=32, damping=0.01, selection="row")
    keep = unstructured_row_mask(magnitude_scores(W), 0.5)
    assert torch.equal(row.keep, keep)
    assert torch.equal(row.weight, W * keep)
    # block selection over one block of all rows = the matrix's 96 smallest |w| removed
    block = sparsegpt_prune(W, torch.eye(32), 0.5, blocksize=32, damping=0.01)
    keep = unstructured_row_mask(magnitude_scores(W).reshape(1, -1), 0.5).reshape(W.shape)
    assert torch.equal(block.keep, keep)
    assert torch.equal(block.weight, W * keep)


def test_inverse_cholesky_factor_and_damping():
    A = torch.randn(40, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    H = A.T @ A / 40
    U, used = inverse_cholesky(H, 0.01)
    lam = 0.01 * torch.diag(H).mean()
    assert used == 0.01
    assert torch.allclose(U.T @ U, torch.linalg.inv(H + lam * torch.eye(8, dtype=torch.float64)), atol=1e-10)
    assert torch.equal(U, torch.triu(U))
    # a singular Hessian without damping gets damping raised until Cholesky succeeds
    _, used = inverse_cholesky(torch.zeros(4, 4, dtype=torch.float64) + 1.0, 0.0)
    assert used > 0


def test_all_zero_hessian_raises_user_error():
    with pytest.raises(UserError, match="singular"):
        inverse_cholesky(torch.zeros(3, 3), 0.01)


def correlated_layer(rows=32, cols=64, tokens=512, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols ** 0.5 + torch.eye(cols)
    scales = torch.linspace(0.2, 3, cols)[torch.randperm(cols, generator=gen)]   # outlier-ish columns
    X = torch.randn(tokens, cols, generator=gen) @ mix * scales                  # [n, in]
    W = torch.randn(rows, cols, generator=gen)
    return W, X


def err(W, W_hat, X):
    return torch.linalg.norm(X @ (W - W_hat).T).item()


@pytest.mark.parametrize("nm,selection", [(None, "block"), (None, "row"), ((2, 4), "block"), ((4, 8), "block")])
def test_reconstruction_error_below_wanda_and_magnitude(nm, selection):
    W, X = correlated_layer()
    H = X.T @ X / X.shape[0]
    res = sparsegpt_prune(W, H, 0.5, nm=nm, blocksize=16, selection=selection)
    mask = (lambda s: nm_mask(s, *nm)) if nm else (lambda s: unstructured_row_mask(s, 0.5))
    wanda = W * mask(wanda_scores(W, (X ** 2).sum(0)))
    magnitude = W * mask(magnitude_scores(W))
    e_sgpt, e_wanda, e_mag = err(W, res.weight, X), err(W, wanda, X), err(W, magnitude, X)
    assert e_sgpt < e_wanda and e_sgpt < e_mag


@pytest.mark.parametrize("s,blocksize", [(0.5, 16), (0.3, 16), (0.3, 7), (0.7, 128)])
def test_row_selection_rows_hold_the_exact_count(s, blocksize):
    W, X = correlated_layer(rows=8, cols=64)
    res = sparsegpt_prune(W, X.T @ X / X.shape[0], s, blocksize=blocksize, selection="row")
    assert torch.all((res.weight == 0).sum(1) == removed_count(64, s))
    assert torch.equal(res.weight != 0, res.keep)


@pytest.mark.parametrize("s,blocksize", [(0.5, 16), (0.3, 16), (0.29, 7), (0.7, 128)])
def test_block_selection_matrix_holds_the_exact_count(s, blocksize):
    W, X = correlated_layer(rows=8, cols=64)
    res = sparsegpt_prune(W, X.T @ X / X.shape[0], s, blocksize=blocksize)
    assert int((res.weight == 0).sum()) == removed_count(8 * 64, s)
    assert torch.equal(res.weight != 0, res.keep)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_groups_hold_exactly_n(n, m):
    W, X = correlated_layer(rows=8, cols=64)
    res = sparsegpt_prune(W, X.T @ X / X.shape[0], 1 - n / m, nm=(n, m), blocksize=16)
    assert torch.all((res.weight != 0).reshape(8, -1, m).sum(-1) == n)


def test_dead_inputs_are_pruned_first_and_change_nothing():
    W, X = correlated_layer(rows=4, cols=16)
    X[:, 3] = 0                                           # input 3 never fires
    for selection in ("row", "block"):
        res = sparsegpt_prune(W, X.T @ X / X.shape[0], 0.25, blocksize=16, selection=selection)
        assert not res.keep[:, 3].any()
        assert int((res.weight == 0).sum()) == 16
