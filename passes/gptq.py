"""Data-aware rounding (GPTQ / OPTQ, Frantar et al. 2022) of Linear and GPT-2 Conv1D weights.

Where it sits: after capture and calibration, beside ``passes.quantize``; an opt-in transform
(``transforms=(..., "gptq")``, not in ``DEFAULT_TRANSFORMS``: it is slower). Preconditions:
calibration statistics. Without them (``ws.stats`` is ``None``, or a site has no input
covariance) it offers no candidates, so a data-free run's report lists no gptq choice, and a
replayed plan needs ``calibration=`` (or ``passes.load``, which restores stored codes).

Storage is exactly ``passes.quant_storage.IntNConfig(bits, group_size, double_quant)``: the
same buffers, the same :class:`~passes.quant_storage.PackedWeight`, the same bytes and the
same decoder. Only the codes (and the group constants they are rounded against) differ: they
are chosen to minimise the output error ``tr(Δ C Δᵀ)`` on the calibration inputs instead of
the weight error, which lowers it versus round-to-nearest (0.3–0.8× on correlated inputs;
the same when C is a multiple of the identity, where there is nothing to exploit).

Algorithm (standard GPTQ with lazy batch updates, vectorised over output rows):

1. ``H = C + λ·mean(diag C)·I`` (λ = 0.01; raised ×10 twice if a Cholesky fails, then
   :class:`FloatingPointError`). A dead input column (``C_jj = 0``: the input is always 0 on
   the calibration data) gets ``H_jj = 1`` and no coupling; it receives and sends no error
   feedback, so it is rounded to nearest from its original value. Reference GPTQ zeroes such
   a column instead; both leave the calibration output unchanged, keeping it also keeps the
   weight right for inputs where that feature is not zero. Input sizes the group size does not
   divide are padded with zero columns as in ``quant_storage``; padded columns are dead.
2. ``U``: the upper Cholesky factor of ``H⁻¹`` (fp64, then fp32), computed once per
   covariance (q/k/v and gate/up sites share it).
3. Columns in blocks of 128 (a multiple of every group size, so no group straddles blocks).
   On entering a group, its asymmetric ``scale = (max − min)/(2^bits − 1)`` and ``min`` are
   taken from the *current*, error-updated weights and rounded to fp16 as stored; each column
   is rounded to nearest against them, its error ``e = (w − q)/U_jj`` is propagated to the
   rest of the block at once (rank-1 update) and, at the end of the block, to all later
   columns by one matmul.
4. ``double_quant``: each second-level (scale, offset) covers 256 group constants, so the grid
   is only known once every group is. Step 3 runs once with fp16 constants; the second-level
   grid is taken from those constants (``quant_formats.quantize_constants``, fixed from then
   on), and step 3 runs again, now storing each group's constants as uint8 codes on that grid
   as it enters the group. The codes thus get full error feedback against the constants the
   model really stores (fixing the first pass's constants instead, or re-rounding its codes,
   loses part of GPTQ's gain to clamping where the second pass's groups drift).

Candidates: every ``bits × group_size × double_quant`` (group sizes as ``passes.quantize``
offers them) that stores fewer bytes than dense. Their error is exact in the shared unit:
``cost_model.perturbation_error(site, stats, W, W − decode(buffers))`` — GPTQ errors are
correlated across columns by design, so ``passes.quantize``'s diagonal shortcut does not
apply. Only sites all of whose uses are Linear or Conv1D get candidates: lookup tables and
tied embedding/head tables have a use without an input covariance, and 1×1 convolutions
have no quantized module here.

Note: the covariance is that of the original model's inputs (all sites from one calibration
pass), not of the already-quantized predecessors as in sequential reference GPTQ.

Cost (measured on 2 CPU cores, fp32, 18 candidates per site, factor shared as in step 2):
enumerating a 576×1536 site takes 2.5–2.8 s, a 1536×576 site 1.1–1.4 s (576×576: 0.5–0.6 s,
192×576: 0.4 s); roughly half is the 18 GPTQ passes (a Python loop over input columns, ~60 µs
per column), half the exact fp64 pricing. A SmolLM2-135M layer (q, k, v, o, gate, up, down)
takes ~7.3 s, so its 210 linear sites take ~3.7 min, versus seconds for ``"quantize"``; the
rewrite adds one or two passes per chosen site (~0.1 s each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cost_model import MatmulCost, SiteStats, perturbation_error
from ir import UseKind, WeightSite
from passes import quant_formats as qf
from passes.config import TransformConfig, register_config
from passes.quant_storage import BITS, GROUP_SIZES, Buffers, IntNConfig, PackedWeight, QuantizedLinear, quantized_matmul_cost
from passes.transform import Candidate, Transform, Workspace, register_transform, replace_module

__all__ = ["DAMPING", "GPTQConfig", "GPTQTransform", "candidate_configs", "gptq_encode", "inverse_hessian_factor"]

#: λ of ``H = C + λ·mean(diag C)·I`` (reference GPTQ's ``percdamp``).
DAMPING = 0.01
_BLOCK = 128  # lazy-batch width; a multiple of every group size
_TINY = 1e-30  # divisor floor for all-equal groups (scale 0), as in quant_formats


@register_config
@dataclass(frozen=True)
class GPTQConfig(TransformConfig):
    """GPTQ rounding into the ``IntNConfig(bits, group_size, double_quant)`` storage format.

    Attributes:
        bits: code width, 2, 3 or 4.
        group_size: input columns sharing one (scale, min): 32, 64 or 128.
        double_quant: store the group constants as uint8 with an fp32 (scale, offset) per
            block of 256 groups instead of fp16.

    Storage: exactly :attr:`storage`'s bytes (``bits/8 + 4/group_size`` bytes per weight
    without double quantization). Expected error: the output error on the calibration
    inputs relative to round-to-nearest in the same format, measured on correlated inputs:
    int4 0.55–0.58×, int3 0.57–0.61×, int2 0.69–0.78× (synthetic 576×1536 and 1536×576
    layers; 0.33–0.35× at int4/int3 g64 on the tests' 128×320 layer); 1.0× on isotropic
    inputs. Double quantization changes the ratio by < 0.01. Needs calibration.
    """

    family: ClassVar[str] = "gptq"
    bits: int
    group_size: int
    double_quant: bool = False

    def __post_init__(self):
        for field, value, valid in (("bits", self.bits, BITS), ("group_size", self.group_size, GROUP_SIZES)):
            if isinstance(value, bool) or not isinstance(value, int) or value not in valid:
                raise ValueError(f"GPTQConfig.{field} must be one of {valid}, got {value!r}")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"GPTQConfig.double_quant must be one of (False, True), got {self.double_quant!r}")

    @property
    def storage(self) -> IntNConfig:
        """The storage format the codes are written in (its buffers, bytes and decoder)."""
        return IntNConfig(self.bits, self.group_size, self.double_quant)

    @property
    def activation_aware(self) -> bool:
        """Always True: ``passes.apply`` must collect calibration statistics to replay it."""
        return True

    def describe(self) -> str:
        return f"gptq int{self.bits} g{self.group_size}" + (" dq" if self.double_quant else "")


def candidate_configs(in_features: int) -> list[GPTQConfig]:
    """Every config offered for a weight with ``in_features`` columns.

    As in ``passes.quantize``: a group size is skipped when the next smaller one already
    covers a whole row in one group (it would store more padding for the same codes).
    """
    groups = [g for i, g in enumerate(GROUP_SIZES) if i == 0 or in_features > GROUP_SIZES[i - 1]]
    return [GPTQConfig(b, g, dq) for dq in (False, True) for b in BITS for g in groups]


# ---- the algorithm ------------------------------------------------------------------------


def inverse_hessian_factor(covariance: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``), fp32, with H as in the module docstring.

    Dead columns (``C_jj = 0``) get ``H_jj = 1`` and no coupling. The damping is raised ×10
    twice when a factorisation fails.

    Raises:
        FloatingPointError: even ``100·damping`` does not make H positive definite.
    """
    h = covariance.double().clone()
    dead = h.diagonal() == 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    scale = covariance.double().diagonal().mean().item()
    scale = scale if scale > 0 else 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for lam in (damping, 10 * damping, 100 * damping):
        lower, info = torch.linalg.cholesky_ex(h + lam * scale * eye)
        if info.item() != 0:
            continue
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
        if info.item() == 0 and torch.isfinite(upper).all():
            return upper.float()
    raise FloatingPointError(
        f"calibration covariance is not positive semi-definite even with {100 * damping:g}·mean(diag) damping"
    )


def _pad_factor(upper: torch.Tensor, cols: int) -> torch.Tensor:
    """``U`` of the zero-padded covariance: padded columns are dead, i.e. decoupled (identity)."""
    extra = cols - upper.shape[0]
    if not extra:
        return upper
    padded = F.pad(upper, (0, extra, 0, extra))
    padded.diagonal()[upper.shape[0] :] = 1.0
    return padded


def _gptq_columns(
    w: torch.Tensor, upper: torch.Tensor, bits: int, group_size: int, blocks: dict[str, torch.Tensor] | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """GPTQ over the columns of the padded ``(out, cols)`` fp32 ``w`` (module docstring, step 3).

    Args:
        w: weight, columns a multiple of ``group_size``.
        upper: ``(cols, cols)`` factor from :func:`inverse_hessian_factor` (padded).
        blocks: ``{"scale", "minimum"}`` → ``(n_blocks, 2)`` second-level (scale, offset) per
            256 constants (``quant_formats.quantize_constants``'s layout): each group's
            constants are then stored as uint8 codes on that grid instead of fp16.

    Returns:
        ``(q, constants, constant_codes)``: ``uint8`` codes ``(out, cols)``; the fp32
        ``scale``/``minimum`` ``(out, n_groups)`` as stored, which the codes were rounded
        against; with ``blocks``, their uint8 codes (else ``None``).
    """
    out, cols = w.shape
    maxq = (1 << bits) - 1
    n_groups = cols // group_size
    dev = w.device
    # Transposed, so that one input column is one contiguous row and each op covers all outputs.
    wt = w.t().contiguous()
    qt = torch.empty(cols, out, dtype=torch.uint8, device=dev)
    stored = {name: torch.empty(n_groups, out, device=dev) for name in ("scale", "minimum")}
    codes = None if blocks is None else {name: torch.empty_like(x, dtype=torch.uint8) for name, x in stored.items()}
    flat_index = torch.arange(out, device=dev) * n_groups  # row r's group k is constant r·n_groups + k

    def store(name: str, k: int, x: torch.Tensor) -> torch.Tensor:
        if blocks is None:
            value = x.half().float()
        else:  # the same arithmetic as quantize_constants / dequantize_constants, on a fixed grid
            b = blocks[name][(flat_index + k) // qf.CONSTANT_BLOCK]
            c = (x - b[:, 1]).div_(b[:, 0].clamp_min(_TINY)).round_().clamp_(0, 255)
            codes[name][k] = c
            value = c * b[:, 0] + b[:, 1]
        stored[name][k] = value
        return value

    for b0 in range(0, cols, _BLOCK):
        b1 = min(b0 + _BLOCK, cols)
        wb, ub = wt[b0:b1], upper[b0:b1, b0:b1]
        err = torch.empty(b1 - b0, out, device=dev)
        for i in range(b1 - b0):
            if (b0 + i) % group_size == 0:  # constants of the current, error-updated group
                k = (b0 + i) // group_size
                group = wb[i : i + group_size]
                lo, hi = group.amin(0), group.amax(0)
                s, m = store("scale", k, (hi - lo) / maxq), store("minimum", k, lo)
                s_div = s.clamp_min(_TINY)
            x = wb[i]
            q = (x - m).div_(s_div).round_().clamp_(0, maxq)
            qt[b0 + i] = q
            e = torch.addcmul(m, q, s).neg_().add_(x).div_(ub[i, i])
            if i + 1 < b1 - b0:
                wb[i + 1 :].addr_(ub[i, i + 1 :], e, alpha=-1)
            err[i] = e
        if b1 < cols:
            wt[b1:].addmm_(upper[b0:b1, b1:].t(), err, alpha=-1)
    stored = {name: x.t().contiguous() for name, x in stored.items()}
    codes = None if codes is None else {name: x.t().contiguous() for name, x in codes.items()}
    return qt.t().contiguous(), stored, codes


def gptq_encode(
    w: torch.Tensor, covariance: torch.Tensor | None, config: GPTQConfig, *, factor: torch.Tensor | None = None
) -> Buffers:
    """The buffers storing ``w`` in ``config.storage``'s layout, codes chosen by GPTQ.

    Args:
        w: ``(out, in)`` weight (any float dtype; computed in fp32 on its device).
        covariance: ``(in, in)`` input second moment ``XᵀX/rows``; may be ``None`` when
            ``factor`` is given.
        config: bits, group size, double quantization.
        factor: :func:`inverse_hessian_factor` of ``covariance`` (unpadded), to share it.

    Returns:
        Name → tensor, exactly as ``config.storage.encode`` lays them out (shapes, dtypes);
        ``config.storage.decode`` reads them back.
    """
    if factor is None:
        factor = inverse_hessian_factor(covariance)
    return _encode(w, factor, config, {})


def _encode(w: torch.Tensor, factor: torch.Tensor, config: GPTQConfig, memo: dict) -> Buffers:
    """:func:`gptq_encode`; ``memo`` keeps the fp16 pass per (bits, group) for the double-quantized config."""
    bits, group = config.bits, config.group_size
    wp = qf.pad_columns(w.float(), group)
    upper = _pad_factor(factor.to(wp.device), wp.shape[1])
    if (bits, group) not in memo:
        memo[(bits, group)] = _gptq_columns(wp, upper, bits, group)[:2]
    q, stored = memo[(bits, group)]
    if not config.double_quant:
        constants = {name: x.half() for name, x in stored.items()}
    else:  # step 4: second-level grid from the fp16 pass, then GPTQ again storing constants on it
        blocks = {name: qf.quantize_constants(x)[1] for name, x in stored.items()}
        q, _, codes = _gptq_columns(wp, upper, bits, group, blocks)
        constants = {}
        for name in ("scale", "minimum"):
            constants |= {f"{name}_codes": codes[name], f"{name}_blocks": blocks[name]}
    return {"codes": qf.pack(q, bits).view(q.shape[0], -1), **constants}


# ---- modules --------------------------------------------------------------------------------


# ---- the transform --------------------------------------------------------------------------


class GPTQTransform(Transform):
    """The ``"gptq"`` transform: one candidate per :func:`candidate_configs` entry that saves bytes."""

    name = "gptq"
    config_types = (GPTQConfig,)

    def candidates(self, site: WeightSite, model: nn.Module, ws: Workspace) -> list[Candidate]:
        stats = ws.stats.get(site.name) if ws.stats else None
        if not self._supported(site) or stats is None or stats.covariance is None:
            return []
        out, inn = site.matrix_shape
        w = site.as_matrix(model.get_parameter(site.name).detach()).float()
        factor = self._factor(stats, ws, site)
        size = site.nbytes // site.numel
        result, memo = [], {}
        for config in candidate_configs(inn):
            nbytes = config.storage.nbytes(out, inn)
            if nbytes >= site.nbytes:
                continue
            decoded = config.storage.decode(_encode(w, factor, config, memo), inn, torch.float32)
            error = perturbation_error(site, stats, w.cpu(), w.sub(decoded).cpu())
            if math.isfinite(error):  # fp16 constants overflow past 65504: not an option then
                costs = (quantized_matmul_cost(u.rows, inn, out, nbytes, size, config.storage) for u in site.uses)
                cost = sum(costs, MatmulCost(0, 0, 0))
                result.append(Candidate(config, nbytes, error, cost))
        return result

    @staticmethod
    def _supported(site: WeightSite) -> bool:
        return all(u.kind in (UseKind.LINEAR, UseKind.CONV1D) for u in site.uses)

    @staticmethod
    def _factor(stats: SiteStats, ws: Workspace, site: WeightSite) -> torch.Tensor:
        # One entry, keyed by the covariance tensor itself: sites reading the same activation
        # (q/k/v, gate/up) are enumerated one after another and share it, and memory stays bounded.
        key = ("gptq", "factor")
        cached = ws.cache.get(key)
        if cached is None or cached[0] is not stats.covariance:
            try:
                cached = (stats.covariance, inverse_hessian_factor(stats.covariance))
            except FloatingPointError as exc:
                raise FloatingPointError(f"GPTQ of {site.name}: {exc}") from None
            ws.cache[key] = cached
        return cached[1]

    def rewrite(self, model: nn.Module, site: WeightSite, config: TransformConfig, ws: Workspace) -> None:
        if not isinstance(config, GPTQConfig):
            raise TypeError(f"the gptq transform does not handle {type(config).__name__}")
        if not self._supported(site):
            raise ValueError(f"{site.name} cannot be GPTQ-quantized: only Linear and Conv1D weights are handled")
        out, inn = site.matrix_shape
        weight = model.get_parameter(site.name)
        if ws.materialize:
            stats = ws.stats.get(site.name) if ws.stats else None
            if stats is None or stats.covariance is None:
                raise ValueError(
                    f"gptq for {site.name} needs calibration statistics; pass calibration= (the batches the plan "
                    "was made with), or restore a saved model with passes.load"
                )
            w = site.as_matrix(weight.detach())
            buffers = gptq_encode(w, None, config, factor=self._factor(stats, ws, site))
        else:
            buffers = {
                name: torch.empty(shape, dtype=dtype, device=weight.device)
                for name, (shape, dtype) in config.storage.buffer_specs(out, inn).items()
            }
        # One PackedWeight serves every use (a weight shared by several Linear modules).
        packed = PackedWeight(config.storage, (out, inn), weight.dtype, buffers)
        for use in site.uses:
            replace_module(model, use.module, QuantizedLinear(packed, model.get_submodule(use.module).bias))


register_transform(GPTQTransform())
