"""Permuted block-diagonal: module = materialised matrix, planted blocks found, least-squares blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from passes.blockdiag import (
    BlockDiagConfig,
    BlockDiagLinear,
    BlockDiagTransform,
    blockdiag_dense,
    blockdiag_forward,
    candidate_configs,
)
from passes.structured_base import Problem

T = BlockDiagTransform()


def _planted(b=4, s=5, p=6, out=19, inn=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randn(b, s, p, generator=g, dtype=torch.float64)
    in_index = torch.randperm(b * p, generator=g).int()
    out_index = torch.randperm(b * s, generator=g)[:out].int()
    return blockdiag_dense(blocks, out, inn, in_index, out_index), blocks


@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize(("b", "out", "inn"), [(2, 8, 8), (4, 19, 23), (3, 30, 12)])
def test_forward_equals_materialised_matrix(b, out, inn, permuted):
    g = torch.Generator().manual_seed(1)
    s, p = -(-out // b), -(-inn // b)
    blocks = torch.randn(b, s, p, generator=g, dtype=torch.float64)
    in_index = torch.randperm(b * p, generator=g).int() if permuted else None
    out_index = torch.randperm(b * s, generator=g)[:out].int() if permuted else None
    w = blockdiag_dense(blocks, out, inn, in_index, out_index)
    assert (w != 0).sum() <= b * s * p
    bias = torch.randn(out, dtype=torch.float64)
    module = BlockDiagLinear(torch.nn.Parameter(blocks), torch.nn.Parameter(bias), out, inn, in_index, out_index)
    x = torch.randn(3, 4, inn, dtype=torch.float64)
    torch.testing.assert_close(module(x), x @ w.T + bias)
    torch.testing.assert_close(blockdiag_forward(x[0], blocks, out, in_index, out_index), x[0] @ w.T)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("aware", [False, True])
def test_planted_permuted_blocks_are_found(seed, aware):
    w, _ = _planted(seed=seed)
    c = None
    if aware:
        x = torch.randn(200, 23, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        c = x.T @ x / 200
    fit = T.fit(Problem(w, c, 1.0), [BlockDiagConfig(4, True, aware)])[0]
    total = w.square().sum().item() if c is None else ((w @ c) * w).sum().item()
    assert fit.squared_error < 1e-12 * total
    f = fit.factors
    torch.testing.assert_close(blockdiag_dense(f["blocks"], 19, 23, f["in_index"], f["out_index"]), w)


def test_aware_blocks_are_the_least_squares_optimum_for_their_groups():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(12, 16, generator=g, dtype=torch.float64)
    x = torch.randn(300, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g, dtype=torch.float64)
    c = x.T @ x / 300
    problem = Problem(w, c, 1.0)
    fit = T.fit(problem, [BlockDiagConfig(2, False, True)])[0]
    blocks = fit.factors["blocks"]
    ridge = problem.damping * x.shape[0]  # C_f = C + δI, i.e. ridge regression on the rows of x
    for grp in range(2):  # regress each output group on its input group, on the data itself
        rows, cols = slice(6 * grp, 6 * grp + 6), slice(8 * grp, 8 * grp + 8)
        xa = torch.cat([x[:, cols], ridge**0.5 * torch.eye(8, dtype=torch.float64)])
        ya = torch.cat([x @ w[rows].T, ridge**0.5 * w[rows, cols].T])
        want = torch.linalg.lstsq(xa, ya).solution.T
        torch.testing.assert_close(blocks[grp], want, rtol=1e-7, atol=1e-9)
    d = w - blockdiag_dense(blocks, 12, 16)
    torch.testing.assert_close(fit.squared_error, ((d @ c) * d).sum().item(), rtol=1e-9, atol=1e-12)


def test_permutation_keeps_more_than_contiguous_groups():
    w = torch.randn(64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    w[w.abs() < 1.0] *= 0.1  # some structure to find
    plain = T.fit(Problem(w, None, 1.0), [BlockDiagConfig(4, False, False)])[0].squared_error
    permuted = T.fit(Problem(w, None, 1.0), [BlockDiagConfig(4, True, False)])[0].squared_error
    assert permuted < 0.97 * plain


def test_indices_are_int32_permutations():
    w, _ = _planted(seed=3)
    f = T.fit(Problem(w, None, 1.0), [BlockDiagConfig(4, True, False)])[0].factors
    assert f["in_index"].dtype == torch.int32 and f["out_index"].dtype == torch.int32
    assert sorted(f["in_index"].tolist()) == list(range(24))
    assert len(set(f["out_index"].tolist())) == 19 and max(f["out_index"].tolist()) < 20
    assert T.nbytes(BlockDiagConfig(4), 19, 23, 4) == 4 * 5 * 6 * 4 + (24 + 19) * 4
    assert T.nbytes(BlockDiagConfig(4, permute=False), 19, 23, 4) == 4 * 5 * 6 * 4


def test_candidates_and_bad_configs():
    assert [c.nblocks for c in candidate_configs(576, 1536)] == [2, 4, 8, 16, 32]
    assert candidate_configs(7, 100) == []
    assert np.all([c.permute for c in candidate_configs(64, 64)])
    for bad in (1, 0, 2.0, True):
        with pytest.raises(ValueError, match="nblocks"):
            BlockDiagConfig(bad)
    with pytest.raises(TypeError, match="permute"):
        BlockDiagConfig(2, permute=1)
