"""LLM.int8()-style linear layers (Dettmers et al. 2022): int8 × int8 matmul plus fp16 outlier columns.

Where it sits: an option of the ``"quantize"`` family, beside its weight-only formats. This
module is not a transform: it holds the config, the stored layout, the runtime module and
the pricing, and ``passes.quantize.QuantizeTransform`` offers and rewrites it (it lists
:class:`Int8OutlierConfig` in its ``config_types``, so ``transform_for`` finds it). Why
there and not a transform of its own: ``"quantize"`` means every quantized format, so
``transforms=("quantize",)`` must keep offering all of them, and the registry keys a
transform by one name (a second ``"quantize"`` would replace the first); the option is
enumerated by the family's transform like the other formats, and its code lives here like
``passes.quant_storage``'s. Preconditions: calibration statistics with ``input_absmax`` and
``input_sample`` (``cost_model.collect_statistics`` collects them); without them (data-free
runs) there is no option, and a replayed plan needs ``calibration=`` or ``passes.load``.

Outlier columns: the input features whose absolute value exceeded ``threshold`` on some
calibration row, ``input_absmax > threshold``. The default threshold is **6.0**, the
LLM.int8() paper's value (:data:`DEFAULT_THRESHOLD`), on the layer's real input scale.
Unlike bitsandbytes, which finds outlier columns anew in every batch at run time, they are
fixed at calibration, so the stored layout and bytes are fixed; a run-time input that exceeds
the threshold in another column is quantized with a coarser per-token step (an error the
estimate does not see). On SmolLM2-135M (2,048 calibration tokens) the threshold marks no
column of most attention and MLP inputs, 7–24 of the 1,536 ``down_proj`` inputs in early and
middle layers, but 1,294 in the last layer (whose inputs reach 502): a layer that is mostly
outliers stores mostly fp16. Only sites with at least one outlier column get the option:
without any it is plain W8A8, which stores at least int8's bytes with more error than
weight-only int8, so the solver (min error under a byte budget) would never take it.

Storage (``state_dict`` bytes equal :meth:`Int8OutlierConfig.nbytes`, tested):

- ``codes`` ``(out, k_pad)`` int8: the other ``k = in − n_outliers`` columns, symmetric per
  output row (``scale = max|W_row[non-outliers]| / 127``, rounded to the stored fp16 first),
  zero-padded to ``k_pad``, a multiple of 8 (CUDA's ``_int_mm`` wants the inner size a
  multiple of 8; storing ≤ 7 zero columns keeps the layout device-independent and costs
  ≤ 7·out bytes, counted);
- ``scale`` ``(out,)`` fp16; ``outlier_columns`` ``(n_outliers,)`` int32 (sorted input indices);
- ``outlier_weight`` ``(out, n_outliers)`` fp16: those weight columns (fp16 whatever the model
  dtype: exact for fp16 models, a 2⁻¹¹ relative rounding for fp32 ones, priced).

Runtime (:class:`Int8OutlierLinear`): the non-outlier activations of every row (token) are
quantized symmetrically to int8 against the row's absmax, multiplied with the int8 weight
by a real integer matmul, ``torch._int_mm`` (int8 × int8 → int32, exact), rescaled by the
row's and the output channel's scales; the outlier columns ``x[:, O] @ W[:, O]ᵀ`` run in
fp32 and are added, then the bias. ``_int_mm`` shape rules: none on CPU (torch 2.13, any
m, k, n); on CUDA m > 16 and k, n multiples of 8 — k is stored padded (above), rows and
output channels are padded at run time when needed and sliced off (:func:`int8_matmul`).
int32 accumulation is exact while ``k_pad·127² < 2³¹`` (k_pad ≤ 133,144; checked).

Error estimate, in the shared unit (``cost_model.perturbation_error``): the output error on
the calibration inputs of ``y − y' = (W − W')x + W'_N·e_x`` is priced as the sum of

- the weight part, exact: ``tr(Δ C Δᵀ)`` with ``Δ = W − W'`` (int8 columns and the fp16
  rounding of the outlier columns) and the calibration covariance C, as in
  ``perturbation_error``;
- the activation part, measured: the per-token int8 quantization of the non-outlier
  activations, ``‖W'_N (x_N − x̂_N)‖²``, averaged over ``SiteStats.input_sample`` (256
  calibration rows drawn at random over the batches; the run-time quantizer run on them);

scaled like ``perturbation_error`` (½ Fisher sensitivity, or relative to ``tr(W C Wᵀ)``).
Not priced: the cross term of the two parts (independent roundings; it averages out), and
the activation part's sampling error: per-token errors are heavy-tailed (the largest token
~10–20× the mean on SmolLM2), so 256 rows give the mean within about ±10% (128: ±25%).
Measured estimate / actual output error on held-out inputs: 0.99 on the tests' toy layer;
0.77–0.93 on SmolLM2 ``down_proj`` layers 2, 5 and 15 (held-out text has ~16% more
activation error than the calibration text), 0.69 on layer 29 (held-out inputs cross the
threshold outside the calibrated outlier columns). Weight-only int8 keeps activations in
full precision, and on SmolLM2 the activation part is 5–12× the weight part: there the
estimate (like the measurement: 29.5 vs 41.4 dB output SQNR on layer 5) ranks this option
below weight-only int8, and it pays only where outlier inputs amplify the int8 weight error
or where many outlier columns make it a step between int8 and dense (layer 29: 1.85 bytes per
weight, 58.8 dB against int8's 41.4 dB).

Cost of enumeration: one encode and an ``out·in²`` fp64 trace per site with outliers
(~0.13 s for a 576×1536 layer on 2 CPU cores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from codegen import dispatch
from cost_model import MatmulCost, SiteStats, dtype_size, matmul_cost
from ir import UseKind, WeightSite
from passes import quant_formats as qf
from passes.config import TransformConfig, register_config
from passes.transform import Candidate, Workspace, replace_module

__all__ = [
    "DEFAULT_THRESHOLD",
    "Int8OutlierConfig",
    "Int8OutlierLinear",
    "Int8OutlierWeight",
    "activation_error",
    "int8_matmul",
    "int8_outlier_forward",
    "outlier_candidate",
    "rewrite_int8_outlier",
]

#: LLM.int8()'s outlier threshold on the absolute input value.
DEFAULT_THRESHOLD = 6.0
_K_MULTIPLE = 8  # stored int8 columns are padded to a multiple of this (CUDA _int_mm)
_MAX_K = (2**31 - 1) // 127**2  # int32 accumulation stays exact up to this inner size

Specs = dict[str, tuple[tuple[int, ...], torch.dtype]]
Buffers = dict[str, torch.Tensor]


@register_config
@dataclass(frozen=True)
class Int8OutlierConfig(TransformConfig):
    """LLM.int8(): int8 weights and per-token int8 activations, fp16 outlier input columns.

    Attributes:
        threshold: an input feature is an outlier when its absolute value exceeded this on
            some calibration row (default 6.0, the paper's value).

    Storage: ``out·k_pad + 2·out + 4·n + 2·out·n`` bytes for ``n`` outlier columns
    (``k_pad`` = the other ``in − n`` columns rounded up to a multiple of 8): about 1 byte
    per weight plus 2 per outlier weight. Expected error (measured on a 128×256 layer whose
    inputs are N(0, 1) but for 4 features of std 40, read by 10× smaller weights): output
    SQNR 41.3 dB against eager fp32, where the same int8 matmul without outlier columns gives
    17.8 dB and weight-only int8 30.3 dB. Needs calibration (the outlier columns are measured).
    """

    family: ClassVar[str] = "quantize"
    threshold: float = DEFAULT_THRESHOLD

    def __post_init__(self):
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"Int8OutlierConfig.threshold must be a positive finite number (LLM.int8() uses 6.0), got {t!r}")
        object.__setattr__(self, "threshold", float(t))

    @property
    def activation_aware(self) -> bool:
        """Always True: ``passes.apply`` must collect calibration statistics to find the outliers."""
        return True

    def describe(self) -> str:
        return f"int8 outliers>{self.threshold:g}"

    def outlier_columns(self, input_absmax: torch.Tensor) -> torch.Tensor:
        """Sorted int64 indices of the input features whose calibration absmax exceeds the threshold."""
        return torch.nonzero(input_absmax > self.threshold).flatten()

    def buffer_specs(self, out: int, inn: int, n_outliers: int) -> Specs:
        """Name → (shape, dtype) of every buffer an ``out × in`` weight with ``n_outliers`` stores."""
        k_pad = -(-(inn - n_outliers) // _K_MULTIPLE) * _K_MULTIPLE
        return {
            "codes": ((out, k_pad), torch.int8),
            "scale": ((out,), torch.float16),
            "outlier_columns": ((n_outliers,), torch.int32),
            "outlier_weight": ((out, n_outliers), torch.float16),
        }

    def nbytes(self, out: int, inn: int, n_outliers: int) -> int:
        """Exact stored bytes (codes incl. padding, scales, indices, outlier columns)."""
        return sum(math.prod(s) * dtype_size(d) for s, d in self.buffer_specs(out, inn, n_outliers).values())

    def encode(self, w: torch.Tensor, outliers: torch.Tensor) -> Buffers:
        """The buffers storing the ``(out, in)`` weight ``w`` with ``outliers`` (1-D input indices) kept fp16.

        Raises:
            ValueError: outlier indices out of range or repeated, or more non-outlier columns
                than int32 accumulation allows.
        """
        out, inn = w.shape
        outliers = outliers.to(device=w.device, dtype=torch.long)
        if outliers.numel() and (outliers.min() < 0 or outliers.max() >= inn or outliers.unique().numel() != outliers.numel()):
            raise ValueError(f"outlier columns must be distinct indices in [0, {inn}), got {outliers.tolist()}")
        outliers = outliers.sort().values
        keep = _complement(outliers, inn)
        k_pad = self.buffer_specs(out, inn, outliers.numel())["codes"][0][1]
        if k_pad > _MAX_K:
            raise ValueError(f"{k_pad} int8 input columns overflow int32 accumulation (at most {_MAX_K})")
        wn = w.float().index_select(1, keep)
        stored = (wn.abs().amax(1) / 127 if keep.numel() else wn.new_zeros(out)).half()
        q, _ = qf.int8_rowwise(wn, stored.float())
        return {
            "codes": F.pad(q, (0, k_pad - keep.numel())),
            "scale": stored,
            "outlier_columns": outliers.to(torch.int32),
            "outlier_weight": w.index_select(1, outliers).half(),
        }

    @staticmethod
    def decode(buffers: Buffers, inn: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(out, in)`` weight the buffers represent, in ``dtype``."""
        outliers = buffers["outlier_columns"].long()
        keep = _complement(outliers, inn)
        codes = buffers["codes"][:, : keep.numel()]
        w = torch.empty(codes.shape[0], inn, dtype=torch.float32, device=codes.device)
        w[:, keep] = qf.int8_rowwise_dequantize(codes, buffers["scale"].float())
        w[:, outliers] = buffers["outlier_weight"].float()
        return w.to(dtype)


def _complement(outliers: torch.Tensor, inn: int) -> torch.Tensor:
    """The int64 input indices not in ``outliers``, ascending."""
    mask = torch.ones(inn, dtype=torch.bool, device=outliers.device)
    mask[outliers.long()] = False
    return torch.nonzero(mask).flatten()


# ---- runtime --------------------------------------------------------------------------------


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ bᵀ`` exactly in int32 by ``torch._int_mm``: ``a`` (m, k) int8, ``b`` (n, k) int8.

    CPU takes any shape. On CUDA, ``_int_mm`` needs m > 16 and k, n multiples of 8: rows of
    ``a`` and ``b`` are zero-padded as needed (k must already be a multiple of 8, as the
    stored codes are) and the result is sliced back to (m, n).
    """
    m, n = a.shape[0], b.shape[0]
    if a.is_cuda:
        if a.shape[1] % _K_MULTIPLE:
            raise ValueError(f"CUDA _int_mm needs the inner size a multiple of 8, got {a.shape[1]}")
        if m <= 16:
            a = F.pad(a, (0, 0, 0, 17 - m))
        if n % _K_MULTIPLE:
            b = F.pad(b, (0, 0, 0, _K_MULTIPLE - n % _K_MULTIPLE))
    return torch._int_mm(a, b.t())[:m, :n]


def int8_outlier_forward(x, codes, scale, input_index, outlier_columns, outlier_weight, bias=None) -> torch.Tensor:
    """``x @ Wᵀ + bias`` over :class:`Int8OutlierWeight`'s buffers in torch: the non-outlier columns
    (``input_index``) quantized per token, an exact int8 matmul with the codes, the fp32 product of the
    outlier columns; in fp32, rounded once to x's dtype (the kernel's reference too)."""
    out = codes.shape[0]
    rows = x.reshape(-1, x.shape[-1])
    if input_index.numel():
        xq, x_scale = qf.int8_rowwise(rows.index_select(1, input_index))  # per token
        y = int8_matmul(xq, codes).float().mul_(x_scale[:, None]).mul_(scale.float())
    else:  # every column is an outlier
        y = torch.zeros(rows.shape[0], out, dtype=torch.float32, device=x.device)
    if outlier_columns.numel():
        y.addmm_(rows.index_select(1, outlier_columns).float(), outlier_weight.float().t())
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype).view(*x.shape[:-1], out)


class Int8OutlierWeight(nn.Module):
    """An :class:`Int8OutlierConfig`-encoded ``(out, in)`` matrix; buffers as the config's specs.

    Shared by every module using the weight (as ``quant_storage.PackedWeight``). The number
    of outlier columns is read from the buffers, also when loading a ``state_dict``: a
    module built empty (``passes.load``) takes the saved shapes.

    Attributes:
        config: the config.
        shape: ``(out, in)``.
        dtype: what the layer returns: the original weight's dtype, following ``.to(dtype)``.
    """

    def __init__(self, config: Int8OutlierConfig, shape: tuple[int, int], dtype: torch.dtype, buffers: Buffers):
        super().__init__()
        n_outliers = buffers["outlier_columns"].numel() if "outlier_columns" in buffers else 0
        specs = config.buffer_specs(*shape, n_outliers)
        got = {name: (tuple(t.shape), t.dtype) for name, t in buffers.items()}
        if got != specs:
            raise ValueError(f"{config.describe()} of a {tuple(shape)} weight stores {specs}, got {got}")
        self.config = config
        self.shape = tuple(shape)
        self.dtype = dtype
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor)
        self.register_buffer("input_index", self._input_index(), persistent=False)

    def _input_index(self) -> torch.Tensor:
        """Which input column feeds each stored int8 column: the non-outliers, then (padding)
        repeats of the first one, whose codes are 0 — a duplicate leaves every row's absmax
        unchanged, so no separate pad of the activations is needed."""
        keep = _complement(self.outlier_columns, self.shape[1])
        k_pad = self.codes.shape[1]
        if keep.numel() == 0:
            return keep
        return torch.cat([keep, keep[:1].expand(k_pad - keep.numel())])

    def _apply(self, fn, recurse=True):
        # As PackedWeight: .half()/.float() would change the stored fp16 constants and bytes;
        # buffers follow device moves only and a dtype change goes to the output dtype.
        for name, buf in self._buffers.items():
            moved = fn(buf)
            self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        saved = state_dict.get(prefix + "outlier_columns")
        if saved is not None and saved.numel() != self.outlier_columns.numel():
            for name, (shape, dtype) in self.config.buffer_specs(*self.shape, saved.numel()).items():
                self._buffers[name] = torch.empty(shape, dtype=dtype, device=self._buffers[name].device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._buffers["input_index"] = self._input_index()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the buffers represent (for checks; the forward never builds it)."""
        return self.config.decode(dict(self.named_buffers(recurse=False)), self.shape[1], dtype or self.dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ Wᵀ + bias``: int8 matmul of the non-outlier columns, fp32 for the outliers."""
        if self.input_index.numel() and dispatch.use_kernels(x, bias):  # CUDA: one fused kernel
            return dispatch.int8_outlier_linear(x, self, bias)
        return int8_outlier_forward(x, self.codes, self.scale, self.input_index, self.outlier_columns, self.outlier_weight, bias)

    def extra_repr(self) -> str:
        return f"{self.shape[0]}×{self.shape[1]}, {self.config.describe()}, {self.outlier_columns.numel()} outlier columns"


class Int8OutlierLinear(nn.Module):
    """``y = x·Wᵀ + bias`` with W stored by :class:`Int8OutlierWeight` (replaces Linear or Conv1D)."""

    def __init__(self, packed: Int8OutlierWeight, bias: nn.Parameter | None):
        super().__init__()
        self.packed = packed
        self.bias = bias

    @property
    def in_features(self) -> int:
        return self.packed.shape[1]

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.packed.linear(x, self.bias)


# ---- pricing and rewrite (called by passes.quantize.QuantizeTransform) ------------------------


def _supported(site: WeightSite) -> bool:
    return all(u.kind in (UseKind.LINEAR, UseKind.CONV1D) for u in site.uses)


def _unit_scale(site: WeightSite, stats: SiteStats, w: torch.Tensor) -> float:
    """``perturbation_error(site, stats, w, Δ) / tr(ΔCΔᵀ)`` for a site whose uses are all linear-like."""
    if stats.sensitivity:
        return 0.5 * sum(stats.sensitivity.get(u.module, 0.0) for u in site.uses)
    w64, c = w.double(), stats.covariance.double()
    return 1.0 / max(((w64 @ c) * w64).sum().item(), 1e-300)


def activation_error(buffers: Buffers, inn: int, sample: torch.Tensor) -> float:
    """Mean over ``sample`` rows of ``‖W'_N (x_N − x̂_N)‖²``: the output error of the per-token
    int8 quantization of the non-outlier activations, through the stored int8 weight."""
    keep = _complement(buffers["outlier_columns"].long(), inn)
    if keep.numel() == 0:
        return 0.0
    xn = sample.float().index_select(1, keep.to(sample.device))
    xq, x_scale = qf.int8_rowwise(xn)
    err = xn - qf.int8_rowwise_dequantize(xq, x_scale)
    wn = qf.int8_rowwise_dequantize(buffers["codes"][:, : keep.numel()], buffers["scale"].float()).to(err.device)
    return (err @ wn.t()).double().pow(2).sum(1).mean().item()


def outlier_candidate(
    site: WeightSite, model: nn.Module, stats: SiteStats | None, config: Int8OutlierConfig | None = None
) -> Candidate | None:
    """The int8-outlier option for ``site``, or ``None`` where it is not offered.

    Not offered without calibration statistics (covariance, ``input_absmax``,
    ``input_sample``), for sites with a non-linear use (embedding, 1×1 conv), without an
    outlier column, when it stores no fewer bytes than the dense weight, or when fp16
    overflows. Error as in the module docstring.
    """
    config = config or Int8OutlierConfig()
    if (
        stats is None
        or stats.covariance is None
        or stats.input_absmax is None
        or stats.input_sample is None
        or not _supported(site)
    ):
        return None
    outliers = config.outlier_columns(stats.input_absmax)
    out, inn = site.matrix_shape
    nbytes = config.nbytes(out, inn, outliers.numel())
    if outliers.numel() == 0 or nbytes >= site.nbytes:
        return None
    w = site.as_matrix(model.get_parameter(site.name).detach()).float()
    buffers = config.encode(w, outliers)
    delta = (w - config.decode(buffers, inn)).double().cpu()
    weight_part = ((delta @ stats.covariance.double()) * delta).sum().item()
    error = _unit_scale(site, stats, w.cpu()) * (weight_part + activation_error(buffers, inn, stats.input_sample))
    if not math.isfinite(error):  # fp16 outlier columns or scales past 65504
        return None
    size = site.nbytes // site.numel
    # quantizing the activations and the outlier matmul are two more launches; on a GPU
    # (decomp::int8_outlier_linear) two in all: the activations quantized once (int8 q written and
    # read back), then the int8 GEMM with the outlier columns
    cost = MatmulCost(0, 0, 0)
    for u in site.uses:
        one = matmul_cost(u.rows, inn, out, nbytes, size)
        fused = MatmulCost(one.flops, one.bytes + 2 * u.rows * inn, one.kernels + 1)
        cost = cost + MatmulCost(one.flops, one.bytes, one.kernels + 2, fused)
    return Candidate(config, nbytes, max(0.0, error), cost)


def rewrite_int8_outlier(model: nn.Module, site: WeightSite, config: Int8OutlierConfig, ws: Workspace) -> None:
    """Replace every use of ``site`` by an :class:`Int8OutlierLinear` sharing one :class:`Int8OutlierWeight`.

    Raises:
        ValueError: a non-linear use, or (when materializing) no calibration statistics.
    """
    if not _supported(site):
        raise ValueError(f"{site.name} cannot use int8 with outlier columns: only Linear and Conv1D weights are handled")
    out, inn = site.matrix_shape
    weight = model.get_parameter(site.name)
    if ws.materialize:
        stats = ws.stats.get(site.name) if ws.stats else None
        if stats is None or stats.input_absmax is None:
            raise ValueError(
                f"int8 with outlier columns for {site.name} needs calibration statistics; pass calibration= (the "
                "batches the plan was made with), or restore a saved model with passes.load"
            )
        buffers = config.encode(site.as_matrix(weight.detach()), config.outlier_columns(stats.input_absmax))
    else:  # sized with no outliers; load_state_dict takes the saved sizes
        buffers = {
            name: torch.empty(shape, dtype=dtype, device=weight.device)
            for name, (shape, dtype) in config.buffer_specs(out, inn, 0).items()
        }
    packed = Int8OutlierWeight(config, (out, inn), weight.dtype, buffers)
    for use in site.uses:
        replace_module(model, use.module, Int8OutlierLinear(packed, model.get_submodule(use.module).bias))
