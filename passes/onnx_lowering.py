"""ONNX translations of the ``decomp::*`` dequantization ops (``passes.dequant_ops``).

Each op becomes a few standard ONNX nodes that read the packed buffers as stored (uint8 /
int8 initializers), so a file keeps the model's compression and ONNX Runtime runs it with
its CPU kernels:

- int8 rows: ``DequantizeLinear(codes, scale, axis=0)`` (QDQ).
- int2/3/4 groups: the codes are unpacked in-graph (``BitShift``/``BitwiseAnd``; int3 words
  of three bytes are assembled as uint32), then ``DequantizeLinear`` per group and ``+ min``:
  blocked (``axis=1, block_size=group``) at opset 21 and later, per axis over a
  ``(rows·groups, group)`` view before (the same values; torch.onnx's default opset is 20).
- NF4: unpacked indices ``Gather`` the 16-entry codebook, times the group's absmax.
- double-quantized constants: ``DequantizeLinear`` per block of 256 plus the block offset.

``DequantizeLinear`` is on the constant-folding deny list of both the onnxscript optimizer
and ONNX Runtime, so no exporter or session turns the codes into dense fp32 weights; the
small integer unpacking before it may be folded into uint8 codes (one byte per weight).

Values: each translation computes the same fp32 operations as the torch implementation
(products and sums of exactly representable integers and the stored constants), checked
bit for bit by the tests.

Use: ``passes.export_onnx`` passes :func:`onnx_translations` to ``torch.onnx.export``;
:func:`register_globally` (called by ``export_onnx`` and by :func:`onnx_translations`)
also adds them to onnxscript's torchlib registry, which every later ``torch.onnx.export``
call reads, so a plain ``torch.onnx.export(model, ...)`` works without the table.
Importing this module imports onnxscript (an optional dependency).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir
import onnxscript
import torch
from onnxscript import opset18 as op
from onnxscript import opset21 as op21
from onnxscript.onnx_types import FLOAT, INT8, INT32, UINT8

from passes import dequant_ops  # noqa: F401  (registers the torch.ops.decomp ops)
from passes import quant_formats as qf

__all__ = ["BLOCKED_OPSET", "onnx_translations", "register_globally"]

#: The first ONNX opset whose DequantizeLinear takes ``block_size`` (blocked quantization).
BLOCKED_OPSET = 21

_UINT32 = ir.DataType.UINT32.value
_INT64 = ir.DataType.INT64.value


def _target_opset() -> int:
    """The opset the running exporter writes (torch.onnx's ``OpRecorder.opset``), else the oldest we emit."""
    opset = getattr(onnxscript.evaluator.default(), "opset", None)
    return getattr(opset, "version", 18)


def _ints(values, dtype=ir.DataType.INT64):
    return op.Constant(value=ir.tensor(list(values), dtype=dtype))


def _unpack(codes, bits: int, numel: int):
    """uint8 ``(rows, row_bytes)`` packed codes → uint8 ``(rows, numel)`` codes (``quant_formats.unpack``)."""
    values, nbytes = qf._word(bits)
    if nbytes == 1:  # int2/int4: one byte holds whole codes
        word = op.Unsqueeze(codes, _ints([-1]))
        shifts = _ints([bits * i for i in range(values)], ir.DataType.UINT8)
        mask = _ints([(1 << bits) - 1], ir.DataType.UINT8)
    else:  # int3: little-endian words of three bytes, assembled as uint32
        parts = op.Cast(op.Reshape(codes, _ints([0, -1, nbytes])), to=_UINT32)
        parts = op.BitShift(parts, _ints([8 * i for i in range(nbytes)], ir.DataType.UINT32), direction="LEFT")
        pieces = op.Split(parts, axis=-1, num_outputs=nbytes)
        word = pieces[0]
        for piece in pieces[1:]:
            word = op.BitwiseOr(word, piece)
        shifts = _ints([bits * i for i in range(values)], ir.DataType.UINT32)
        mask = _ints([(1 << bits) - 1], ir.DataType.UINT32)
    q = op.BitwiseAnd(op.BitShift(word, shifts, direction="RIGHT"), mask)
    if nbytes != 1:
        q = op.Cast(q, to=ir.DataType.UINT8.value)
    # Rows hold whole words (padded columns are a multiple of 32): no crop needed here.
    return op.Reshape(q, _ints([0, numel]))


def _crop(w, padded: int, cols: int):
    return w if padded == cols else op.Slice(w, _ints([0]), _ints([cols]), _ints([1]))


def _group_scale(q, scale, groups: int, group_size: int):
    """``q · scale`` per group of ``group_size`` columns, fp32 ``(rows, groups·group_size)``."""
    if _target_opset() >= BLOCKED_OPSET:
        return op21.DequantizeLinear(q, scale, axis=1, block_size=group_size)
    flat = op.DequantizeLinear(op.Reshape(q, _ints([-1, group_size])), op.Reshape(scale, _ints([-1])), axis=0)
    return op.Reshape(flat, _ints([-1, groups * group_size]))


def dequantize_int8(codes: INT8, scale: FLOAT) -> FLOAT:
    """``decomp::dequantize_int8``: per-row QDQ."""
    return op.DequantizeLinear(codes, scale, axis=0)


def dequantize_groups(codes: UINT8, scale: FLOAT, minimum: FLOAT, bits: int, group_size: int, cols: int) -> FLOAT:
    """``decomp::dequantize_groups``: unpack, DequantizeLinear per group, ``+ min``, crop."""
    groups = scale.shape[-1]
    padded = groups * group_size
    q = _unpack(codes, bits, padded)
    scaled = op.Reshape(_group_scale(q, scale, groups, group_size), _ints([0, groups, group_size]))
    w = op.Reshape(op.Add(scaled, op.Unsqueeze(minimum, _ints([-1]))), _ints([0, padded]))
    return _crop(w, padded, cols)


def dequantize_nf4(codes: UINT8, absmax: FLOAT, group_size: int, cols: int) -> FLOAT:
    """``decomp::dequantize_nf4``: codebook Gather of the unpacked indices, times the group absmax."""
    groups = absmax.shape[-1]
    padded = groups * group_size
    q = op.Cast(_unpack(codes, 4, padded), to=_INT64)
    codebook = op.Constant(value=ir.tensor(qf.NF4_CODEBOOK.numpy()))
    values = op.Reshape(op.Gather(codebook, q), _ints([0, groups, group_size]))
    w = op.Reshape(op.Mul(values, op.Unsqueeze(absmax, _ints([-1]))), _ints([0, padded]))
    return _crop(w, padded, cols)


def dequantize_constants(codes: UINT8, blocks: FLOAT, block_size: int) -> FLOAT:
    """``decomp::dequantize_constants``: per-block QDQ of the flat codes plus each block's offset."""
    shape = [int(d) for d in codes.shape]
    numel = 1
    for d in shape:
        numel *= d
    n_blocks = -(-numel // block_size)
    flat = op.Reshape(codes, _ints([-1]))
    if n_blocks * block_size != numel:
        flat = op.Pad(flat, _ints([0, n_blocks * block_size - numel]))
    scale = op.Gather(blocks, _ints([0]), axis=1)
    offset = op.Gather(blocks, _ints([1]), axis=1)
    scaled = op.DequantizeLinear(op.Reshape(flat, _ints([n_blocks, block_size])), op.Reshape(scale, _ints([-1])), axis=0)
    values = op.Reshape(op.Add(scaled, offset), _ints([-1]))
    if n_blocks * block_size != numel:
        values = op.Slice(values, _ints([0]), _ints([numel]), _ints([0]))
    return op.Reshape(values, _ints(shape))


def int_mm(a: INT8, b: INT8) -> INT32:
    """``aten::_int_mm`` (int8 × int8 → int32, exact), used by LLM.int8()-style layers: MatMulInteger."""
    return op.MatMulInteger(a, b)


_TRANSLATIONS: dict[str, Callable] = {
    "dequantize_int8": dequantize_int8,
    "dequantize_groups": dequantize_groups,
    "dequantize_nf4": dequantize_nf4,
    "dequantize_constants": dequantize_constants,
}


def onnx_translations() -> dict:
    """``{torch op: ONNX translation}`` for every ``decomp::*`` op, as ``torch.onnx.export``'s
    ``custom_translation_table`` takes it. Also registers them globally (:func:`register_globally`)."""
    register_globally()
    table = {getattr(torch.ops.decomp, name).default: fn for name, fn in _TRANSLATIONS.items()}
    return {**table, torch.ops.aten._int_mm.default: int_mm}


_registered = False


def register_globally() -> None:
    """Add the translations to onnxscript's torchlib registry (read by every ``torch.onnx.export``).

    Idempotent. After this, ``torch.onnx.export(model, args, dynamo=True)`` of a model
    holding decomp's modules needs no ``custom_translation_table``.
    """
    global _registered
    if _registered:
        return
    from onnxscript.function_libs.torch_lib.registration import torch_op

    for name, fn in _TRANSLATIONS.items():
        torch_op(f"decomp::{name}", trace_only=True)(fn)
    torch_op("aten::_int_mm", trace_only=True)(int_mm)
    _registered = True
