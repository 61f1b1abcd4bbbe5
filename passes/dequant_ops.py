"""The dequantization steps of ``passes.quant_storage``'s formats as ``decomp::*`` custom ops.

Why ops: traced as plain aten code, a dequantization is a chain of bit shifts and
multiplications over an initializer, and an exporter's constant folding is free to evaluate
it and write the dense fp32 weight into the file. As one opaque op each, a graph keeps the
packed buffers as they are stored and every consumer (``passes.onnx_lowering``'s ONNX
translations, a compiler) sees what the op means. ``PackedWeight.dequantize`` calls them
while ``torch.export`` traces (``torch.compiler.is_exporting()``); eager code and
``torch.compile`` keep the plain torch path, which the ops' implementations are, so both
compute the same values by construction.

Every op returns fp32 (the caller casts to the weight's dtype) and works on any number of
rows, so an embedding gathers rows of codes and constants first and dequantizes only those.
The fake (meta) implementations give the output shape, so ``torch.export`` and dynamo can
trace through them with symbolic row counts.

Importing this module registers the ops; it needs only torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from passes import quant_formats as qf

__all__ = ["OPS", "dequantize_constants", "dequantize_groups", "dequantize_int8", "dequantize_nf4"]


@torch.library.custom_op("decomp::dequantize_int8", mutates_args=())
def dequantize_int8(codes: Tensor, scale: Tensor) -> Tensor:
    """``codes · scale`` per row: ``codes`` int8 ``(rows, cols)``, ``scale`` fp32 ``(rows,)``."""
    return qf.int8_rowwise_dequantize(codes, scale)


@dequantize_int8.register_fake
def _(codes: Tensor, scale: Tensor) -> Tensor:
    return codes.new_empty(codes.shape, dtype=torch.float32)


@torch.library.custom_op("decomp::dequantize_groups", mutates_args=())
def dequantize_groups(codes: Tensor, scale: Tensor, minimum: Tensor, bits: int, group_size: int, cols: int) -> Tensor:
    """Asymmetric group dequantization ``q · scale + minimum`` of packed codes.

    Args:
        codes: uint8 ``(rows, row_bytes)``, each row packing ``n_groups · group_size`` codes of
            ``bits`` bits (:func:`passes.quant_formats.pack`).
        scale, minimum: fp32 ``(rows, n_groups)``.
        bits: 2, 3 or 4.
        group_size: columns per group.
        cols: the unpadded column count the result is cropped to.

    Returns:
        fp32 ``(rows, cols)``.
    """
    q = qf.unpack(codes, bits, scale.shape[1] * group_size)
    return qf.dequantize_groups(q, scale, minimum, cols)


@dequantize_groups.register_fake
def _(codes: Tensor, scale: Tensor, minimum: Tensor, bits: int, group_size: int, cols: int) -> Tensor:
    return codes.new_empty((codes.shape[0], cols), dtype=torch.float32)


@torch.library.custom_op("decomp::dequantize_nf4", mutates_args=())
def dequantize_nf4(codes: Tensor, absmax: Tensor, group_size: int, cols: int) -> Tensor:
    """NF4: ``NF4_CODEBOOK[q] · absmax`` per group of packed 4-bit indices, cropped to ``cols``.

    ``codes`` uint8 ``(rows, row_bytes)``, ``absmax`` fp32 ``(rows, n_groups)``; fp32 result.
    """
    q = qf.unpack(codes, 4, absmax.shape[1] * group_size)
    return qf.nf4_dequantize(q, absmax, cols)


@dequantize_nf4.register_fake
def _(codes: Tensor, absmax: Tensor, group_size: int, cols: int) -> Tensor:
    return codes.new_empty((codes.shape[0], cols), dtype=torch.float32)


@torch.library.custom_op("decomp::dequantize_constants", mutates_args=())
def dequantize_constants(codes: Tensor, blocks: Tensor, block_size: int) -> Tensor:
    """Double-quantized constants back to fp32: ``codes · scale + offset`` per block of the flat codes.

    ``codes`` uint8 (any shape), ``blocks`` fp32 ``(n_blocks, 2)`` of ``[scale, offset]``;
    the result has ``codes``' shape.
    """
    return qf.dequantize_constants(codes, blocks, block_size)


@dequantize_constants.register_fake
def _(codes: Tensor, blocks: Tensor, block_size: int) -> Tensor:
    return codes.new_empty(codes.shape, dtype=torch.float32)


#: Every op this module defines (what an exporter needs a translation for).
OPS = (
    torch.ops.decomp.dequantize_int8.default,
    torch.ops.decomp.dequantize_groups.default,
    torch.ops.decomp.dequantize_nf4.default,
    torch.ops.decomp.dequantize_constants.default,
)
