"""Low-rank factorisation W ≈ A·B of Linear, Conv1D, 1×1 Conv2d and Embedding weights.

Where it sits: after capture and (optional) calibration; proposes one option per rank and
rewrites the chosen modules into two-factor modules that store ``r·(out + in)`` elements
instead of ``out·in``.

The math. Let W be the weight as a linear map (out × in) and C = XᵀX / rows the second
moment of its calibration inputs. The output error of replacing W by W' is
``‖(W − W')Xᵀ‖²_F / rows = tr((W − W') C (W − W')ᵀ)``, minimised over rank-r W' by projecting
W's *outputs* onto the top-r left singular vectors U_r of W·C^{1/2}:
``W' = U_r U_rᵀ W``, i.e. A = U_r, B = U_rᵀW. No inverse of C appears, so a singular or
ill-conditioned C (dead features, tiny calibration sets) is harmless — the usual whitened
SVD, ``U Σ Vᵀ S⁻¹``, is where public implementations blow up. U_r comes from an fp64
eigendecomposition of ``W C Wᵀ`` (out ≤ in), or from the Cholesky factor of C (damped only
as far as Cholesky needs) when out > in. The discarded eigenvalues are exactly the output
error on the calibration data, so one decomposition prices every rank.

Tables looked up by index (embeddings, also when tied to an output head) are factored on
the embedding side instead: W' = W V_r V_rᵀ with V_r the top right singular vectors of
D^{1/2}W, D = lookups + 1 (unseen tokens still count), which is exactly optimal for the
lookups; the head's output error under that projection is priced exactly as well (a suffix
sum, see ``_head_error_of_input_basis``). Without calibration, everything reduces to plain
truncated SVD.

Error normalisation (what the solver adds across layers): with calibration, the predicted
increase of the calibration loss, ``½ · E‖∂L/∂y‖²/out · (output error per row)``, summed
over the site's uses — a diagonal-Fisher scale per layer (``cost_model.calibration``) times
the exact output error. Its units are nats per token for a language model, so estimates of
different layers (and of other transform families) add up and compare; on SmolLM2 the summed
estimate predicts the measured perplexity (README). Relative errors alone do not: the
lm_head's logits tolerate 1% relative error worse than any MLP (measured: 0.8% relative
error on the tied table took perplexity from 14 to 133). Without calibration the error is the
relative weight-space error ‖W − AB‖²/‖W‖².
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
from passes.transform import Candidate, Transform, Workspace, register_transform, replace_module

__all__ = [
    "LowRankConfig",
    "LowRankConv1x1",
    "LowRankEmbedding",
    "LowRankLinear",
    "LowRankTransform",
    "candidate_ranks",
    "factorize",
]

MAX_OPTIONS = 32


@register_config
@dataclass(frozen=True)
class LowRankConfig(TransformConfig):
    """Factor a weight as A·B of rank ``rank``.

    Attributes:
        rank: inner dimension r, 1 ≤ r; storage is r·(out + in) elements.
        activation_aware: minimise the output error on the calibration inputs (needs
            calibration); False is plain truncated SVD (minimises ‖W − AB‖_F).

    Expected error: the discarded share of the spectrum, reported per layer as the relative
    output error. On SmolLM2 keeping 90% of every linear layer's parameters costs ~3×
    perplexity with activation-aware factors and makes the model useless with plain SVD (see
    README): pretrained weights are far from low-rank, their activations are not.
    """

    family: ClassVar[str] = "lowrank"
    rank: int
    activation_aware: bool = True

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LowRankConfig.rank must be an int >= 1, got {self.rank!r}")
        if not isinstance(self.activation_aware, bool):
            raise ValueError(f"LowRankConfig.activation_aware must be a bool, got {self.activation_aware!r}")

    def describe(self) -> str:
        return f"lowrank r={self.rank}" + ("" if self.activation_aware else " (svd)")


class LowRankLinear(nn.Module):
    """``y = (x·downᵀ)·upᵀ + bias``: a Linear (or GPT-2 Conv1D) of rank r."""

    def __init__(self, down: nn.Parameter, up: nn.Parameter, bias: nn.Parameter | None):
        super().__init__()
        self.down = down  # (r, in)
        self.up = up  # (out, r)
        self.bias = bias

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if dispatch.use_kernels(x, self.down, self.up, self.bias):
            return dispatch.lowrank_linear(x, self.down, self.up, self.bias)  # one fused kernel on CUDA
        return F.linear(F.linear(x, self.down), self.up, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.down.shape[1]}, out={self.up.shape[0]}, rank={self.rank}, bias={self.bias is not None}"


class LowRankConv1x1(nn.Module):
    """A 1×1 Conv2d as two 1×1 convs through ``rank`` channels (stride/padding on the first)."""

    def __init__(self, down: nn.Parameter, up: nn.Parameter, bias: nn.Parameter | None, stride, padding):
        super().__init__()
        self.down = down  # (r, in, 1, 1)
        self.up = up  # (out, r, 1, 1)
        self.bias = bias
        self.stride = stride
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Zero padding on the first conv gives zeros there, so the second adds just the bias,
        # exactly as the original padded 1×1 conv does.
        return F.conv2d(F.conv2d(x, self.down, None, self.stride, self.padding), self.up, self.bias)


class LowRankEmbedding(nn.Module):
    """``table[ids] = left[ids] · right``: an Embedding of rank r."""

    def __init__(self, left: nn.Parameter, right: nn.Parameter, padding_idx: int | None):
        super().__init__()
        self.left = left  # (num, r)
        self.right = right  # (r, dim)
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.left, self.padding_idx) @ self.right


def candidate_ranks(out_features: int, in_features: int) -> list[int]:
    """Ranks that store strictly fewer elements than the dense matrix, at most 32 of them.

    Spacing is a multiple of 8 once there is room for it (friendlier GEMM shapes).
    """
    r_max = (out_features * in_features - 1) // (out_features + in_features)
    if r_max < 1:
        return []
    step = max(1, math.ceil(r_max / MAX_OPTIONS))
    if r_max >= 64:
        step = 8 * math.ceil(step / 8)
    return list(range(step, r_max + 1, step))


@dataclass
class _Basis:
    """Orthonormal basis sorted by importance, and the estimated error of every rank.

    Attributes:
        left: True for an output-space basis U (A = U_r, B = U_rᵀW), False for an input-space
            basis V (A = W V_r, B = V_rᵀ).
        vectors: fp64, (out or in) × R, R ≥ every candidate rank.
        residual: fp64, ``residual[r]`` is the estimated error at rank r (r = 0 … R).
    """

    left: bool
    vectors: torch.Tensor
    residual: torch.Tensor


def _eigh_desc(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    vals, vecs = torch.linalg.eigh(m)
    return vals.flip(0).clamp_min(0), vecs.flip(1)


def _tail(energy: torch.Tensor, upto: int) -> torch.Tensor:
    """``tail[r] = Σ_{i ≥ r} energy[i]`` for r = 0 … upto (the error left at rank r)."""
    total = energy.sum()
    kept = torch.cat([energy.new_zeros(1), torch.cumsum(energy, 0)])[: upto + 1]
    return (total - kept).clamp_min(0)


def _cholesky_damped(c: torch.Tensor) -> torch.Tensor:
    # Only as much damping as Cholesky needs: it perturbs the error estimate by ~damping·‖W‖².
    scale = max(c.diagonal().mean().item(), 1e-300)
    eye = torch.eye(c.shape[0], dtype=c.dtype)
    for damping in (0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2):
        factor, info = torch.linalg.cholesky_ex(c + damping * scale * eye)
        if info.item() == 0:
            return factor
    raise FloatingPointError("calibration covariance is not positive semi-definite even with 1e-2 damping")


def _output_basis(w: torch.Tensor, covariance: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``keep`` left singular vectors of W·C^½ and all squared singular values."""
    out, inn = w.shape
    if out <= inn:
        energy, u = _eigh_desc(w @ covariance @ w.T)
        return u[:, :keep], energy
    g = w @ _cholesky_damped(covariance)  # W·L with L Lᵀ = C: same left singular vectors as W·C^½
    energy, v = _eigh_desc(g.T @ g)
    sigma = energy[:keep].sqrt().clamp_min(1e-300)
    return (g @ v[:, :keep]) / sigma, energy


def _head_error_of_input_basis(w: torch.Tensor, covariance: torch.Tensor, v: torch.Tensor, upto: int) -> torch.Tensor:
    """Output error per row, tr(W V⊥V⊥ᵀ C V⊥V⊥ᵀ Wᵀ), of W' = W V_r V_rᵀ for r = 0 … upto.

    With K = VᵀCV and F = VᵀWᵀWV, the error at rank r is Σ_{i,j ≥ r} K_ij F_ji: a suffix sum
    over both indices of K ⊙ Fᵀ.
    """
    k, f = v.T @ covariance @ v, v.T @ (w.T @ w) @ v
    h = k * f.T
    suffix = h.flip(0).cumsum(0).flip(0).flip(1).cumsum(1).flip(1)
    return torch.cat([suffix.diagonal(), suffix.new_zeros(1)])[: upto + 1]


def _basis(site: WeightSite, w: torch.Tensor, stats: SiteStats | None, keep: int) -> _Basis:
    """Choose the factorisation basis of a site and price every rank (module docstring)."""
    out, inn = w.shape
    lookups = [u for u in site.uses if u.kind is UseKind.EMBEDDING]
    linears = [u for u in site.uses if u.kind is not UseKind.EMBEDDING]
    if stats is None:  # data-free: plain SVD, relative weight-space error
        if out <= inn:
            energy, u = _eigh_desc(w @ w.T)
            return _Basis(True, u[:, :keep], _tail(energy, keep) / energy.sum().clamp_min(1e-300))
        energy, v = _eigh_desc(w.T @ w)  # projecting inputs is just as optimal for plain SVD
        return _Basis(False, v[:, :keep], _tail(energy, keep) / energy.sum().clamp_min(1e-300))

    sens = stats.sensitivity
    if not lookups:
        u, energy = _output_basis(w, stats.covariance, keep)
        if sens:  # predicted loss increase: ½ · Σ_uses E[g²] · output error per row
            scale = 0.5 * sum(sens.get(use.module, 0.0) for use in linears)
            return _Basis(True, u, scale * _tail(energy, keep))
        return _Basis(True, u, _tail(energy, keep) / energy.sum().clamp_min(1e-300))

    # A table looked up by index (maybe also used as an output head, as in tied embeddings):
    # project the embedding dimension onto the top right singular vectors of D^½W, D = lookups + 1.
    weights = stats.token_counts + 1.0
    energy, v = _eigh_desc((w * weights[:, None]).T @ w)
    lookup_error = _tail(energy, keep) / weights.sum()
    head_error = _head_error_of_input_basis(w, stats.covariance, v, keep) if linears and stats.covariance is not None else None
    if sens:
        residual = 0.5 * sum(sens.get(use.module, 0.0) for use in lookups) * lookup_error
        if head_error is not None:
            residual = residual + 0.5 * sum(sens.get(use.module, 0.0) for use in linears) * head_error
    else:
        residual = lookup_error / lookup_error[0].clamp_min(1e-300)
        if head_error is not None:
            residual = residual + head_error / head_error[0].clamp_min(1e-300)
    return _Basis(False, v[:, :keep], residual)


def _site_basis(site: WeightSite, model: nn.Module, ws: Workspace, activation_aware: bool) -> _Basis:
    key = ("lowrank", site.name, activation_aware)
    if key not in ws.cache:
        stats = ws.stats.get(site.name) if (activation_aware and ws.stats) else None
        if activation_aware and stats is None:
            raise ValueError(
                f"activation-aware low-rank for {site.name} needs calibration statistics; pass calibration="
                " (the batches the plan was made with), or use activation_aware=False"
            )
        weight = model.get_parameter(site.name).detach()
        w = site.as_matrix(weight).double()
        keep = max(candidate_ranks(*w.shape) or [1])
        ws.cache[key] = _basis(site, w, stats, keep)
    return ws.cache[key]


def factorize(site: WeightSite, model: nn.Module, config: LowRankConfig, ws: Workspace) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(A, B)`` with W ≈ A·B, A: (out × r), B: (r × in), in the weight's dtype."""
    basis = _site_basis(site, model, ws, config.activation_aware)
    r = config.rank
    if r > basis.vectors.shape[1]:
        raise ValueError(f"rank {r} for {site.name} does not save memory (max useful rank {basis.vectors.shape[1]})")
    weight = model.get_parameter(site.name).detach()
    w = site.as_matrix(weight).double()
    basis_r = basis.vectors[:, :r]
    if basis.left:
        a, b = basis_r, basis_r.T @ w
    else:
        a, b = w @ basis_r, basis_r.T
    return a.to(weight.dtype).contiguous(), b.to(weight.dtype).contiguous()


class LowRankTransform(Transform):
    """The ``"lowrank"`` transform: one candidate per rank in :func:`candidate_ranks`."""

    name = "lowrank"
    config_types = (LowRankConfig,)

    def candidates(self, site: WeightSite, model: nn.Module, ws: Workspace) -> list[Candidate]:
        if not self._supported(site, model):
            return []
        out, inn = site.matrix_shape
        ranks = candidate_ranks(out, inn)
        if not ranks:
            return []
        aware = ws.stats is not None
        size = site.nbytes // site.numel
        return [
            Candidate(
                LowRankConfig(r, aware),
                r * (out + inn) * size,
                self.error(site, model, ws, LowRankConfig(r, aware)),
                self._cost(site, r, size),
            )
            for r in ranks
        ]

    @staticmethod
    def error(site: WeightSite, model: nn.Module, ws: Workspace, config: LowRankConfig) -> float:
        """Estimated error of ``config`` on ``site`` (units: see the module docstring)."""
        return _site_basis(site, model, ws, config.activation_aware).residual[config.rank].item()

    @staticmethod
    def _supported(site: WeightSite, model: nn.Module) -> bool:
        for use in site.uses:
            module = model.get_submodule(use.module)
            if use.kind is UseKind.EMBEDDING and (module.max_norm is not None or module.sparse):
                return False
            if use.kind is UseKind.CONV1X1 and module.padding_mode != "zeros":
                return False
        return True

    @staticmethod
    def _cost(site: WeightSite, r: int, size: int) -> MatmulCost:
        from codegen.kernels.lowrank import first_product_given

        out, inn = site.matrix_shape
        total = MatmulCost(0, 0, 0)
        for use in site.uses:
            if use.kind is UseKind.EMBEDDING:
                total = total + MatmulCost(0, use.rows * r * size * 2, 1) + matmul_cost(use.rows, r, inn, r * inn * size, size)
            else:
                pair = matmul_cost(use.rows, inn, r, r * inn * size, size) + matmul_cost(use.rows, r, out, r * out * size, size)
                # decomp::lowrank_linear (GPU): one launch, the (rows × r) intermediate never in memory;
                # at prefill rows or with a big down, t is one matmul first and the kernel loads it
                given = first_product_given(use.rows, inn, r)
                moved = r * (inn + out) * size + use.rows * (inn + out) * size + (2 * use.rows * r * size if given else 0)
                fused = MatmulCost(pair.flops, moved, 2 if given else 1)
                total = total + MatmulCost(pair.flops, pair.bytes, pair.kernels, fused)
        return total

    def rewrite(self, model: nn.Module, site: WeightSite, config: TransformConfig, ws: Workspace) -> None:
        assert isinstance(config, LowRankConfig)
        out, inn = site.matrix_shape
        weight = model.get_parameter(site.name)
        if ws.materialize:
            a, b = factorize(site, model, config, ws)
        else:
            a = torch.empty(out, config.rank, dtype=weight.dtype, device=weight.device)
            b = torch.empty(config.rank, inn, dtype=weight.dtype, device=weight.device)
        # One pair of Parameters serves every use, so a tied table stays tied (and stored once).
        a = nn.Parameter(a, requires_grad=weight.requires_grad)
        b = nn.Parameter(b, requires_grad=weight.requires_grad)
        for use in site.uses:
            module = model.get_submodule(use.module)
            if use.kind is UseKind.EMBEDDING:
                new = LowRankEmbedding(a, b, module.padding_idx)
            elif use.kind is UseKind.CONV1X1:
                new = LowRankConv1x1(
                    _view_param(b, (config.rank, inn, 1, 1)),
                    _view_param(a, (out, config.rank, 1, 1)),
                    module.bias,
                    module.stride,
                    module.padding,
                )
            else:
                new = LowRankLinear(b, a, module.bias)
            replace_module(model, use.module, new)


def _view_param(p: nn.Parameter, shape: tuple[int, ...]) -> nn.Parameter:
    return nn.Parameter(p.data.reshape(shape), requires_grad=p.requires_grad)


register_transform(LowRankTransform())
