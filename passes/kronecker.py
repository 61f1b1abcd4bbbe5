"""Sums of Kronecker products, W ≈ Σₜ Aₜ ⊗ Bₜ, for Linear and Conv1D weights.

Where it sits: beside ``passes.monarch`` (same base, ``passes.structured_base``); the
``"kronecker"`` transform proposes factor shapes × numbers of terms per linear-like site and
rewrites the chosen ones into :class:`KroneckerLinear`, which stores the factors only and
applies ``(A ⊗ B) x = vec(A X Bᵀ)`` as two matmuls.

Shapes. A is ``a_out × a_in``, B is ``b_out × b_in`` with b_out = ⌈out / a_out⌉, b_in =
⌈in / a_in⌉; ``terms`` = r pairs are stored as ``A: (r, a_out, a_in)``, ``B: (r, b_out, b_in)``::

    W'[i1·b_out + i2, j1·b_in + j2] = Σ_t A[t, i1, j1] · B[t, i2, j2]      (then [:out, :in])

The options use factor sizes that divide the weight's sides; a side with no divisor near the
wanted size (a prime) is zero-padded, the padding is stored and counted, and the projection
then fits zeros in the padding as well (an upper bound on the error, priced exactly).

The projection (Van Loan & Pitsianis 1993). Rearranging W into ``R(W)`` of shape
(a_out·a_in) × (b_out·b_in), one row per (i1, j1) tile holding that tile's entries, turns
``Σ A ⊗ B`` into ``Σ vec(A) vec(B)ᵀ``: the truncated rank-r SVD of R(W) is the exact
Frobenius optimum, and one eigendecomposition prices every r. With calibration the output
error ``tr(ΔCΔᵀ)`` is no longer a function of R(W) alone (a dense C^½ mixes the factors), so
the factors are refined by alternating exact least squares on the full (damped, see
``passes.structured_base.Problem``) C, starting from the
Frobenius optimum: for fixed B the problem in A separates over the rows i1 of A with one
shared (r·a_in)² normal matrix ``H_A = Σ_{i2} (B_{·,i2,·} ⊗ I) C (…)ᵀ``, and symmetrically for
B. Each step is an exact minimiser, so the error never increases; a step costs ~r²·in²
multiply-adds, so the sweeps stop at :data:`ALS_MACS` per option, after :data:`MAX_SWEEPS`, or at
the first sweep gaining less than :data:`SWEEP_TOL`. The result is a local optimum (on tiny
random cases a many-start gradient search sometimes does better, ``benchmarks/structured.py``).
The priced error is the exact ``tr(ΔCΔᵀ)`` of the factors produced.
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
    "KroneckerConfig",
    "KroneckerLinear",
    "KroneckerTransform",
    "candidate_configs",
    "kronecker_dense",
    "kronecker_forward",
    "project_kronecker",
]

#: Alternating least-squares sweeps (an A step and a B step each) at most per option, ...
MAX_SWEEPS = 30
#: ... stopping at the first sweep that lowers the error by less than this fraction, ...
SWEEP_TOL = 0.01
#: ... and only as many as fit in this many multiply-adds (a step costs ~r²·in²).
ALS_MACS = 1 << 31
#: Options storing more than this fraction of the dense weight are not offered.
MAX_RATIO = 0.5


@register_config
@dataclass(frozen=True)
class KroneckerConfig(TransformConfig):
    """Store a weight as ``Σ_{t < terms} A_t ⊗ B_t`` with A of ``a_out × a_in``.

    Attributes:
        a_out: rows of every A (B has ⌈out / a_out⌉).
        a_in: columns of every A (B has ⌈in / a_in⌉).
        terms: number of Kronecker products summed.
        activation_aware: fit the output error on the calibration inputs (needs calibration);
            False is the closed-form Frobenius projection.

    Expected error: on pretrained weights well above low-rank of the same bytes (their
    rearrangements have flat spectra). SmolLM2 layer 5 at a quarter of the bytes (A of 4 × 4,
    4 terms), relative output error: q_proj 0.13 vs low-rank's 0.065, o_proj 0.29 vs 0.16,
    up_proj 0.52 vs 0.36, down_proj 0.45 vs 0.40. Exact on weights that are such sums.
    """

    family: ClassVar[str] = "kronecker"
    a_out: int
    a_in: int
    terms: int = 1
    activation_aware: bool = True

    def __post_init__(self):
        for name in ("a_out", "a_in", "terms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KroneckerConfig.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.activation_aware, bool):
            raise TypeError(f"KroneckerConfig.activation_aware must be a bool, got {self.activation_aware!r}")

    def describe(self) -> str:
        aware = "" if self.activation_aware else " (svd)"
        return f"kronecker {self.a_out}x{self.a_in} r={self.terms}{aware}"

    def b_shape(self, out: int, inn: int) -> tuple[int, int]:
        """``(b_out, b_in)`` for an (out × in) weight."""
        return -(-out // self.a_out), -(-inn // self.a_in)


# ---- the module ---------------------------------------------------------------------------


def kronecker_forward(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, out_features: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x ↦ x W'ᵀ + bias`` with ``W' = Σ_t A_t ⊗ B_t`` (rows of x reshaped to a_in × b_in)."""
    r, a_out, a_in = A.shape
    b_out, b_in = B.shape[1:]
    lead, n_in = x.shape[:-1], x.shape[-1]
    x = x.reshape(-1, n_in)
    if n_in < a_in * b_in:
        x = F.pad(x, (0, a_in * b_in - n_in))
    n = x.shape[0]
    z = (x.reshape(n * a_in, b_in) @ B.reshape(r * b_out, b_in).t()).reshape(n, a_in, r, b_out)
    z = z.permute(0, 3, 2, 1).reshape(n * b_out, r * a_in)  # [(n, i2), (t, j1)]
    y = (z @ A.permute(0, 2, 1).reshape(r * a_in, a_out)).reshape(n, b_out, a_out)
    y = y.transpose(1, 2).reshape(n, a_out * b_out)[:, :out_features]
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, out_features)


def kronecker_dense(A: torch.Tensor, B: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The (out × in) matrix ``kronecker_forward`` applies."""
    _, a_out, a_in = A.shape
    b_out, b_in = B.shape[1:]
    w = torch.einsum("tij,tkl->ikjl", A, B).reshape(a_out * b_out, a_in * b_in)
    return w[:out_features, :in_features]


class KroneckerLinear(nn.Module):
    """A Linear (or GPT-2 Conv1D) whose weight is a sum of Kronecker products; stores ``A``, ``B`` only."""

    def __init__(self, A: nn.Parameter, B: nn.Parameter, bias: nn.Parameter | None, out_features: int, in_features: int):
        super().__init__()
        if A.shape[0] != B.shape[0] or A.shape[1] * B.shape[1] < out_features or A.shape[2] * B.shape[2] < in_features:
            raise ValueError(f"Kronecker factors A {tuple(A.shape)}, B {tuple(B.shape)} do not fit {out_features}×{in_features}")
        self.A = A
        self.B = B
        self.bias = bias
        self.out_features = out_features
        self.in_features = in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if dispatch.use_kernels(x, self.A, self.B, self.bias):
            return dispatch.kronecker_linear(x, self.A, self.B, self.out_features, self.bias)
        return kronecker_forward(x, self.A, self.B, self.out_features, self.bias)

    def dense(self) -> torch.Tensor:
        """The materialised (out × in) weight."""
        return kronecker_dense(self.A, self.B, self.out_features, self.in_features)

    def extra_repr(self) -> str:
        r, a_out, a_in = self.A.shape
        return (
            f"in={self.in_features}, out={self.out_features}, A={a_out}x{a_in}, B={self.B.shape[1]}x{self.B.shape[2]}, "
            f"terms={r}, bias={self.bias is not None}"
        )


# ---- the projection -------------------------------------------------------------------------


def _balanced(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Give every term's two factors equal norms (W' unchanged; better conditioned for training)."""
    na, nb = a.flatten(1).norm(dim=1), b.flatten(1).norm(dim=1)
    alpha = torch.where((na > 0) & (nb > 0), (nb / na.clamp_min(1e-300)).sqrt(), torch.ones_like(na))
    return {"A": (a * alpha[:, None, None]).contiguous(), "B": (b / alpha[:, None, None]).contiguous()}


def _rearranged(w: torch.Tensor, a_out: int, a_in: int, b_out: int, b_in: int) -> torch.Tensor:
    wp = F.pad(w, (0, a_in * b_in - w.shape[1], 0, a_out * b_out - w.shape[0]))
    return wp.view(a_out, b_out, a_in, b_in).permute(0, 2, 1, 3).reshape(a_out * a_in, b_out * b_in)


def _frobenius(w: torch.Tensor, config: KroneckerConfig, ranks: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor, float]]:
    """Van Loan–Pitsianis: truncated SVD of the rearrangement, for every r in ``ranks``."""
    a_out, a_in = config.a_out, config.a_in
    b_out, b_in = config.b_shape(*w.shape)
    rw = _rearranged(w, a_out, a_in, b_out, b_in)
    left = rw.shape[0] <= rw.shape[1]
    gram = rw @ rw.T if left else rw.T @ rw
    with single_threaded():
        vals, vecs = torch.linalg.eigh(gram)
    energy, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)
    result = {}
    for r in ranks:
        basis = vecs[:, :r]
        if left:  # vec(A_t) = u_t, vec(B_t) = u_tᵀ R(W)
            a, b = basis.T, basis.T @ rw
        else:
            a, b = (rw @ basis).T, basis.T
        # The padding (zeros) is fitted too; the error that counts is on the real entries.
        pad_free = a_out * b_out == w.shape[0] and a_in * b_in == w.shape[1]
        a, b = a.reshape(r, a_out, a_in), b.reshape(r, b_out, b_in)
        if pad_free:  # Eckart–Young: the discarded spectrum
            err = energy[r:].sum().item()
        else:
            err = (w - kronecker_dense(a, b, *w.shape)).square().sum().item()
        result[r] = (a, b, err)
    return result


class _Als:
    """Alternating exact least squares for ``tr(ΔCΔᵀ)`` over Kronecker sums of one factor shape."""

    def __init__(self, problem: Problem, config: KroneckerConfig):
        out, inn = problem.shape
        self.a_out, self.a_in = config.a_out, config.a_in
        self.b_out, self.b_in = config.b_shape(out, inn)
        n_pad = self.a_in * self.b_in
        c = problem.fit_covariance  # the damped C (see passes.structured_base.Problem)
        self.c4 = F.pad(c, (0, n_pad - inn, 0, n_pad - inn)).view(self.a_in, self.b_in, self.a_in, self.b_in)
        wc = F.pad(problem.fit_wc, (0, n_pad - inn, 0, self.a_out * self.b_out - out))
        self.wc4 = wc.view(self.a_out, self.b_out, self.a_in, self.b_in)
        self.total = (problem.w * problem.fit_wc).sum().item()

    @staticmethod
    def _solve(h: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        ridge = 1e-12 * h.diagonal().mean().clamp_min(1e-300)
        with single_threaded():
            return torch.linalg.solve(h + ridge * torch.eye(h.shape[0], dtype=h.dtype), rhs)

    def a_step(self, b: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Optimal A for fixed B, and the exact error of the pair."""
        r = b.shape[0]
        k = torch.einsum("tij,uik->tujk", b, b)  # Σ_i2 B_t[i2, j2] B_u[i2, j2']
        h = torch.einsum("tujk,ajbk->taub", k, self.c4).reshape(r * self.a_in, r * self.a_in)
        rhs = torch.einsum("ikjl,tkl->tji", self.wc4, b).reshape(r * self.a_in, self.a_out)
        sol = self._solve(h, rhs)  # [(t, j1), i1]
        a = sol.view(r, self.a_in, self.a_out).transpose(1, 2).contiguous()
        return a, self._error(sol, h, rhs)

    def b_step(self, a: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Optimal B for fixed A, and the exact error of the pair."""
        r = a.shape[0]
        k = torch.einsum("tij,uik->tujk", a, a)  # Σ_i1 A_t[i1, j1] A_u[i1, j1']
        h = torch.einsum("tujk,ajbk->taub", k, self.c4.permute(1, 0, 3, 2)).reshape(r * self.b_in, r * self.b_in)
        rhs = torch.einsum("ikjl,tij->tlk", self.wc4, a).reshape(r * self.b_in, self.b_out)
        sol = self._solve(h, rhs)  # [(t, j2), i2]
        b = sol.view(r, self.b_in, self.b_out).transpose(1, 2).contiguous()
        return b, self._error(sol, h, rhs)

    def _error(self, sol: torch.Tensor, h: torch.Tensor, rhs: torch.Tensor) -> float:
        # tr(WCWᵀ) − 2⟨W', WC⟩ + tr(W'CW'ᵀ), each term exact for the factors (fp64)
        return max(0.0, self.total - 2 * (sol * rhs).sum().item() + (sol * (h @ sol)).sum().item())


def _weighted(problem: Problem, config: KroneckerConfig, ranks: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor, float]]:
    start = _frobenius(problem.w, config, ranks)
    als = _Als(problem, config)
    result = {}
    for r in ranks:
        a, b, _ = start[r]
        step_macs = r * r * als.a_in * als.b_in * (als.a_in * als.b_in)
        steps = min(2 * MAX_SWEEPS, max(1, ALS_MACS // max(step_macs, 1)))
        best, last_sweep = None, math.inf
        for step in range(steps):
            if step % 2 == 0:
                a, err = als.a_step(b)
            else:
                b, err = als.b_step(a)
            if best is None or err < best[2]:
                best = (a, b, err)
            if step % 2 == 1:
                if last_sweep - best[2] < SWEEP_TOL * best[2]:
                    break
                last_sweep = best[2]
        dense = kronecker_dense(best[0], best[1], *problem.shape)
        if als.a_out * als.b_out != problem.shape[0]:
            # Padded output rows were fitted (to zeros) too: price the real rows exactly.
            best = (best[0], best[1], problem.squared_error(dense))
        else:  # damped -> exact: tr(ΔCΔᵀ) = tr(ΔC_fΔᵀ) − δ‖Δ‖²
            best = (best[0], best[1], problem.exact(best[2], (problem.w - dense).square().sum().item()))
        result[r] = best
    return result


def project_kronecker(
    w: torch.Tensor, a_shape: tuple[int, int], terms: int, covariance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(A, B)`` (fp64) of ``Σ_t A_t ⊗ B_t ≈ w`` with A of ``a_shape``.

    Without ``covariance`` the exact Frobenius optimum; with it, refined on ``tr(ΔCΔᵀ)``
    (module docstring).
    """
    config = KroneckerConfig(*a_shape, terms, covariance is not None)
    _check(config, *w.shape)
    w = w.double()
    if covariance is None:
        a, b, _ = _frobenius(w, config, [terms])[terms]
    else:
        a, b, _ = _weighted(Problem(w, covariance.double(), 1.0), config, [terms])[terms]
    factors = _balanced(a, b)
    return factors["A"], factors["B"]


def _check(config: KroneckerConfig, out: int, inn: int) -> None:
    if config.a_out > out or config.a_in > inn:
        raise ValueError(f"A of {config.a_out}×{config.a_in} does not fit a {out}×{inn} weight")
    b_out, b_in = config.b_shape(out, inn)
    most = min(config.a_out * config.a_in, b_out * b_in)
    if config.terms > most:
        raise ValueError(f"terms={config.terms} exceeds the rank of the rearranged weight; use terms <= {most}")


# ---- options --------------------------------------------------------------------------------


def _near_divisor(n: int, target: float) -> int:
    """A divisor of n within a factor 2 of ``target``, the closest; else round(target) (padding)."""
    near = [d for d in range(1, n + 1) if n % d == 0 and target / 2 <= d <= target * 2]
    return min(near, key=lambda d: abs(math.log(d / target))) if near else max(1, round(target))


def candidate_configs(out: int, inn: int) -> list[KroneckerConfig]:
    """Factor shapes × term counts storing at most :data:`MAX_RATIO` of an (out × in) weight.

    Two shapes: balanced (A ≈ √out × √in, so A and B are alike) with 1, 4, 16, 64, … terms,
    and coarse (A of 4 × 4: the 16 tiles of W are combinations of ``terms`` shared tiles)
    with 1, 2, 4, … terms.
    """
    if min(out, inn) < 4:
        return []
    shapes = [((_near_divisor(out, math.sqrt(out)), _near_divisor(inn, math.sqrt(inn))), 4), ((4, 4), 2)]
    configs = []
    for (a_out, a_in), growth in shapes:
        config = KroneckerConfig(a_out, a_in, 1)
        b_out, b_in = config.b_shape(out, inn)
        per_term = a_out * a_in + b_out * b_in
        most = min(a_out * a_in, b_out * b_in)
        r = 1
        while r < most and r * per_term <= MAX_RATIO * out * inn:
            configs.append(KroneckerConfig(a_out, a_in, r))
            r *= growth
    return list(dict.fromkeys(configs))


class KroneckerTransform(StructuredTransform):
    """The ``"kronecker"`` transform."""

    name = "kronecker"
    config_types = (KroneckerConfig,)

    def grid(self, out: int, inn: int) -> tuple[list[TransformConfig], str | None]:
        configs = candidate_configs(out, inn)
        return list(configs), None if configs else f"{out}×{inn} is too small for a Kronecker option storing ≤ {MAX_RATIO} of it"

    def fit(self, problem: Problem, configs: list[TransformConfig]) -> list[Fit]:
        by_shape: dict[tuple[int, int], list[int]] = {}
        for c in configs:
            by_shape.setdefault((c.a_out, c.a_in), []).append(c.terms)
        fits = {}
        for (a_out, a_in), ranks in by_shape.items():
            shape_config = KroneckerConfig(a_out, a_in, 1)
            done = (
                _frobenius(problem.w, shape_config, ranks)
                if problem.covariance is None
                else _weighted(problem, shape_config, ranks)
            )
            fits.update({(a_out, a_in, r): v for r, v in done.items()})
        result = []
        for c in configs:
            a, b, err = fits[(c.a_out, c.a_in, c.terms)]
            result.append(Fit(c, _balanced(a, b), err))
        return result

    def factor_specs(self, config: TransformConfig, out: int, inn: int) -> dict[str, FactorSpec]:
        b_out, b_in = config.b_shape(out, inn)
        return {"A": FactorSpec((config.terms, config.a_out, config.a_in)), "B": FactorSpec((config.terms, b_out, b_in))}

    def check_fits(self, config: TransformConfig, out: int, inn: int) -> None:
        _check(config, out, inn)

    def build(self, factors: dict[str, Any], bias: Any, config: TransformConfig, out: int, inn: int) -> nn.Module:
        return KroneckerLinear(factors["A"], factors["B"], bias, out, inn)

    def op_cost(self, config: TransformConfig, rows: int, out: int, inn: int, size: int) -> MatmulCost:
        r, a_out, a_in = config.terms, config.a_out, config.a_in
        b_out, b_in = config.b_shape(out, inn)
        flops = 2 * rows * r * (a_in * b_in * b_out + b_out * a_in * a_out)
        weight = r * (a_out * a_in + b_out * b_in) * size
        moved = weight + size * rows * (a_in * b_in + 3 * a_in * r * b_out + 2 * a_out * b_out)
        # decomp::kronecker_linear (GPU): one launch, both products on chip, for input matrices that
        # fit its register tile (larger ones run the torch path there too)
        from codegen.kernels.kronecker import fits

        fused = MatmulCost(flops, weight + size * rows * (inn + out), 1) if fits(a_in, b_in) else None
        return MatmulCost(flops, moved, 4, fused)


register_transform(KroneckerTransform())
