"""Weight-only quantization of Linear, GPT-2 Conv1D and Embedding weights: int8, int2/3/4, NF4.

Where it sits: after capture and (optional) calibration, beside ``passes.lowrank``; proposes
one option per storage format (:func:`candidate_configs`) and rewrites the chosen modules
into ``quant_storage.QuantizedLinear`` / ``QuantizedEmbedding``, which store packed integer codes
and their constants as buffers and dequantize in torch on every forward (eager, CPU and CUDA
alike). 1×1 Conv2d sites are left out of this family (no candidates; a quantized conv
module is not written yet); the low-rank family still handles them.

With calibration, a linear site whose inputs have outlier features also gets the
LLM.int8() option (``passes.int8_outlier.Int8OutlierConfig``: int8 × int8 matmul plus fp16
outlier columns); its layout, runtime module and exact pricing live in that module, which
this transform enumerates and rewrites so that ``"quantize"`` keeps meaning every
quantized format.

Storage is real (formats in ``passes.quant_storage``): ``config.nbytes(out, in)`` is the sum of the buffers ``config.encode``
produces (tested), so ``cost_model.stored_bytes`` of a rewritten model moves exactly by
``site.nbytes − nbytes``. Group formats pad the input dimension with zeros up to a multiple
of the group size; the padded codes are stored and counted.

Rounding is plain round-to-nearest against the constants the model really stores (fp16, or
their double-quantized uint8 version), so every stored code is the best one for its stored
constants; no calibration data is used to choose codes.

Error estimate (what the solver adds across sites and families): the same quantity as
``cost_model.perturbation_error`` for Δ = W − dequant(quant(W)) — predicted loss increase
``½ · Σ sensitivity · output error`` with sensitivities, relative output error without,
relative weight error ‖Δ‖²/‖W‖² without calibration — with one approximation for speed:
a linear use's output error ``tr(Δ C Δᵀ)`` is replaced by its diagonal part
``Σ_j C_jj ‖Δ[:, j]‖²``. Rounding errors of different input columns are nearly
uncorrelated (independent roundings, signs balanced over the output rows), so the
off-diagonal terms average out over the output rows: the tests find the two within 7% on
correlated, non-zero-mean inputs at 256 output rows (within 13% on a tiny llama's 32–128-row
layers; SmolLM2's have 192 or more). That turns an ``out·in²`` matmul per option into one pass over Δ,
which is what makes ~25 options × 211 sites of SmolLM2 cheap. Lookup uses are exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from cost_model import MatmulCost, SiteStats
from ir import UseKind, WeightSite
from passes.config import TransformConfig
from passes.int8_outlier import Int8OutlierConfig, outlier_candidate, rewrite_int8_outlier
from passes.quant_storage import (
    BITS,
    GROUP_SIZES,
    Int8Config,
    IntNConfig,
    NF4Config,
    PackedWeight,
    QuantConfig,
    QuantizedEmbedding,
    QuantizedLinear,
    quantized_matmul_cost,
)
from passes.transform import Candidate, Transform, Workspace, register_transform, replace_module

__all__ = ["QuantizeTransform", "candidate_configs"]

_CONFIG_TYPES = (Int8Config, IntNConfig, NF4Config, Int8OutlierConfig)


def candidate_configs(in_features: int) -> list[QuantConfig]:
    """Every format offered for a weight with ``in_features`` columns.

    A group size is skipped when the next smaller one already covers a whole row in one
    group: it would store more padding for the same codes.
    """
    groups = [g for i, g in enumerate(GROUP_SIZES) if i == 0 or in_features > GROUP_SIZES[i - 1]]
    configs: list[QuantConfig] = [Int8Config()]
    for dq in (False, True):
        configs += [IntNConfig(b, g, dq) for b in BITS for g in groups]
        configs += [NF4Config(g, dq) for g in groups]
    return configs


# ---- pricing -------------------------------------------------------------------------------


def _diagonal_error_fn(site: WeightSite, stats: SiteStats | None, w: torch.Tensor) -> Callable[[torch.Tensor], float]:
    """``delta ↦`` the error of ``w − delta``, in ``cost_model.perturbation_error``'s units.

    The same parts, scales and normalisers as ``perturbation_error``, except that a linear
    use's ``tr(Δ C Δᵀ)`` is taken as ``Σ_j C_jj ‖Δ[:, j]‖²`` (module docstring). Everything
    that does not depend on Δ is computed once here.
    """
    w64 = w.double()
    if stats is None:
        total = max(w64.square().sum().item(), 1e-300)
        return lambda delta: delta.double().square().sum().item() / total
    linears = [u for u in site.uses if u.kind is not UseKind.EMBEDDING]
    lookups = [u for u in site.uses if u.kind is UseKind.EMBEDDING]
    sens = stats.sensitivity
    # (axis summed over in Δ², weights of the other axis, coefficient)
    parts: list[tuple[int, torch.Tensor, float]] = []
    if linears and stats.covariance is not None:
        c = stats.covariance.double()
        if sens:
            coef = 0.5 * sum(sens.get(u.module, 0.0) for u in linears)
        else:
            coef = 1.0 / max(((w64 @ c) * w64).sum().item(), 1e-300)
        parts.append((0, c.diagonal(), coef))
    if lookups and stats.token_counts is not None:
        d = stats.token_counts.double() + 1.0
        d = d / d.sum()
        if sens:
            coef = 0.5 * sum(sens.get(u.module, 0.0) for u in lookups)
        else:
            coef = 1.0 / max((d[:, None] * w64.square()).sum().item(), 1e-300)
        parts.append((1, d, coef))

    def error(delta: torch.Tensor) -> float:
        sq = delta.float().square()
        return sum(coef * (weights @ sq.sum(axis).double()).item() for axis, weights, coef in parts)

    return error


# ---- the transform -------------------------------------------------------------------------


class QuantizeTransform(Transform):
    """The ``"quantize"`` transform: one candidate per format of :func:`candidate_configs` that saves bytes."""

    name = "quantize"
    config_types = _CONFIG_TYPES

    def candidates(self, site: WeightSite, model: nn.Module, ws: Workspace) -> list[Candidate]:
        if not self._supported(site, model):
            return []
        out, inn = site.matrix_shape
        w = site.as_matrix(model.get_parameter(site.name).detach()).float()
        stats = ws.stats.get(site.name) if ws.stats else None
        price = _diagonal_error_fn(site, stats, w)
        size = site.nbytes // site.numel
        result = []
        for config in candidate_configs(inn):
            nbytes = config.nbytes(out, inn)
            if nbytes >= site.nbytes:
                continue
            error = price(config.roundtrip(w).neg_().add_(w))  # Δ = W − W', in the temporary's memory
            if math.isfinite(error):  # fp16 constants overflow past 65504: not an option then
                result.append(Candidate(config, nbytes, error, self._cost(site, nbytes, size, config)))
        outlier = outlier_candidate(site, model, stats)  # LLM.int8(): calibrated linear sites with outliers
        return result + ([outlier] if outlier is not None else [])

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
    def _cost(site: WeightSite, nbytes: int, size: int, config: QuantConfig) -> MatmulCost:
        out, inn = site.matrix_shape
        total = MatmulCost(0, 0, 0)
        for use in site.uses:
            if use.kind is UseKind.EMBEDDING:  # read each looked-up row's stored bytes, write it dense
                total = total + MatmulCost(0, use.rows * (-(-nbytes // out) + inn * size), 1)
            else:  # dequantization fused into the matmul: it reads the stored bytes once
                total = total + quantized_matmul_cost(use.rows, inn, out, nbytes, size, config)
        return total

    def rewrite(self, model: nn.Module, site: WeightSite, config: TransformConfig, ws: Workspace) -> None:
        if not isinstance(config, _CONFIG_TYPES):
            raise TypeError(f"the quantize transform does not handle {type(config).__name__}")
        if isinstance(config, Int8OutlierConfig):
            return rewrite_int8_outlier(model, site, config, ws)
        if not self._supported(site, model):
            raise ValueError(f"{site.name} cannot be quantized: 1×1 convolutions and max_norm/sparse embeddings are not handled")
        out, inn = site.matrix_shape
        weight = model.get_parameter(site.name)
        if ws.materialize:
            buffers = config.encode(site.as_matrix(weight.detach()))
        else:
            buffers = {
                name: torch.empty(shape, dtype=dtype, device=weight.device)
                for name, (shape, dtype) in config.buffer_specs(out, inn).items()
            }
        # One PackedWeight serves every use, so a tied table stays one set of buffers.
        packed = PackedWeight(config, (out, inn), weight.dtype, buffers)
        for use in site.uses:
            module = model.get_submodule(use.module)
            if use.kind is UseKind.EMBEDDING:
                new = QuantizedEmbedding(packed, module.padding_idx)
            else:
                new = QuantizedLinear(packed, module.bias)
            replace_module(model, use.module, new)


register_transform(QuantizeTransform())
