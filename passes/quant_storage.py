"""Quantized storage formats shared by every family that stores quantized weights.

Not a transform: the formats (frozen configs that know their buffer layout, how to encode
an fp weight into it and decode it back) and :class:`PackedWeight`, the module holding one
encoded matrix. ``passes.quantize`` offers these formats as options; a low-rank + quantized
family stores its quantized part the same way.

Storage is real: ``config.nbytes(out, in)`` is the sum of the buffers ``config.encode``
produces (tested). Group formats pad the input dimension with zeros up to a multiple of the
group size; the padded codes are stored and counted. Rounding is round-to-nearest against
the constants the model really stores (fp16, or their double-quantized uint8 version).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from codegen import dispatch
from cost_model import MatmulCost, dtype_size, matmul_cost
from passes import dequant_ops
from passes import quant_formats as qf
from passes.config import TransformConfig, register_config

__all__ = [
    "BITS",
    "GROUP_SIZES",
    "Buffers",
    "Int8Config",
    "IntNConfig",
    "NF4Config",
    "PackedWeight",
    "QuantConfig",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "gpu_weight_bytes",
    "quantized_matmul_cost",
]

BITS = (2, 3, 4)
GROUP_SIZES = (32, 64, 128)

Specs = dict[str, tuple[tuple[int, ...], torch.dtype]]
Buffers = dict[str, torch.Tensor]


def gpu_weight_bytes(rows: int, nbytes: int, config) -> int:
    """The stored ``nbytes`` of a ``config``-quantized weight as the GPU kernels read them over ``rows``
    rows, counted at a dense matmul's rate: at decode rows (the GEMV) scaled by the format's measured
    rate relative to it (``codegen.kernels.dequant.GEMV_RELATIVE_RATE``), else as they are."""
    from codegen.kernels.dequant import GEMV_MAX_M, QuantFormat, gemv_relative_rate

    if rows > GEMV_MAX_M:
        return nbytes
    return round(nbytes / gemv_relative_rate(QuantFormat.of(config)))


def quantized_matmul_cost(rows: int, inn: int, out: int, nbytes: int, size: int, config=None) -> MatmulCost:
    """A quantized linear over ``rows`` activation rows: the stored ``nbytes`` read once by the
    dequantizing matmul. On a GPU (``decomp::quant_linear``): at decode rows (the GEMV) the bytes
    stream at the rate measured for ``config``'s format relative to a dense matmul
    (``codegen.kernels.dequant.GEMV_RELATIVE_RATE``); from ``DEQUANT_FIRST_M`` rows the weight is
    decoded once to a dense matrix (written and read back: ``2·out·inn·size`` more bytes, one more
    launch) and multiplied densely."""
    from codegen.kernels.dequant import DEQUANT_FIRST_M, GEMV_MAX_M

    plain = matmul_cost(rows, inn, out, nbytes, size)
    if rows >= DEQUANT_FIRST_M:
        fused = MatmulCost(plain.flops, plain.bytes + 2 * out * inn * size, 2)
    elif rows <= GEMV_MAX_M and config is not None:
        fused = MatmulCost(plain.flops, plain.bytes - nbytes + gpu_weight_bytes(rows, nbytes, config), 1)
    else:
        return plain
    return MatmulCost(plain.flops, plain.bytes, plain.kernels, fused)


def _check_choice(cls: str, field: str, value, valid: tuple) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value not in valid:
        raise ValueError(f"{cls}.{field} must be one of {valid}, got {value!r}")


def _check_bool(cls: str, field: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{cls}.{field} must be one of (False, True), got {value!r}")


# ---- constants: fp16, or double-quantized uint8 codes with an fp32 (scale, offset) per block ----


def _constant_specs(name: str, shape: tuple[int, int], double_quant: bool) -> Specs:
    if not double_quant:
        return {name: (shape, torch.float16)}
    blocks = -(-math.prod(shape) // qf.CONSTANT_BLOCK)
    return {f"{name}_codes": (shape, torch.uint8), f"{name}_blocks": ((blocks, 2), torch.float32)}


def _store_constant(name: str, x: torch.Tensor, double_quant: bool) -> tuple[Buffers, torch.Tensor]:
    """Buffers storing ``x`` and the fp32 values they reconstruct."""
    if not double_quant:
        stored = x.half()
        return {name: stored}, stored.float()
    codes, blocks = qf.quantize_constants(x)
    return {f"{name}_codes": codes, f"{name}_blocks": blocks}, qf.dequantize_constants(codes, blocks)


def _load_constant(buffers: Buffers, name: str, double_quant: bool, rows: torch.Tensor | None) -> torch.Tensor:
    if not double_quant:
        x = buffers[name]
        return (x if rows is None else x[rows]).float()
    dequantize = dequant_ops.dequantize_constants if torch.compiler.is_exporting() else qf.dequantize_constants
    x = dequantize(buffers[f"{name}_codes"], buffers[f"{name}_blocks"], qf.CONSTANT_BLOCK)
    return x if rows is None else x[rows]


# ---- the formats -------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantConfig(TransformConfig):
    """Shared behaviour of the quantized formats (not a format itself).

    A format is a layout of buffers (:meth:`buffer_specs`, whose sizes are :meth:`nbytes`),
    an encoder from an fp weight to those buffers, and a decoder back.
    """

    family: ClassVar[str] = "quantize"

    def buffer_specs(self, out: int, inn: int) -> Specs:
        """Name → (shape, dtype) of every buffer an ``out × in`` weight stores in this format."""
        raise NotImplementedError

    def nbytes(self, out: int, inn: int) -> int:
        """Exact stored bytes: codes (incl. padding) plus constants."""
        return sum(math.prod(shape) * dtype_size(dtype) for shape, dtype in self.buffer_specs(out, inn).values())

    def _quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, Buffers, tuple[torch.Tensor, ...]]:
        """(unpacked codes, constant buffers, fp32 constants as stored) of the ``(out, in)`` weight."""
        raise NotImplementedError

    def _dequantize(self, q: torch.Tensor, constants: tuple[torch.Tensor, ...], cols: int, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def _dequantize_op(self, codes: torch.Tensor, constants: tuple[torch.Tensor, ...], cols: int) -> torch.Tensor:
        """The same fp32 values as ``_dequantize(_unpack(codes))``, as one ``decomp::*`` op (for export)."""
        raise NotImplementedError

    def _pack(self, q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _unpack(self, codes: torch.Tensor, cols: int) -> torch.Tensor:
        raise NotImplementedError

    def _constants(self, buffers: Buffers, rows: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def encode(self, w: torch.Tensor) -> Buffers:
        """The buffers storing the ``(out, in)`` weight ``w`` (shapes as :meth:`buffer_specs`)."""
        q, buffers, _ = self._quantize(w)
        return {"codes": self._pack(q), **buffers}

    def decode(self, buffers: Buffers, cols: int, dtype: torch.dtype, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The dequantized ``(out, cols)`` weight, or only ``rows`` of it (1-D indices), in ``dtype``."""
        codes = buffers["codes"] if rows is None else buffers["codes"][rows]
        if torch.compiler.is_exporting():
            # One opaque op keeps the packed buffers packed in an exported graph (dequant_ops).
            return self._dequantize_op(codes, self._constants(buffers, rows), cols).to(dtype)
        return self._dequantize(self._unpack(codes, cols), self._constants(buffers, rows), cols, dtype)

    def roundtrip(self, w: torch.Tensor) -> torch.Tensor:
        """``decode(encode(w))`` in fp32 without the packing (what candidate pricing needs)."""
        q, _, constants = self._quantize(w)
        return self._dequantize(q, constants, w.shape[1], torch.float32)


@register_config
@dataclass(frozen=True)
class Int8Config(QuantConfig):
    """Symmetric int8 per output channel: ``q = round(w / s)``, ``s = max|w_row| / 127`` in fp16.

    Storage: ``out·in + 2·out`` bytes (1.0013 bytes per weight at in = 1536). Expected error:
    SQNR 41.8 dB on a Gaussian 576×1536 matrix (measured; each row's step is its absmax/127,
    about 3.4σ/127). A row with one large outlier loses precision on all its other weights.
    """

    def buffer_specs(self, out: int, inn: int) -> Specs:
        return {"codes": ((out, inn), torch.int8), "scale": ((out,), torch.float16)}

    def describe(self) -> str:
        return "int8"

    def _quantize(self, w):
        stored = (w.float().abs().amax(1) / 127).half()
        q, scale = qf.int8_rowwise(w, stored.float())
        return q, {"scale": stored}, (scale,)

    def _dequantize(self, q, constants, cols, dtype):
        return qf.int8_rowwise_dequantize(q, constants[0], dtype)

    def _dequantize_op(self, codes, constants, cols):
        return dequant_ops.dequantize_int8(codes, constants[0])

    def _pack(self, q):
        return q

    def _unpack(self, codes, cols):
        return codes

    def _constants(self, buffers, rows):
        scale = buffers["scale"]
        return ((scale if rows is None else scale[rows]).float(),)


@register_config
@dataclass(frozen=True)
class IntNConfig(QuantConfig):
    """Asymmetric round-to-nearest int2/3/4 per group of ``group_size`` input columns.

    ``scale = (max − min)/(2^bits − 1)``, ``zero = min``, ``q = round((w − min)/scale)``; scale
    and min are stored as fp16, or with ``double_quant`` as uint8 each with an fp32
    (scale, offset) per block of 256 groups (QLoRA/LQ-LoRA second-level quantization). Codes
    are packed (int4 two per byte, int2 four per byte, int3 eight per three bytes). Input
    sizes ``group_size`` does not divide are zero-padded to a multiple of it; the padded codes
    are stored and included in :meth:`nbytes`.

    Storage per weight (no padding): ``bits/8 + 4/group_size`` bytes, or
    ``bits/8 + 2/group_size + 16/(256·group_size)`` with double_quant.

    Expected error, SQNR on a Gaussian 576×1536 matrix (measured; double quantization
    changes it by < 0.01 dB there): int4 g32/g64/g128 22.1/21.0/20.0 dB, int3 15.5/14.3/13.4
    dB, int2 8.1/6.9/6.0 dB (about 6 dB per bit; halving the group gains ~1 dB).
    """

    bits: int
    group_size: int
    double_quant: bool = False

    def __post_init__(self):
        _check_choice("IntNConfig", "bits", self.bits, BITS)
        _check_choice("IntNConfig", "group_size", self.group_size, GROUP_SIZES)
        _check_bool("IntNConfig", "double_quant", self.double_quant)

    def describe(self) -> str:
        return f"int{self.bits} g{self.group_size}" + (" dq" if self.double_quant else "")

    def buffer_specs(self, out: int, inn: int) -> Specs:
        cols = qf.padded_columns(inn, self.group_size)
        groups = (out, cols // self.group_size)
        return {
            "codes": ((out, qf.packed_nbytes(cols, self.bits)), torch.uint8),
            **_constant_specs("scale", groups, self.double_quant),
            **_constant_specs("minimum", groups, self.double_quant),
        }

    def _quantize(self, w):
        scale, minimum = qf.group_minmax(w, self.bits, self.group_size)
        scale_buffers, scale = _store_constant("scale", scale, self.double_quant)
        min_buffers, minimum = _store_constant("minimum", minimum, self.double_quant)
        q, scale, minimum = qf.quantize_groups(w, self.bits, self.group_size, scale, minimum)
        return q, {**scale_buffers, **min_buffers}, (scale, minimum)

    def _dequantize(self, q, constants, cols, dtype):
        return qf.dequantize_groups(q, *constants, cols, dtype)

    def _dequantize_op(self, codes, constants, cols):
        return dequant_ops.dequantize_groups(codes, *constants, self.bits, self.group_size, cols)

    def _pack(self, q):
        # Every row holds whole packing words (padded columns are a multiple of 32), so the
        # flat packing splits into rows and an embedding can gather rows of bytes.
        return qf.pack(q, self.bits).view(q.shape[0], -1)

    def _unpack(self, codes, cols):
        return qf.unpack(codes, self.bits, qf.padded_columns(cols, self.group_size))

    def _constants(self, buffers, rows):
        return (
            _load_constant(buffers, "scale", self.double_quant, rows),
            _load_constant(buffers, "minimum", self.double_quant, rows),
        )


@register_config
@dataclass(frozen=True)
class NF4Config(QuantConfig):
    """QLoRA NormalFloat-4: per group of ``group_size`` input columns, ``w / absmax`` to the
    nearest of 16 fixed normal quantiles, packed two per byte; absmax stored as fp16 or, with
    ``double_quant``, as uint8 with an fp32 (scale, offset) per block of 256 groups. Input
    sizes are zero-padded to a multiple of ``group_size`` (stored and counted).

    Storage per weight (no padding): ``0.5 + 2/group_size`` bytes, or
    ``0.5 + 1/group_size + 8/(256·group_size)`` with double_quant.

    Expected error, SQNR on a Gaussian 576×1536 matrix (measured): g32/g64/g128
    21.2/20.7/20.4 dB (double quantization changes it by < 0.01 dB there) — at g64 and g128
    within 0.3 dB of int4 or better, for half of int4's constant bytes.
    """

    group_size: int
    double_quant: bool = False

    def __post_init__(self):
        _check_choice("NF4Config", "group_size", self.group_size, GROUP_SIZES)
        _check_bool("NF4Config", "double_quant", self.double_quant)

    def describe(self) -> str:
        return f"nf4 g{self.group_size}" + (" dq" if self.double_quant else "")

    def buffer_specs(self, out: int, inn: int) -> Specs:
        cols = qf.padded_columns(inn, self.group_size)
        return {
            "codes": ((out, qf.packed_nbytes(cols, 4)), torch.uint8),
            **_constant_specs("absmax", (out, cols // self.group_size), self.double_quant),
        }

    def _quantize(self, w):
        absmax_buffers, absmax = _store_constant("absmax", qf.nf4_absmax(w, self.group_size), self.double_quant)
        q, absmax = qf.nf4_quantize(w, self.group_size, absmax)
        return q, absmax_buffers, (absmax,)

    def _dequantize(self, q, constants, cols, dtype):
        return qf.nf4_dequantize(q, constants[0], cols, dtype)

    def _dequantize_op(self, codes, constants, cols):
        return dequant_ops.dequantize_nf4(codes, constants[0], self.group_size, cols)

    def _pack(self, q):
        return qf.pack(q, 4).view(q.shape[0], -1)

    def _unpack(self, codes, cols):
        return qf.unpack(codes, 4, qf.padded_columns(cols, self.group_size))

    def _constants(self, buffers, rows):
        return (_load_constant(buffers, "absmax", self.double_quant, rows),)


class PackedWeight(nn.Module):
    """A quantized ``(out, in)`` matrix: codes and constants as persistent buffers.

    One instance is shared by every module using the weight (a tied embedding and head):
    ``Module.to``/``cuda`` replace buffers module by module, so buffers registered on two
    modules would be split into two copies, while a shared child is moved once.

    Attributes:
        config: the storage format.
        shape: ``(out, in)`` of the original matrix.
        dtype: what lookups return: the original weight's dtype, following ``.to(dtype)``.
        kernel_args: ``(format string, constant names, input columns)`` the
            ``decomp::quant_linear`` kernels take (:func:`codegen.dispatch.kernel_args`), fixed at
            construction so that a compiled model does not re-derive (and guard) them per call.
    """

    def __init__(self, config: QuantConfig, shape: tuple[int, int], dtype: torch.dtype, buffers: Buffers):
        super().__init__()
        specs = config.buffer_specs(*shape)
        got = {name: (tuple(t.shape), t.dtype) for name, t in buffers.items()}
        if got != specs:
            raise ValueError(f"{config.describe()} of a {shape} weight stores {specs}, got {got}")
        self.config = config
        self.shape = tuple(shape)
        self.dtype = dtype
        self.kernel_args = dispatch.kernel_args(config, self.shape[1])
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor)

    def __setstate__(self, state):
        super().__setstate__(state)
        if "kernel_args" not in self.__dict__:  # pickled before the attribute existed
            self.kernel_args = dispatch.kernel_args(self.config, self.shape[1])

    def _apply(self, fn, recurse=True):
        # ``.half()``/``.to(bfloat16)`` would re-round the stored fp16/fp32 constants (and change
        # the stored bytes): buffers follow device moves only, and a dtype change goes to what
        # the weight dequantizes to.
        for name, buf in self._buffers.items():
            moved = fn(buf)
            self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return self

    def dequantize(self, rows: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (or only ``rows``, 1-D indices), dequantized to ``dtype`` (default: original)."""
        return self.config.decode(dict(self.named_buffers(recurse=False)), self.shape[1], dtype or self.dtype, rows)

    def extra_repr(self) -> str:
        return f"{self.shape[0]}×{self.shape[1]}, {self.config.describe()}"


class QuantizedLinear(nn.Module):
    """``y = x·Wᵀ + bias`` with W dequantized from a :class:`PackedWeight` (Linear or Conv1D)."""

    def __init__(self, packed: PackedWeight, bias: nn.Parameter | None):
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
        if dispatch.use_kernels(x, self.bias):
            return dispatch.quant_linear(x, self.packed, self.bias)  # dequantizes on chip, codes read as stored
        return F.linear(x, self.packed.dequantize(dtype=x.dtype), self.bias)


class QuantizedEmbedding(nn.Module):
    """Row lookup in a quantized table: only the looked-up rows are unpacked and dequantized."""

    def __init__(self, packed: PackedWeight, padding_idx: int | None):
        super().__init__()
        self.packed = packed
        self.padding_idx = padding_idx  # kept for reference; the table has no gradient to mask

    @property
    def num_embeddings(self) -> int:
        return self.packed.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.packed.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.packed.dequantize(rows=ids.reshape(-1))
        return rows.view(*ids.shape, self.embedding_dim)
