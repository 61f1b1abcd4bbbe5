"""Kronecker sums: module = materialised matrix, Van Loan–Pitsianis optimality, weighted ALS."""

from __future__ import annotations

import pytest
import torch

from passes.kronecker import (
    KroneckerConfig,
    KroneckerLinear,
    candidate_configs,
    kronecker_dense,
    kronecker_forward,
    project_kronecker,
)


def _factors(r, a_out, a_in, b_out, b_in, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(r, a_out, a_in, generator=g, dtype=torch.float64),
        torch.randn(r, b_out, b_in, generator=g, dtype=torch.float64),
    )


@pytest.mark.parametrize(("r", "a_out", "a_in", "b_out", "b_in", "out", "inn"), [
    (1, 4, 4, 4, 4, 16, 16), (3, 6, 8, 5, 7, 30, 56), (2, 4, 3, 5, 5, 19, 14), (1, 1, 2, 7, 3, 7, 6),
])  # fmt: skip
def test_forward_equals_materialised_matrix(r, a_out, a_in, b_out, b_in, out, inn):
    A, B = _factors(r, a_out, a_in, b_out, b_in)
    w = kronecker_dense(A, B, out, inn)
    full = sum(torch.kron(A[t], B[t]) for t in range(r))
    torch.testing.assert_close(w, full[:out, :inn])
    bias = torch.randn(out, dtype=torch.float64)
    x = torch.randn(2, 3, inn, dtype=torch.float64)
    module = KroneckerLinear(torch.nn.Parameter(A), torch.nn.Parameter(B), torch.nn.Parameter(bias), out, inn)
    torch.testing.assert_close(module(x), x @ w.T + bias)
    torch.testing.assert_close(kronecker_forward(x[0, 0].float(), A.float(), B.float(), out), (x[0, 0] @ w.T).float())


def test_van_loan_projection_is_the_truncated_svd_of_the_rearrangement():
    w = torch.randn(24, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rearranged = w.view(4, 6, 4, 5).permute(0, 2, 1, 3).reshape(16, 30)
    sv = torch.linalg.svdvals(rearranged)
    for r in (1, 3, 8):
        A, B = project_kronecker(w, (4, 4), r)
        err = (w - kronecker_dense(A, B, 24, 20)).square().sum()
        torch.testing.assert_close(err, sv[r:].square().sum(), rtol=1e-9, atol=1e-9)


def test_projection_is_no_worse_than_gradient_descent_from_many_starts():
    torch.manual_seed(0)
    w = torch.randn(6, 6, dtype=torch.float64)
    A, B = project_kronecker(w, (2, 3), 2)
    ours = (w - kronecker_dense(A, B, 6, 6)).square().sum().item()
    best = float("inf")
    for start in range(8):
        g = torch.Generator().manual_seed(100 + start)
        Ag = torch.randn(2, 2, 3, generator=g, dtype=torch.float64).requires_grad_()
        Bg = torch.randn(2, 3, 2, generator=g, dtype=torch.float64).requires_grad_()
        opt = torch.optim.Adam([Ag, Bg], lr=0.05)
        for _ in range(300):
            opt.zero_grad()
            loss = (w - kronecker_dense(Ag, Bg, 6, 6)).square().sum()
            loss.backward()
            opt.step()
        best = min(best, loss.item())
    assert ours <= best * (1 + 1e-6)
    assert best <= ours * 1.01


def test_exact_sums_are_recovered_with_and_without_calibration():
    A, B = _factors(3, 6, 8, 5, 7, seed=2)
    w = kronecker_dense(A, B, 30, 56)
    c = torch.randn(56, 56, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for cov in (None, c @ c.T / 56):
        A2, B2 = project_kronecker(w, (6, 8), 3, cov)
        assert ((w - kronecker_dense(A2, B2, 30, 56)).square().sum() / w.square().sum()).item() < 1e-20


def test_weighted_fit_beats_the_frobenius_projection_on_the_output_error():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(30, 56, generator=g, dtype=torch.float64)
    x = torch.randn(400, 56, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 56, dtype=torch.float64)
    c = x.T @ x / 400

    def out_err(factors):
        d = w - kronecker_dense(*factors, 30, 56)
        return ((d @ c) * d).sum().item()

    for r in (1, 2, 4):
        plain, weighted = out_err(project_kronecker(w, (6, 8), r)), out_err(project_kronecker(w, (6, 8), r, c))
        assert weighted < 0.9 * plain


def test_candidates_and_prime_sides():
    for out, inn in [(576, 576), (1536, 576), (576, 1536), (384, 1536), (37, 53)]:
        configs = candidate_configs(out, inn)
        assert configs
        for c in configs:
            b_out, b_in = c.b_shape(out, inn)
            assert c.terms * (c.a_out * c.a_in + b_out * b_in) <= 0.5 * out * inn
    # 37 and 53 are prime: factors pad, the fit and the module still work
    w = torch.randn(37, 53, dtype=torch.float64)
    c = next(c for c in candidate_configs(37, 53) if c.a_out * c.b_shape(37, 53)[0] > 37)
    A, B = project_kronecker(w, (c.a_out, c.a_in), c.terms, torch.eye(53, dtype=torch.float64))
    x = torch.randn(4, 53, dtype=torch.float64)
    torch.testing.assert_close(kronecker_forward(x, A, B, 37), x @ kronecker_dense(A, B, 37, 53).T)
    assert candidate_configs(3, 100) == []


def test_bad_configs_are_typed_errors():
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="a_out"):
            KroneckerConfig(bad, 2)
        with pytest.raises(ValueError, match="terms"):
            KroneckerConfig(2, 2, bad)
    with pytest.raises(ValueError, match="does not fit"):
        project_kronecker(torch.randn(4, 4), (8, 2), 1)
    with pytest.raises(ValueError, match="terms <= 4"):
        project_kronecker(torch.randn(4, 4), (2, 2), 5)
