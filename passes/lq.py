"""Low-rank + quantized weights, W ≈ Q + L1·L2 (LQ-LoRA), for Linear, Conv1D and Embedding weights.

Where it sits: after capture and (optional) calibration, beside ``passes.lowrank`` and
``passes.quantize``; proposes a small grid of (rank, storage format) options per site and
rewrites the chosen modules into :class:`LQLinear` / :class:`LQEmbedding`. Q is stored as a
:class:`~passes.quant_storage.PackedWeight` in one of ``passes.quant_storage``'s formats
(packed codes and constants; groups run along the input / embedding dimension), the factors
L1 (out × r) and L2 (r × in) as Parameters in the weight's dtype; a tied table and its head
share one PackedWeight and one pair of factors. Stored bytes, exactly:
``format.nbytes(out, in) + r·(out + in)·itemsize``. 1×1 Conv2d sites get no candidates (no
quantized conv module is written yet; ``passes.lowrank`` still handles them).

The math (Guo et al. 2023, "LQ-LoRA"): alternating minimisation of the error of
``W − (Q + L)`` over a quantized Q and a rank-r L, keeping the best iterate::

    L⁰ = best rank-r approximation of W
    for t = 1 … T:   Qᵗ = quant(W − Lᵗ⁻¹)          (round-to-nearest: ``format.roundtrip``)
                     Lᵗ = best rank-r approximation of R = W − Qᵗ

The paper starts from L⁰ = 0; starting from W's own rank-r approximation is as good or
better on SmolLM2 (layer 5, int3/int2/nf4 × r 8–64: lower error in 31 of 36 cases, the rest
within 11%), and far better where W has a strong low-rank part (there Q = quant(W) spends
its range on that part and the iteration never recovers: 100× the error at int3, rank 16).

"Best" is in the error that is priced (below). With calibration, for a linear use with input
second moment C, the rank-r step is ``passes.lowrank``'s output-space projection applied to R:
L = U_r U_rᵀ R with U_r the top-r eigenvectors of R C Rᵀ — the exact minimiser of
tr((R − L) C (R − L)ᵀ) over rank r; no inverse of C appears, so a singular C is harmless.
A lookup-only table is projected on the embedding side instead, L = R V_r V_rᵀ with V_r the
top eigenvectors of Rᵀ D R, D = lookups + 1 (exact for the lookups, as lowrank's table
path). A table tied to an output head follows the head (output-space projection with the
head's C) and prices its lookups exactly beside it: on SmolLM2 the head carries 83% of the
tied table's int3 error, and this reaches 0.128 where the D-weighted embedding-side
projection reaches 0.230 (int3 g64 + rank 16, one iteration). Without calibration, C = I:
plain truncated SVD of W − Q.

The rank-r step is computed by block subspace iteration (``_refine``: one product with
R C Rᵀ, then Rayleigh–Ritz, on r + 8 vectors) warm-started from the previous iterate's
basis; L⁰'s basis comes from six such products from a seeded Gaussian block, once per site.
(A second product per step changed no error by more than 0.1% on SmolLM2.) A full fp64
eigendecomposition per step, as lowrank's ``_output_basis`` does once, would cost 40 ms at
576 × 576, 48 times per site. The iteration converges to the same U_r, and what is recorded
is the exact error of the factors produced, so an unconverged step can make an option look
worse, never better, than it is. (This mirrors ``passes.lowrank._output_basis``; a transform
may not import another, so the shared primitive is a candidate for a common module.)

Round-to-nearest is not the minimiser of the weighted error given L (nor are its group
constants), so the raw alternation can increase the error: on random 96 × 320 matrices it
rose at some iteration in 74 of 180 eight-iteration runs, in 4 of them within the three
iterations used here. Each option therefore keeps its best iterate; its best-so-far error
is non-increasing by construction (tested).

Error (the shared unit the solver adds across sites and families): exactly
``cost_model.perturbation_error(site, stats, W, W − (dequant(Q) + L1·L2))`` — predicted loss
increase ``½ · Σ sensitivity · output error`` with sensitivities, relative output error
without them, relative weight error without calibration — computed from the iterate:
with P = U_r U_rᵀ and X = R, the output error is ``Σ ((I − P) X) ⊙ ((I − P) X C)``, so each
iteration costs one ``out·in²`` product X·C and thin ones. Rounding the factors to a 16-bit weight
dtype is not priced (relative ~2⁻⁹ of L, orders below Q's error).

The grid (each option costs up to T quantizations and rank steps) is ranks {8, 16, 32, 64}
× int4/int3 g64 (g32 below 64 columns), only options storing fewer bytes than int8
per-channel (:func:`candidate_configs`). Left out, measured on SmolLM2 layer 5: int2 (int2 +
rank 8/16 had 1.1–4.9× the error of plain int3 g64/g128 storing at most 7% more, and
3.5–4.7× that of an int3 option here within 3% of its bytes) and NF4 (0.80–1.04× int4's
error at 0.95× its bytes: a near duplicate whose round trip costs 10× int4's). Iterations
per site: see :data:`ITERATION_MACS`.

Cost (one thread, SmolLM2 layer 5, all options of a site): 576 × 576 0.14 s (5 options),
192 × 576 0.04 s (3), 1536 × 576 0.4 s (6), 576 × 1536 0.35 s (6, one iteration), the tied
49152 × 576 table 20 s (7, one iteration each): about 65 s for the whole model. With two
threads on a machine whose cores are busy, threaded BLAS on the thin k-column matrices is
up to 10⁴× slower (a 96 × 24 QR: 0.3 s instead of 0.02 ms); the numbers above assume
an idle core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from codegen import dispatch
from cost_model import MatmulCost, SiteStats, matmul_cost
from ir import UseKind, WeightSite
from passes.config import TransformConfig, register_config
from passes.quant_storage import BITS, GROUP_SIZES, Int8Config, IntNConfig, NF4Config, PackedWeight, QuantConfig, gpu_weight_bytes
from passes.transform import Candidate, Transform, Workspace, register_transform, replace_module

__all__ = ["Alternation", "LQConfig", "LQEmbedding", "LQLinear", "LQTransform", "alternate", "candidate_configs"]

#: Ranks offered (those that keep the option smaller than the dense weight).
RANKS = (8, 16, 32, 64)
#: Storage formats of Q offered, as (bits, nf4): int4 and int3 g64 (module docstring: why not
#: int2 or NF4; both remain valid configs).
FORMATS = ((4, False), (3, False))
#: Alternating-minimisation iterations per option, at most; each costs one out·in² product
#: X·C, and a site runs only as many (≥ 1) as fit in ITERATION_MACS multiply-adds per option.
ITERATIONS = 3
ITERATION_MACS = 1 << 31
_OVERSAMPLE = 8  # extra basis vectors carried by the subspace iteration
_POWER_STEPS = 1  # products with R C Rᵀ per warm-started rank step (2 changed no error by > 0.1%)
_INIT_STEPS = 6  # products with W C Wᵀ from the random start (once per site)


@register_config
@dataclass(frozen=True)
class LQConfig(TransformConfig):
    """Store a weight as a quantized Q plus a rank-``rank`` correction L1·L2.

    Attributes:
        rank: inner dimension r of L1 (out × r) and L2 (r × in), stored in the weight's dtype.
        bits: code width of Q, one of (2, 3, 4); must be 4 with ``nf4``.
        group_size: input columns per quantization group, one of (32, 64, 128).
        nf4: Q in NormalFloat-4 (``NF4Config``) instead of asymmetric intN (``IntNConfig``).
        double_quant: store Q's constants double-quantized (uint8 + fp32 per 256).
        activation_aware: fit L to the calibration inputs (needs calibration); False fits
            it by plain truncated SVD of W − Q.

    Expected error: below both of its parts alone. On a 256 × 512 weight with a strong
    rank-16 part plus noise (the tests) int3 g64 + rank 16 reaches SQNR 35.8 dB, where int3
    g64 alone gets 14.4 dB and rank 16 alone 20.5 dB. On pretrained weights the rank-r part
    removes the top of the quantization error's activation-weighted spectrum: on SmolLM2
    layer 5, int3 g64 + rank 8 has 0.31× (k_proj) to 0.89× (down_proj) the error of int3
    g64 alone, + rank 32 0.18× (q_proj) to 0.69× (down_proj); on the tied table 0.19× and
    0.12× (int3 alone: 0.85 predicted nats per token there).
    """

    family: ClassVar[str] = "lq"
    rank: int
    bits: int
    group_size: int
    nf4: bool = False
    double_quant: bool = False
    activation_aware: bool = True

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LQConfig.rank must be an int >= 1, got {self.rank!r}")
        for name, value, valid in (("bits", self.bits, BITS), ("group_size", self.group_size, GROUP_SIZES)):
            if isinstance(value, bool) or not isinstance(value, int) or value not in valid:
                raise ValueError(f"LQConfig.{name} must be one of {valid}, got {value!r}")
        for name in ("nf4", "double_quant", "activation_aware"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LQConfig.{name} must be one of (False, True), got {getattr(self, name)!r}")
        if self.nf4 and self.bits != 4:
            raise ValueError(f"LQConfig.bits must be 4 with nf4=True (NF4 has 4-bit codes), got {self.bits}")

    def storage(self) -> QuantConfig:
        """The format Q is stored in."""
        if self.nf4:
            return NF4Config(self.group_size, self.double_quant)
        return IntNConfig(self.bits, self.group_size, self.double_quant)

    def nbytes(self, out: int, inn: int, itemsize: int) -> int:
        """Exact stored bytes: Q's buffers plus both factors."""
        return self.storage().nbytes(out, inn) + self.rank * (out + inn) * itemsize

    def describe(self) -> str:
        return f"lq r={self.rank} + {self.storage().describe()}" + ("" if self.activation_aware else " (svd)")


class LQLinear(nn.Module):
    """``y = x·dequant(Q)ᵀ + (x·downᵀ)·upᵀ + bias`` (a Linear or GPT-2 Conv1D)."""

    def __init__(self, packed: PackedWeight, down: nn.Parameter, up: nn.Parameter, bias: nn.Parameter | None):
        super().__init__()
        self.packed = packed
        self.down = down  # L2: (r, in)
        self.up = up  # L1: (out, r)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if dispatch.use_kernels(x, self.down, self.up, self.bias):
            return dispatch.quant_linear(x, self.packed, self.bias, self.down, self.up)  # dequant + low-rank kernel
        return F.linear(x, self.packed.dequantize(dtype=x.dtype), self.bias) + F.linear(F.linear(x, self.down), self.up)

    def extra_repr(self) -> str:
        return f"rank={self.down.shape[0]}, bias={self.bias is not None}"


class LQEmbedding(nn.Module):
    """``table[ids] = dequant(Q)[ids] + left[ids] · right``; only looked-up rows are unpacked."""

    def __init__(self, packed: PackedWeight, left: nn.Parameter, right: nn.Parameter, padding_idx: int | None):
        super().__init__()
        self.packed = packed
        self.left = left  # L1: (num, r)
        self.right = right  # L2: (r, dim)
        self.padding_idx = padding_idx  # kept for reference; the table has no gradient to mask

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self.packed.dequantize(rows=flat) + F.embedding(flat, self.left) @ self.right
        return rows.view(*ids.shape, -1)


def candidate_configs(out_features: int, in_features: int, itemsize: int, activation_aware: bool) -> list[LQConfig]:
    """The grid: ranks :data:`RANKS` × :data:`FORMATS` at group 64 (32 below 64 columns).

    An option is offered only when it stores fewer bytes than int8 per-channel would
    (``out·in + 2·out``, itself below dense): at that size int8's ~42 dB SQNR beats every
    3–4-bit + rank option on weights that are not nearly low-rank (on SmolLM2 layer 5 the
    best of them, int4 + rank 64 on q_proj, has 12× int8's error).
    """
    g = 64 if in_features >= 64 else 32
    limit = min(out_features * in_features * itemsize, Int8Config().nbytes(out_features, in_features))
    configs = [LQConfig(r, bits, g, nf4, False, activation_aware) for r in RANKS for bits, nf4 in FORMATS]
    return [c for c in configs if c.nbytes(out_features, in_features, itemsize) < limit]


# ---- the alternation ------------------------------------------------------------------------


@dataclass
class _Problem:
    """A site's weight and the weighted norm its rank-r step minimises.

    The step works on X = R (``input_space`` False: output-space basis, out × k) or X = Rᵀ
    (True: embedding-side basis, in × k) with the error ``scale · tr(ΔX K ΔXᵀ)``: K = C
    (in × in), the lookup weights D (a vector), or the identity (``k`` None). A tied table's
    lookups are priced beside its head's C (``lookups``: normalised D and coefficient).
    """

    w: torch.Tensor  # (out, in) fp32
    input_space: bool
    k: torch.Tensor | None
    scale: float
    lookups: tuple[torch.Tensor, float] | None = None

    def orient(self, m: torch.Tensor) -> torch.Tensor:
        return m.T if self.input_space else m

    def weigh(self, x: torch.Tensor) -> torch.Tensor:
        """X·K."""
        if self.k is None:
            return x
        return x * self.k if self.input_space else x @ self.k

    def quadratic(self, z: torch.Tensor) -> torch.Tensor:
        """zᵀ K z."""
        if self.k is None:
            return z.T @ z
        return z.T @ (z * self.k[:, None]) if self.input_space else z.T @ (self.k @ z)

    def error(self, delta: torch.Tensor, xk: torch.Tensor, u: torch.Tensor) -> float:
        """Exact error of W − Q − L from ``delta`` = (I − P)·X, X·K and the basis of P = U Uᵀ."""
        if self.k is None:
            delta_k = delta
        elif self.input_space:
            delta_k = delta * self.k
        else:  # (I − P)·X·C without a second out·in² product; both factors small, no cancellation
            delta_k = xk - u @ (u.T @ xk)
        # Row sums in fp32 (cascaded, ~1e-7 relative), the total in fp64.
        err = self.scale * (delta * delta_k).sum(1).double().sum().item()
        if self.lookups is not None:
            d, coef = self.lookups
            err += coef * (d @ delta.square().sum(1).double()).item()
        # A (semi-definite) quadratic form summed in fp32 rows can land a rounding below zero
        # when the residual is ~0 (e.g. a tiny pooler layer fully captured by its rank).
        return max(err, 0.0)


def _problem(site: WeightSite, w: torch.Tensor, stats: SiteStats | None) -> _Problem:
    """The same parts, scales and normalisers as ``cost_model.perturbation_error``."""
    w = w.float()
    w64 = w.double()
    if stats is None:
        return _Problem(w, False, None, 1.0 / max(w64.square().sum().item(), 1e-300))
    linears = [u for u in site.uses if u.kind is not UseKind.EMBEDDING]
    lookups = [u for u in site.uses if u.kind is UseKind.EMBEDDING]
    sens = stats.sensitivity
    parts = {}
    if linears and stats.covariance is not None:
        c = stats.covariance.to(w.device, torch.float64)
        if sens:
            coef = 0.5 * sum(sens.get(u.module, 0.0) for u in linears)
        else:
            coef = 1.0 / max(((w64 @ c) * w64).sum().item(), 1e-300)
        parts["linear"] = (c, coef)
    if lookups and stats.token_counts is not None:
        d = stats.token_counts.to(w.device, torch.float64) + 1.0
        d = d / d.sum()
        if sens:
            coef = 0.5 * sum(sens.get(u.module, 0.0) for u in lookups)
        else:
            coef = 1.0 / max((d @ w64.square().sum(1)).item(), 1e-300)
        parts["lookup"] = (d, coef)
    if not parts:  # nothing measured: perturbation_error is 0 as well
        return _Problem(w, False, None, 0.0)
    if "linear" in parts:  # a tied table follows its head (module docstring)
        (c, coef), extra = parts["linear"], parts.get("lookup")
        return _Problem(w, False, c.float(), coef, extra)
    d, coef = parts["lookup"]
    return _Problem(w, True, d.float(), coef)


def _refine(p: _Problem, x: torch.Tensor, xk: torch.Tensor, u: torch.Tensor, steps: int):
    """Block subspace iteration on M = X K Xᵀ (= xk·xᵀ) from ``u``, then Rayleigh–Ritz.

    Returns ``(u, z)``: an orthonormal basis of the same width, columns by decreasing Ritz
    value, and ``z = Xᵀ u`` (so that ``uᵀ X = zᵀ`` costs nothing more).
    """
    for _ in range(steps):
        u = torch.linalg.qr(xk @ (x.T @ u)).Q
    z = x.T @ u
    ritz = p.quadratic(z).double()  # uᵀ M u = zᵀ K z
    _, vecs = torch.linalg.eigh((ritz + ritz.T) / 2)
    vecs = vecs.flip(1).to(u.dtype)
    return u @ vecs, z @ vecs


@dataclass
class Alternation:
    """One option's alternating minimisation.

    Attributes:
        errors: the error after each iteration (shared unit), raw.
        best: index of the best iterate (the first of equal ones).
        quant_input: W − Lᵗ⁻¹ of the best iterate t (what Q encodes), (out, in) fp32.
        up, down: the best iterate's L1 (out × r) and L2 (r × in), fp32.
    """

    errors: list[float]
    best: int
    quant_input: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    @property
    def best_so_far(self) -> list[float]:
        return [min(self.errors[: i + 1]) for i in range(len(self.errors))]


def _start_basis(p: _Problem, width: int) -> torch.Tensor:
    """Top-``width`` basis of W's own weighted matrix, from a seeded Gaussian block."""
    x = p.orient(p.w)
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(x.shape[0], min(width, x.shape[0]), generator=g).to(x.device)).Q
    return _refine(p, x, p.weigh(x), u, _INIT_STEPS)[0]


def alternate(p: _Problem, storage: QuantConfig, rank: int, basis: torch.Tensor, iterations: int = ITERATIONS) -> Alternation:
    """Run the alternation for one option from W's basis ``basis`` (≥ rank + oversampling wide)."""
    u = basis[:, : min(rank + _OVERSAMPLE, basis.shape[1])]
    x = p.orient(p.w)
    quant_input = p.w - p.orient(u[:, :rank] @ (u[:, :rank].T @ x))  # W − L⁰
    errors: list[float] = []
    best = None
    for t in range(iterations):
        q = storage.roundtrip(quant_input)
        x = p.orient(p.w - q)  # R = W − Q
        xk = p.weigh(x)
        u, z = _refine(p, x, xk, u, _POWER_STEPS)
        ur, coef = u[:, :rank], z[:, :rank].T  # coef = U_rᵀ X
        delta = x - ur @ coef  # (I − P)·X, i.e. W − Q − L
        err = p.error(delta, xk, ur)
        errors.append(err)
        if best is None or err < errors[best[0]]:
            best = (len(errors) - 1, quant_input, ur, coef)
        if t + 1 < iterations:
            quant_input = q + p.orient(delta)  # W − Lᵗ = Q + (R − L)
    index, quant_input, ur, coef = best
    if p.input_space:  # L = R V Vᵀ: L1 = R V, L2 = Vᵀ
        up, down = coef.T, ur.T
    else:  # L = U Uᵀ R: L1 = U, L2 = Uᵀ R
        up, down = ur, coef
    return Alternation(errors, index, quant_input, up.contiguous(), down.contiguous())


def _iterations(site: WeightSite) -> int:
    # SmolLM2: q/k/v/o and gate/up run 3, down_proj (576 × 1536: 1.4e9 per product) and the
    # tied 49152 × 576 table 1. Iterations 2–3 lowered the error by 4–12% on layer 5.
    out, inn = site.matrix_shape
    return max(1, min(ITERATIONS, ITERATION_MACS // (out * inn * inn)))


# ---- the transform --------------------------------------------------------------------------


class LQTransform(Transform):
    """The ``"lq"`` transform: one candidate per option of :func:`candidate_configs` that saves bytes."""

    name = "lq"
    config_types = (LQConfig,)

    def candidates(self, site: WeightSite, model: nn.Module, ws: Workspace) -> list[Candidate]:
        if not self._supported(site, model):
            return []
        out, inn = site.matrix_shape
        size = site.nbytes // site.numel
        aware = ws.stats is not None
        configs = self._grid(site, aware)
        if not configs:
            return []
        p = self._problem(site, model, ws, aware)
        basis = _start_basis(p, self._basis_width(site, configs[0]))
        result = []
        for config in configs:
            error = min(alternate(p, config.storage(), config.rank, basis, _iterations(site)).errors)
            if math.isfinite(error):  # fp16 constants overflow past 65504: not an option then
                nbytes = config.nbytes(out, inn, size)
                result.append(Candidate(config, nbytes, error, self._cost(site, config, nbytes, size)))
        return result

    def error(self, site: WeightSite, model: nn.Module, ws: Workspace, config: LQConfig) -> float:
        """Error of ``config`` on ``site`` (shared unit), offered or not: what the rewrite realises."""
        return min(self.alternation(site, model, ws, config).errors)

    def alternation(self, site: WeightSite, model: nn.Module, ws: Workspace, config: LQConfig) -> Alternation:
        """The alternation the rewrite of ``config`` runs (its per-iteration errors, best iterate)."""
        self._check(site, model, config)
        p = self._problem(site, model, ws, config.activation_aware)
        basis = _start_basis(p, self._basis_width(site, config))
        return alternate(p, config.storage(), config.rank, basis, _iterations(site))

    def _check(self, site: WeightSite, model: nn.Module, config: TransformConfig) -> None:
        if not isinstance(config, LQConfig):
            raise TypeError(f"the lq transform does not handle {type(config).__name__}")
        if not self._supported(site, model):
            raise ValueError(f"{site.name} cannot take LQ: 1×1 convolutions and max_norm/sparse embeddings are not handled")
        if config.rank > min(site.matrix_shape):
            raise ValueError(f"rank {config.rank} exceeds {site.name}'s smaller dimension {min(site.matrix_shape)}")

    @staticmethod
    def _grid(site: WeightSite, aware: bool) -> list[LQConfig]:
        return candidate_configs(*site.matrix_shape, site.nbytes // site.numel, aware)

    def _basis_width(self, site: WeightSite, config: LQConfig) -> int:
        # The rewrite must start from the very basis the candidates were priced with: the
        # seeded start block's width is the grid's largest rank (or the config's, if larger).
        ranks = [c.rank for c in self._grid(site, config.activation_aware)] + [config.rank]
        return max(ranks) + _OVERSAMPLE

    @staticmethod
    def _problem(site: WeightSite, model: nn.Module, ws: Workspace, aware: bool) -> _Problem:
        stats = ws.stats.get(site.name) if (aware and ws.stats) else None
        if aware and stats is None:
            raise ValueError(
                f"activation-aware LQ for {site.name} needs calibration statistics; pass calibration="
                " (the batches the plan was made with), or use activation_aware=False"
            )
        return _problem(site, site.as_matrix(model.get_parameter(site.name).detach()), stats)

    @staticmethod
    def _supported(site: WeightSite, model: nn.Module) -> bool:
        for use in site.uses:
            if use.kind is UseKind.CONV1X1:
                return False
            module = model.get_submodule(use.module)
            if use.kind is UseKind.EMBEDDING and (module.max_norm is not None or module.sparse):
                return False
        return True

    @staticmethod
    def _cost(site: WeightSite, config: LQConfig, nbytes: int, size: int) -> MatmulCost:
        from codegen.kernels.dequant import DEQUANT_FIRST_M

        out, inn = site.matrix_shape
        r = config.rank
        q_bytes = config.storage().nbytes(out, inn)
        total = MatmulCost(0, 0, 0)
        for use in site.uses:
            if use.kind is UseKind.EMBEDDING:  # gather Q's rows and L1's rows, one small matmul
                total = total + MatmulCost(0, use.rows * (-(-q_bytes // out) + r * size + inn * size), 1)
                total = total + matmul_cost(use.rows, r, inn, r * inn * size, size)
            else:  # Q's matmul (dequantization fused) plus the two thin ones
                parts = (
                    matmul_cost(use.rows, inn, out, q_bytes, size)
                    + matmul_cost(use.rows, inn, r, r * inn * size, size)
                    + matmul_cost(use.rows, r, out, r * out * size, size)
                )
                # decomp::quant_linear with the low-rank term (GPU): one launch, (x·L2ᵀ) on chip; from
                # DEQUANT_FIRST_M rows, Q decoded once (written and read back dense), then the torch matmuls
                if use.rows < DEQUANT_FIRST_M:  # Q's codes read at its kernel's measured rate (gpu_weight_bytes)
                    q_read = gpu_weight_bytes(use.rows, q_bytes, config.storage())
                    fused = MatmulCost(parts.flops, q_read + r * (inn + out) * size + use.rows * (inn + out) * size, 1)
                else:
                    fused = MatmulCost(parts.flops, parts.bytes + 2 * out * inn * size, parts.kernels + 1)
                total = total + MatmulCost(parts.flops, parts.bytes, parts.kernels, fused)
        return total

    def rewrite(self, model: nn.Module, site: WeightSite, config: TransformConfig, ws: Workspace) -> None:
        self._check(site, model, config)
        out, inn = site.matrix_shape
        weight = model.get_parameter(site.name)
        storage, r = config.storage(), config.rank
        if ws.materialize:
            result = self.alternation(site, model, ws, config)
            buffers = storage.encode(result.quant_input)
            up, down = result.up.to(weight.dtype), result.down.to(weight.dtype)
        else:
            buffers = {
                name: torch.empty(shape, dtype=dtype, device=weight.device)
                for name, (shape, dtype) in storage.buffer_specs(out, inn).items()
            }
            up = torch.empty(out, r, dtype=weight.dtype, device=weight.device)
            down = torch.empty(r, inn, dtype=weight.dtype, device=weight.device)
        # One PackedWeight and one pair of factors serve every use: a tied table stays tied.
        packed = PackedWeight(storage, (out, inn), weight.dtype, buffers)
        up = nn.Parameter(up.to(weight.device), requires_grad=weight.requires_grad)
        down = nn.Parameter(down.to(weight.device), requires_grad=weight.requires_grad)
        for use in site.uses:
            module = model.get_submodule(use.module)
            if use.kind is UseKind.EMBEDDING:
                new = LQEmbedding(packed, up, down, module.padding_idx)
            else:
                new = LQLinear(packed, down, up, module.bias)
            replace_module(model, use.module, new)


register_transform(LQTransform())
