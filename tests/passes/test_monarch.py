"""Monarch: module = materialised matrix, projection optimality, activation-aware fit, bad shapes."""

from __future__ import annotations

import pytest
import torch

from passes.monarch import (
    MonarchConfig,
    MonarchLinear,
    candidate_configs,
    monarch_dense,
    monarch_forward,
    project_monarch,
)


def _random_factors(b, k, s, p, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, s, b * k, generator=g, dtype=dtype), torch.randn(b, k * b, p, generator=g, dtype=dtype)


def _rel(w, w_new, c=None):
    d = w - w_new
    if c is None:
        return (d.square().sum() / w.square().sum()).item()
    return (((d @ c) * d).sum() / ((w @ c) * w).sum()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("out", "inn", "b", "k"), [(16, 16, 4, 1), (37, 50, 4, 2), (64, 24, 8, 1), (9, 81, 3, 3), (5, 7, 1, 2)])
def test_forward_equals_materialised_matrix(out, inn, b, k, dtype):
    s, p = -(-out // b), -(-inn // b)
    L, R = _random_factors(b, k, s, p, dtype=dtype)
    bias = torch.randn(out, dtype=dtype)
    x = torch.randn(3, 5, inn, dtype=dtype)
    w = monarch_dense(L, R, out, inn)
    assert w.shape == (out, inn)
    # the definition, entry by entry: W[i·s + a, j·p + c] = Σ_t L[i, a, j·k + t] R[j, t·b + i, c]
    i, a, j, c = 1 % b, 0, (b - 1), p - 1
    if i * s + a < out and j * p + c < inn:
        want = sum(L[i, a, j * k + t] * R[j, t * b + i, c] for t in range(k))
        torch.testing.assert_close(w[i * s + a, j * p + c], want)
    module = MonarchLinear(torch.nn.Parameter(L), torch.nn.Parameter(R), torch.nn.Parameter(bias), out, inn)
    torch.testing.assert_close(module(x), x @ w.T + bias)
    torch.testing.assert_close(monarch_forward(x[0, 0], L, R, out), x[0, 0] @ w.T)


def test_square_monarch_is_dao_et_al_up_to_the_output_order():
    """k = 1, b = √n: W = L P R with block-diagonal L, R and P the b × b transpose permutation,
    i.e. Dao et al.'s M = P L Pᵀ R with its rows permuted by the (symmetric) P."""
    n, b = 16, 4
    L, R = _random_factors(b, 1, b, b)
    perm = torch.arange(n).view(b, b).t().reshape(-1)  # (P h)[i·b + j] = h[j·b + i]
    P = torch.eye(n, dtype=torch.float64)[perm]
    torch.testing.assert_close(P, P.T)
    w = monarch_dense(L, R, n, n)
    torch.testing.assert_close(w, torch.block_diag(*L) @ P @ torch.block_diag(*R))
    torch.testing.assert_close(P @ w, P @ torch.block_diag(*L) @ P.T @ torch.block_diag(*R))


@pytest.mark.parametrize(("out", "inn", "b", "k"), [(12, 12, 3, 1), (20, 30, 4, 2), (23, 17, 4, 1)])
def test_frobenius_projection_is_per_tile_truncated_svd(out, inn, b, k):
    """The closed form: error = the discarded singular values of every (padded) tile."""
    w = torch.randn(out, inn, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    L, R = project_monarch(w, b, k)
    s, p = -(-out // b), -(-inn // b)
    tiles = torch.nn.functional.pad(w, (0, b * p - inn, 0, b * s - out)).view(b, s, b, p).transpose(1, 2)
    sv = torch.linalg.svdvals(tiles)
    discarded = sv[..., k:].square().sum()
    err = (w - monarch_dense(L, R, out, inn)).square().sum()
    torch.testing.assert_close(err, discarded, rtol=1e-9, atol=1e-9)


def test_projection_recovers_monarch_matrices_exactly():
    L, R = _random_factors(4, 2, 6, 5, seed=3)
    w = monarch_dense(L, R, 22, 19)  # padded both ways
    c = torch.randn(19, 19, dtype=torch.float64)
    for cov in (None, c @ c.T):
        L2, R2 = project_monarch(w, 4, 2, cov)
        assert _rel(w, monarch_dense(L2, R2, 22, 19)) < 1e-18


def test_projection_is_no_worse_than_gradient_descent_from_many_starts():
    """Brute force on a tiny case: Adam over (L, R) from 8 random starts never beats the closed form."""
    torch.manual_seed(0)
    w = torch.randn(6, 8, dtype=torch.float64)
    b, k = 2, 1
    L, R = project_monarch(w, b, k)
    ours = (w - monarch_dense(L, R, 6, 8)).square().sum().item()
    best = float("inf")
    for start in range(8):
        g = torch.Generator().manual_seed(100 + start)
        Lg = torch.randn(b, 3, b * k, generator=g, dtype=torch.float64).requires_grad_()
        Rg = torch.randn(b, k * b, 4, generator=g, dtype=torch.float64).requires_grad_()
        opt = torch.optim.Adam([Lg, Rg], lr=0.05)
        for _ in range(300):
            opt.zero_grad()
            loss = (w - monarch_dense(Lg, Rg, 6, 8)).square().sum()
            loss.backward()
            opt.step()
        best = min(best, loss.item())
    assert ours <= best * (1 + 1e-6)
    assert best <= ours * 1.01  # the search does reach the optimum: the comparison means something


def test_activation_aware_fit_lowers_output_error_and_sweeps_never_hurt():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 64, generator=g, dtype=torch.float64)
    x = torch.randn(512, 64, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 64, dtype=torch.float64)
    x = x @ torch.randn(64, 64, generator=g, dtype=torch.float64) / 8  # correlated across tiles
    c = x.T @ x / x.shape[0]
    plain = _rel(w, monarch_dense(*project_monarch(w, 4, 2), 48, 64), c)
    errors = [_rel(w, monarch_dense(*project_monarch(w, 4, 2, c, sweeps=n), 48, 64), c) for n in (0, 1, 3)]
    assert errors[0] < 0.8 * plain
    assert errors[2] <= errors[1] * (1 + 1e-9) <= errors[0] * (1 + 1e-9)
    assert errors[2] < 0.97 * errors[0]  # the alternating steps do something


def test_candidate_grid_saves_bytes_and_fits():
    for out, inn in [(576, 576), (1536, 576), (576, 1536), (192, 576), (37, 50), (4096, 4096)]:
        configs = candidate_configs(out, inn)
        assert configs
        for c in configs:
            s, p = c.tiles(out, inn)
            assert c.rank < min(s, p) and c.nblocks <= min(out, inn)
            assert c.nblocks * c.rank * c.nblocks * (s + p) <= 0.5 * out * inn
    assert {c.nblocks for c in candidate_configs(576, 576)} == {4, 24}
    assert {c.nblocks for c in candidate_configs(4096, 4096)} == {4, 64}
    assert candidate_configs(6, 6) == []


def test_bad_configs_and_shapes_are_typed_errors():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="nblocks"):
            MonarchConfig(bad)
        with pytest.raises(ValueError, match="rank"):
            MonarchConfig(4, bad)
    with pytest.raises(TypeError, match="activation_aware"):
        MonarchConfig(4, 1, "yes")
    w = torch.randn(8, 8)
    with pytest.raises(ValueError, match="use at most 8"):
        project_monarch(w, 9, 1)
    with pytest.raises(ValueError, match="rank <= 2"):
        project_monarch(w, 4, 3)
