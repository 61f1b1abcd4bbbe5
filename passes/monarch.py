"""Monarch matrices (Dao et al. 2022) for Linear and Conv1D weights: projection, module, transform.

Where it sits: after capture and (optional) calibration, beside ``passes.lowrank``; the
``"monarch"`` transform proposes a grid of (nblocks, rank) options per linear-like site and
rewrites the chosen ones into :class:`MonarchLinear`, which stores only its two factors and
computes with two batched matmuls, never the dense matrix.

The structure. Cut W (out × in) into a grid of b × b tiles of ``s × p`` (s = ⌈out/b⌉,
p = ⌈in/b⌉; the weight is zero-padded to b·s × b·p when b does not divide a side, so
rectangular and non-square-number shapes are handled by rectangular tiles plus padding, and
the padding is stored and counted). A rank-k Monarch matrix is one whose every tile W_ij has
rank ≤ k, stored as ``W_ij = L_ij R_ij`` (s × k times k × p). With k = 1 and b = √n this is
``W = L P R`` (block-diagonal R, the b × b transpose permutation P, block-diagonal L): the
paper's square Monarch ``M = P L Pᵀ R`` with its outputs reordered by P (so that tiles are
contiguous, which is what makes the projection closed-form per tile); rank k is the sum of
k such matrices over the same grid, and b = 1 is plain rank-k low-rank. Storage: ``b·k·(b·p + b·s)`` elements, FLOPs ``2·rows`` times that.
The layout (what ``codegen`` kernels match, see ``monarch_forward``)::

    R: (b, k·b, p)   R[j, t·b + i, c]   input block j -> k values for each output block i
    L: (b, s, b·k)   L[i, a, j·k + t]   output block i <- k values from each input block j
    W[i·s + a, j·p + c] = Σ_t L[i, a, j·k + t] · R[j, t·b + i, c]

The projection. Without calibration, minimising ‖W − W'‖_F decouples over tiles: the
truncated rank-k SVD of every tile is the exact optimum (Eckart–Young per tile; one batched
SVD prices every k). With calibration the output error ``tr(ΔCΔᵀ)`` couples the tiles of an
output block row through the off-diagonal blocks of C, and whitening by a dense C^½ would
destroy the tile structure. What is done instead, each step priced exactly:

(C here is the damped ``C + δI`` of ``passes.structured_base.Problem``: undamped, these
least-squares steps can blow up along directions the calibration never excites.)

1. start: every tile's rank-k output-space projection under its own diagonal block C_jj
   (``U Uᵀ W_ij``, U the top left singular vectors of ``W_ij C_jj^½`` — whitening by the
   block-diagonal part of C keeps every tile rank k, so this step is sound);
2. an exact least-squares step for L given R with the full C (output block rows decouple:
   ``L_i = W_i C M_iᵀ (M_i C M_iᵀ)⁻¹``, M_i the block-diagonal stack of R_i1 … R_ib);
3. rounds of: R given L (a convex quadratic in R; preconditioned conjugate gradients warm-
   started from the current R, so it never increases the error), then L given R again, until
   a round gains less than :data:`SWEEP_TOL` or :data:`MAX_SWEEPS` rounds.

On SmolLM2 layer 5 (16 × 256 calibration tokens) step 2 lowers the relative output error of
step 1 by 5-25% and two rounds by another 5-15%, where the data-free projection would be 2-5×
worse (q_proj, b = 24, k = 1: 0.72 data-free, 0.15 after step 1, 0.137 after two rounds; 20
rounds reach 0.134). Alternating steps find a local optimum of a non-convex problem: on tiny
random cases a many-start gradient search sometimes finds a lower error
(``benchmarks/structured.py``). The priced error is the exact ``tr(ΔCΔᵀ)`` of the factors
produced, computed from ``W·C`` (once per site) without an ``out·in²`` product per option.

Factors are rebalanced at the end (each rank-1 term's two vectors get equal norms), which
changes nothing in W' and keeps fine-tuning well conditioned (``passes.reparametrize``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from codegen import dispatch
from cost_model import MatmulCost
from passes.config import TransformConfig, register_config
from passes.structured_base import FactorSpec, Fit, Problem, StructuredTransform, single_threaded
from passes.transform import register_transform

__all__ = [
    "MonarchConfig",
    "MonarchLinear",
    "MonarchTransform",
    "candidate_configs",
    "monarch_dense",
    "monarch_forward",
    "project_monarch",
]

#: Alternating (R given L, L given R) rounds after the first exact L step, at most ...
MAX_SWEEPS = 30
#: ... stopping at the first round that lowers the error by less than this fraction (on
#: SmolLM2 two or three rounds; a round costs ~(CG_ITERATIONS + 2)·b·k·in² multiply-adds).
SWEEP_TOL = 0.01
#: Preconditioned conjugate-gradient iterations per R step (2-4 reach the step's optimum to 0.1% on SmolLM2).
CG_ITERATIONS = 2
#: Options whose factors store more than this fraction of the dense weight are not offered.
MAX_RATIO = 0.5


@register_config
@dataclass(frozen=True)
class MonarchConfig(TransformConfig):
    """Store a weight as a rank-``rank`` Monarch matrix over an ``nblocks`` × ``nblocks`` tile grid.

    Attributes:
        nblocks: b ≥ 1 tiles per side (b = 1 is plain rank-``rank`` low-rank).
        rank: k ≥ 1, the rank of every tile (k Monarch terms).
        activation_aware: fit the output error on the calibration inputs (needs calibration);
            False is the closed-form Frobenius projection (per-tile truncated SVD).

    Expected error: on pretrained weights, close to activation-aware low-rank of the same
    bytes, usually a little above it. SmolLM2 layer 5, b = 24, k = 2 (relative output error
    on 16 × 256 calibration tokens): q_proj 0.094 vs low-rank's 0.088 (1/6 of the bytes),
    o_proj 0.28 vs 0.24, up_proj 0.59 vs 0.55 (1/9), down_proj 0.55 vs 0.60 — there Monarch
    is better. Exact on weights that are Monarch matrices.
    """

    family: ClassVar[str] = "monarch"
    nblocks: int
    rank: int = 1
    activation_aware: bool = True

    def __post_init__(self):
        for name in ("nblocks", "rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MonarchConfig.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.activation_aware, bool):
            raise TypeError(f"MonarchConfig.activation_aware must be a bool, got {self.activation_aware!r}")

    def describe(self) -> str:
        return f"monarch b={self.nblocks} k={self.rank}" + ("" if self.activation_aware else " (svd)")

    def tiles(self, out: int, inn: int) -> tuple[int, int]:
        """``(s, p)``: tile rows and columns for an (out × in) weight."""
        return -(-out // self.nblocks), -(-inn // self.nblocks)


# ---- the module ---------------------------------------------------------------------------


def monarch_forward(
    x: torch.Tensor, L: torch.Tensor, R: torch.Tensor, out_features: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x ↦ x W'ᵀ + bias`` for the Monarch matrix of factors ``L``, ``R`` (layout: module docstring).

    Works on the transposed activations (N last) so that both batched matmuls read their
    operands with unit stride and the stage permutation is a view: on CPU only the final
    transpose copies (4096², b = 64, 2048 rows: ~6× faster than the dense matmul,
    ``benchmarks/structured.py``).
    """
    b, kb, p = R.shape
    k = kb // b
    s = L.shape[1]
    lead, n_in = x.shape[:-1], x.shape[-1]
    x = x.reshape(-1, n_in)
    if n_in < b * p:
        x = F.pad(x, (0, b * p - n_in))
    n = x.shape[0]
    xt = x.reshape(n, b, p).permute(1, 2, 0)  # (b_j, p, N)
    h = torch.bmm(R, xt)  # (b_j, k·b_i, N): h[j, t·b + i, n]
    g = h.reshape(b, k, b, n).permute(2, 0, 1, 3).reshape(b, b * k, n)  # (b_i, b_j·k, N), a view
    y = torch.bmm(L, g).reshape(b * s, n)[:out_features].t()  # (N, out)
    if bias is not None:
        y = y + bias
    return y.contiguous().reshape(*lead, out_features)


def monarch_dense(L: torch.Tensor, R: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The (out × in) matrix ``monarch_forward`` applies (for tests and pricing, not for inference)."""
    b, kb, p = R.shape
    k = kb // b
    s = L.shape[1]
    w = torch.einsum("iajt,jtic->iajc", L.reshape(b, s, b, k), R.reshape(b, k, b, p))
    return w.reshape(b * s, b * p)[:out_features, :in_features]


class MonarchLinear(nn.Module):
    """A Linear (or GPT-2 Conv1D) whose weight is a rank-k Monarch matrix; stores ``L``, ``R`` only."""

    def __init__(self, L: nn.Parameter, R: nn.Parameter, bias: nn.Parameter | None, out_features: int, in_features: int):
        super().__init__()
        b, kb, p = R.shape
        if L.shape[0] != b or L.shape[2] != kb or b * p < in_features or b * L.shape[1] < out_features:
            raise ValueError(f"Monarch factors L {tuple(L.shape)}, R {tuple(R.shape)} do not fit {out_features}×{in_features}")
        self.L = L
        self.R = R
        self.bias = bias
        self.out_features = out_features
        self.in_features = in_features

    @property
    def nblocks(self) -> int:
        return self.R.shape[0]

    @property
    def rank(self) -> int:
        return self.R.shape[1] // self.R.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if dispatch.use_kernels(x, self.L, self.R, self.bias):
            return dispatch.monarch_linear(x, self.L, self.R, self.out_features, self.bias)  # the Monarch kernels on CUDA
        return monarch_forward(x, self.L, self.R, self.out_features, self.bias)

    def dense(self) -> torch.Tensor:
        """The materialised (out × in) weight."""
        return monarch_dense(self.L, self.R, self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, nblocks={self.nblocks}, rank={self.rank}, "
            f"bias={self.bias is not None}"
        )


# ---- the projection -------------------------------------------------------------------------


def _pad(m: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return F.pad(m, (0, cols - m.shape[1], 0, rows - m.shape[0]))


def _to_layout(lb: torch.Tensor, rb: torch.Tensor) -> dict[str, torch.Tensor]:
    """Tile factors ``lb`` (b_i, b_j, s, k), ``rb`` (b_i, b_j, k, p) -> the module's L, R."""
    b, _, s, k = lb.shape
    p = rb.shape[-1]
    # Equal norms for the two vectors of every rank-1 term: W' unchanged, training better conditioned.
    nl = lb.norm(dim=2)  # (b, b, k)
    nr = rb.norm(dim=3)
    alpha = torch.where((nl > 0) & (nr > 0), (nr / nl.clamp_min(1e-300)).sqrt(), torch.ones_like(nl))
    lb = lb * alpha[:, :, None, :]
    rb = rb / alpha[:, :, :, None]
    return {
        "L": lb.permute(0, 2, 1, 3).reshape(b, s, b * k).contiguous(),
        "R": rb.permute(1, 2, 0, 3).reshape(b, k * b, p).contiguous(),
    }


class _Weighted:
    """The activation-aware problem of one block count: padded W, W·C_f, C_f (the damped C of
    :class:`~passes.structured_base.Problem`) and its tile views."""

    def __init__(self, problem: Problem, b: int, s: int, p: int):
        self.b, self.s, self.p = b, s, p
        self.problem = problem
        self.w = _pad(problem.w, b * s, b * p)
        self.wc4 = _pad(problem.fit_wc, b * s, b * p).view(b, s, b, p)
        c = _pad(problem.fit_covariance, b * p, b * p)
        self.cv = c.view(b, p, b * p)  # C[(j, c), x]
        self.tiles = self.w.view(b, s, b, p).permute(0, 2, 1, 3)  # (b_i, b_j, s, p)
        cd = torch.stack([c[j * p : (j + 1) * p, j * p : (j + 1) * p] for j in range(b)])
        with single_threaded():
            vals, vecs = torch.linalg.eigh(cd)
        vals = vals.clamp_min(0)
        self.c_half = (vecs * vals.sqrt()[:, None, :]) @ vecs.transpose(1, 2)  # C_jj^½
        floor = 1e-8 * vals.amax(-1, keepdim=True).clamp_min(1e-300)
        self.c_inv = (vecs / vals.clamp_min(floor)[:, None, :]) @ vecs.transpose(1, 2)  # for the preconditioner

    def projected(self, rb: torch.Tensor) -> torch.Tensor:
        """``P[i, J, T, x] = (M_i C)[(J, T), x]`` for tile factors ``rb`` (b_i, b_J, k, p)."""
        return torch.einsum("iJTc,Jcx->iJTx", rb, self.cv)

    def l_step(self, rb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact least-squares L for fixed R (full C); returns ``(lb, P)``."""
        b, s, p = self.b, self.s, self.p
        k = rb.shape[2]
        proj = self.projected(rb)
        gram = torch.einsum("ijtc,iJTjc->ijtJT", rb, proj.view(b, b, k, b, p)).reshape(b, b * k, b * k)
        rhs = torch.einsum("iajc,ijtc->ijta", self.wc4, rb).reshape(b, b * k, s)
        # A tiny ridge makes the solve well-posed where R has zero rows (padding, dead inputs).
        ridge = 1e-12 * gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-300)
        gram = gram + ridge[:, None, None] * torch.eye(b * k, dtype=gram.dtype)
        with single_threaded():
            sol = torch.linalg.solve(gram, rhs)  # (b_i, (j, t), s)
        return sol.view(b, b, k, s).transpose(2, 3).contiguous(), proj

    def r_step(self, lb: torch.Tensor, rb: torch.Tensor, iterations: int) -> torch.Tensor:
        """R for fixed L: preconditioned conjugate gradients on the normal equations.

        The problem is a convex quadratic in R (output block rows i are independent systems,
        solved together). Warm-started from the current R, every iterate has a lower error, so
        the step never makes things worse. Preconditioner: the exact inverse of the system's
        diagonal (j = J) blocks, ``(LᵢⱼᵀLᵢⱼ)⁻¹ ⊗ C_jj⁻¹`` — exact when C is block-diagonal, and
        it cuts the iterations needed about threefold on SmolLM2's layers.
        """
        b, p = self.b, self.p
        k = rb.shape[2]
        ltl = torch.einsum("ijat,iJaT->ijtJT", lb, lb)
        ltl_jj = torch.diagonal(ltl, dim1=1, dim2=3).permute(0, 3, 1, 2)  # (b_i, b_j, k, k)
        ridge = 1e-10 * ltl_jj.diagonal(dim1=2, dim2=3).mean(-1).clamp_min(1e-300)
        with single_threaded():
            ltl_inv = torch.linalg.inv(ltl_jj + ridge[..., None, None] * torch.eye(k, dtype=lb.dtype))

        def apply(v: torch.Tensor) -> torch.Tensor:  # [i, j, t, c] = (LᵢᵀLᵢ Mᵢ(v) C)[(j, t), (j, c)]
            return torch.einsum("ijtJT,iJTjc->ijtc", ltl, self.projected(v).view(b, b, k, b, p))

        def precondition(r: torch.Tensor) -> torch.Tensor:
            return ltl_inv @ r @ self.c_inv[None]

        def dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return (u * v).sum((1, 2, 3))

        x = rb.clone()
        r = torch.einsum("ijat,iajc->ijtc", lb, self.wc4) - apply(x)
        z = precondition(r)
        d = z.clone()
        rz = dot(r, z)
        for _ in range(iterations):
            ad = apply(d)
            dad = dot(d, ad)
            alpha = torch.where(dad > 0, rz / dad.clamp_min(1e-300), torch.zeros_like(rz))[:, None, None, None]
            x = x + alpha * d
            r = r - alpha * ad
            z = precondition(r)
            rz_new = dot(r, z)
            beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-300), torch.zeros_like(rz))[:, None, None, None]
            d = z + beta * d
            rz = rz_new
        return x

    def squared_error(self, lb: torch.Tensor, rb: torch.Tensor, proj: torch.Tensor) -> tuple[float, float]:
        """``(tr(ΔC_fΔᵀ), exact tr(ΔCΔᵀ))`` from ``W·C_f`` and ``P`` (= M C_f of ``rb``): no out·in² product."""
        b, s, p = self.b, self.s, self.p
        wc_new = torch.einsum("iJaT,iJTx->iax", lb, proj)  # (W'C_f) by output block
        delta_c = self.wc4.reshape(b, s, b * p) - wc_new
        delta = self.w.view(b, s, b * p) - (lb @ rb).permute(0, 2, 1, 3).reshape(b, s, b * p)
        fit = max(0.0, (delta * delta_c).sum().item())
        # the ridge sits on the real input columns only (padded inputs are zero)
        return fit, self.problem.exact(fit, delta[..., : self.problem.shape[1]].square().sum().item())


def _top_subspace(g: torch.Tensor, kmax: int) -> tuple[torch.Tensor, bool, torch.Tensor]:
    """A basis of the top-``kmax`` singular subspace of every (s × p) matrix of the batch ``g``.

    From an eigendecomposition of the smaller Gram matrix (fp64; batched LAPACK SVD is 30-100×
    slower here on thousands of small tiles). Returns ``(basis, left, energy)``: the left
    singular vectors (s × kmax) when ``left``, else the right ones (p × kmax), and all squared
    singular values in descending order.
    """
    s, p = g.shape[-2:]
    left = s <= p
    gram = g @ g.transpose(-1, -2) if left else g.transpose(-1, -2) @ g
    with single_threaded():
        vals, vecs = torch.linalg.eigh(gram)
    return vecs.flip(-1)[..., :kmax], left, vals.flip(-1).clamp_min(0)


def _fit_weighted(problem: Problem, b: int, ranks: list[int], sweeps: int) -> dict[int, tuple[dict, float]]:
    out, inn = problem.shape
    s, p = -(-out // b), -(-inn // b)
    ctx = _Weighted(problem, b, s, p)
    g = ctx.tiles @ ctx.c_half[None]
    basis, left, _ = _top_subspace(g, max(ranks))
    # Start: the row space of every tile's C_jj-weighted rank-k projection U Uᵀ W_ij (its left
    # basis from Wᵢⱼ C_jj^½ V when the right one was computed; L is refitted exactly next).
    left_basis = basis if left else g @ basis
    result = {}
    for k in ranks:
        rb = left_basis[..., :k].transpose(-1, -2) @ ctx.tiles
        lb, proj = ctx.l_step(rb)
        best = (lb, rb, *ctx.squared_error(lb, rb, proj))  # (L, R, damped error, exact error)
        for _ in range(sweeps):
            rb = ctx.r_step(lb, rb, CG_ITERATIONS)
            lb, proj = ctx.l_step(rb)
            fit, exact = ctx.squared_error(lb, rb, proj)
            gain = best[2] - fit
            if fit < best[2]:
                best = (lb, rb, fit, exact)
            if gain < SWEEP_TOL * best[2]:
                break
        result[k] = (_to_layout(best[0], best[1]), best[3])
    return result


def _fit_frobenius(problem: Problem, b: int, ranks: list[int]) -> dict[int, tuple[dict, float]]:
    out, inn = problem.shape
    s, p = -(-out // b), -(-inn // b)
    tiles = _pad(problem.w, b * s, b * p).view(b, s, b, p).permute(0, 2, 1, 3)
    basis, left, energy = _top_subspace(tiles, max(ranks))
    result = {}
    for k in ranks:
        # The truncated SVD of every tile, as a projection onto its top-k singular subspace.
        if left:
            lb = basis[..., :k]
            rb = lb.transpose(-1, -2) @ tiles
        else:
            rb = basis[..., :k].transpose(-1, -2)
            lb = tiles @ basis[..., :k]
        result[k] = (_to_layout(lb, rb), energy[..., k:].sum().item())
    return result


def project_monarch(
    w: torch.Tensor, nblocks: int, rank: int, covariance: torch.Tensor | None = None, sweeps: int = MAX_SWEEPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Monarch factors ``(L, R)`` (fp64, module layout) approximating ``w`` (out × in).

    Args:
        w: the weight matrix.
        nblocks: tiles per side.
        rank: rank of every tile.
        covariance: input second moment C (in × in): minimise ``tr(ΔCΔᵀ)`` (module docstring);
            ``None``: the exact Frobenius optimum (per-tile truncated SVD).
        sweeps: alternating rounds of the weighted fit, at most (fewer when they stop gaining).

    Raises:
        ValueError: a block count or rank the shape cannot take.
    """
    config = MonarchConfig(nblocks, rank, covariance is not None)
    _check(config, *w.shape)
    problem = Problem(w.double(), None if covariance is None else covariance.double(), 1.0)
    if covariance is None:
        factors, _ = _fit_frobenius(problem, nblocks, [rank])[rank]
    else:
        factors, _ = _fit_weighted(problem, nblocks, [rank], sweeps)[rank]
    return factors["L"], factors["R"]


def _check(config: MonarchConfig, out: int, inn: int) -> None:
    b, k = config.nblocks, config.rank
    if b > min(out, inn):
        raise ValueError(f"nblocks={b} exceeds the smaller side of the {out}×{inn} weight; use at most {min(out, inn)}")
    s, p = config.tiles(out, inn)
    if k > min(s, p):
        raise ValueError(f"rank={k} exceeds the {s}×{p} tiles of nblocks={b}; use rank <= {min(s, p)}")


# ---- options --------------------------------------------------------------------------------


def _block_counts(out: int, inn: int) -> list[int]:
    """Two tile grids: a coarse one (4 × 4) and the paper's b ≈ √n (a divisor of both sides if one is near)."""
    small = min(out, inn)
    root = math.sqrt(small)
    near = [d for d in range(2, small + 1) if out % d == 0 and inn % d == 0 and root / 1.5 <= d <= root * 1.5]
    dao = min(near, key=lambda d: abs(math.log(d / root))) if near else max(2, round(root))
    return sorted({b for b in (4, dao) if 2 <= b <= small // 2})


def candidate_configs(out: int, inn: int) -> list[MonarchConfig]:
    """(nblocks, rank) options for an (out × in) weight storing at most ``MAX_RATIO`` of it.

    Ranks are powers of two below the tile size. Bytes and FLOPs depend on b·k only, so each
    block count spans the byte range on its own; the solver picks between grids by error.
    """
    configs = []
    for b in _block_counts(out, inn):
        s, p = -(-out // b), -(-inn // b)
        k = 1
        while k < min(s, p) and b * k * b * (s + p) <= MAX_RATIO * out * inn:
            configs.append(MonarchConfig(b, k))
            k *= 2
    return configs


class MonarchTransform(StructuredTransform):
    """The ``"monarch"`` transform."""

    name = "monarch"
    config_types = (MonarchConfig,)

    def grid(self, out: int, inn: int) -> tuple[list[TransformConfig], str | None]:
        configs = candidate_configs(out, inn)
        reason = None if configs else f"{out}×{inn} is too small for a Monarch option storing ≤ {MAX_RATIO} of it"
        return list(configs), reason

    def fit(self, problem: Problem, configs: list[TransformConfig]) -> list[Fit]:
        by_blocks: dict[int, list[int]] = {}
        for c in configs:
            by_blocks.setdefault(c.nblocks, []).append(c.rank)
        fits: dict[tuple[int, int], tuple[dict, float]] = {}
        for b, ranks in by_blocks.items():
            if problem.covariance is None:
                done = _fit_frobenius(problem, b, ranks)
            else:
                done = _fit_weighted(problem, b, ranks, MAX_SWEEPS)
            fits.update({(b, k): v for k, v in done.items()})
        return [Fit(c, *fits[(c.nblocks, c.rank)]) for c in configs]

    def factor_specs(self, config: TransformConfig, out: int, inn: int) -> dict[str, FactorSpec]:
        b, k = config.nblocks, config.rank
        s, p = config.tiles(out, inn)
        return {"L": FactorSpec((b, s, b * k)), "R": FactorSpec((b, k * b, p))}

    def check_fits(self, config: TransformConfig, out: int, inn: int) -> None:
        _check(config, out, inn)

    def build(self, factors: dict[str, Any], bias: Any, config: TransformConfig, out: int, inn: int) -> nn.Module:
        return MonarchLinear(factors["L"], factors["R"], bias, out, inn)

    def op_cost(self, config: TransformConfig, rows: int, out: int, inn: int, size: int) -> MatmulCost:
        from codegen.kernels.monarch import GEMV_MAX_ROWS

        b, k = config.nblocks, config.rank
        s, p = config.tiles(out, inn)
        params = b * k * b * (s + p)
        # two bmm's; activations: read x, write and read the b·b·k intermediate, transpose the output
        moved = params * size + size * rows * (b * p + 2 * b * b * k + 2 * out)
        # decomp::monarch_linear (GPU): one launch up to GEMV_MAX_ROWS rows (no intermediate in
        # memory), else the two stages with the permutation fused into the first's store
        if rows <= GEMV_MAX_ROWS:
            fused = MatmulCost(2 * rows * params, params * size + size * rows * (inn + out), 1)
        else:
            fused = MatmulCost(2 * rows * params, params * size + size * rows * (inn + 2 * b * b * k + out), 2)
        return MatmulCost(2 * rows * params, moved, 3 + (b * p != inn), fused)


register_transform(MonarchTransform())
