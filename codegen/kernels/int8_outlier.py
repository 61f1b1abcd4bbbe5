"""LLM.int8(): per-token int8 activations × int8 weight, plus the fp16 outlier columns, in two launches.

Layout (``passes.int8_outlier.Int8OutlierWeight``): the input columns whose calibration absmax
passed the threshold (``outlier_columns``, int32) keep an fp16 weight ``outlier_weight``
``(out, n_outliers)``; the others, in the order ``input_index`` lists them (padded to a multiple
of 8 with repeats of the first, whose codes are 0), are stored as int8 ``codes`` ``(out, k_pad)``
with a per-row fp16 ``scale``. The semantics (the module's torch code)::

    x_k = x[:, input_index];  s_x = max|x_k| / 127 per row;  q = clamp(round(x_k / s_x), ±127)
    y = int32(q · codesᵀ) · s_x · scale  +  x[:, outlier_columns] · outlier_weightᵀ  +  bias

in fp32, rounded once to the input dtype. The torch path on CUDA runs the gather, the row absmax,
the quantization, ``torch._int_mm`` (which needs more than 16 rows: decode pads to 17), two
scalings, the outlier gather and matmul and the bias as separate kernels. Here:

1. :data:`QUANT_TEMPLATE`, a few rows per program, gathers each row's int8 columns through
   ``input_index``, computes ``s_x`` and quantizes once — rounding half to even as ``torch.round``,
   dividing exactly (``div_rn``) — writing ``q`` ``(m, k_pad)`` int8, ``s_x`` ``(m,)`` fp32 and the
   outlier columns ``x[:, outlier_columns]`` as a contiguous ``(m, n_outliers)`` fp32 matrix.
2. :data:`TEMPLATE` (``_int8_outlier_kernel``, the one the fusion pass fuses into) is a plain
   int8 × int8 → int32 tensor-core GEMM over contiguous ``q`` and ``codes`` tiles; it scales, adds
   the outlier columns' fp32 product (IEEE, as the reference's ``addmm`` in fp32) and the bias, runs
   the fused epilogue and stores once. No int32 product reaches memory.

Why two launches: one kernel used to do both, each program (``BM`` rows × ``BN`` outputs)
re-gathering, re-dividing and re-rounding its rows' whole input, so the ``out / BN`` programs that
share a row block all repeated that serial per-thread work, through scalar gathers. On an H100 (fp16,
4096 → 4096, 40 outliers, CUDA graphs, cold operands) it took 163.6 µs at 1 row (torch path 71.1,
dense ``F.linear`` 16.7), 865 µs at 512 rows (torch 182) and 6852 µs at 4096 (torch 982). The
prologue does that work once per row; the GEMM's loads are then contiguous, and the row stride
``k_pad`` is passed as a multiple of its alignment (``KP_ALIGN``, 8 for the stored format) so that
the int8 tiles load as vectors instead of byte by byte.
"""

from __future__ import annotations

import torch

from codegen.kernels.common import UNUSED, KernelError, check_float, launch_rows, reference_epilogue, tile_tail
from codegen.template import NO_EPILOGUE, Epilogue, build, shape_class

__all__ = [
    "CONFIGS",
    "MAX_K",
    "QUANT_CONFIGS",
    "int8_outlier_linear",
    "int8_outlier_linear_ref",
    "kernel",
    "quant_kernel",
    "quantize_activations",
]

#: Largest stored inner size whose int32 accumulation is exact (127² per term).
MAX_K = (2**31 - 1) // 127**2

QUANT_TEMPLATE = """

@triton.jit
def ${KERNEL}(
    x_ptr, index_ptr, outl_ptr, q_ptr, sx_ptr, xo_ptr, M, KP_DIV, NO, stride_xm, M_CLASS,
    HAS_OUTLIERS: tl.constexpr, KP_ALIGN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BO: tl.constexpr,
):
    KP = KP_DIV * KP_ALIGN  # q's row stride, known to be a multiple of KP_ALIGN
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    m_mask = offs_m < M

    # s_x: the absmax of each row's int8 columns (gathered through input_index) / 127
    amax = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(0, KP, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_mask = offs_k < KP
        col = tl.load(index_ptr + offs_k, mask=k_mask, other=0)
        xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + col[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(xk.to(tl.float32)), axis=1))
    sx = amax / 127.0
    div = tl.maximum(sx, 1e-30)
    tl.store(sx_ptr + offs_m, sx, mask=m_mask)

    # q = clamp(round(x_k / s_x), ±127): exact division, half to even (1.5·2²³ added and taken away)
    for k0 in range(0, KP, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_mask = offs_k < KP
        col = tl.load(index_ptr + offs_k, mask=k_mask, other=0)
        xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + col[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        v = tl.math.div_rn(xk.to(tl.float32), div[:, None])
        q = tl.minimum(tl.maximum((v + 12582912.0) - 12582912.0, -127.0), 127.0).to(tl.int8)
        tl.store(q_ptr + offs_m[:, None] * KP + offs_k[None, :], q, mask=m_mask[:, None] & k_mask[None, :])

    # x[:, outliers], contiguous and in fp32 (exact), for the GEMM's outlier product
    if HAS_OUTLIERS:
        for o0 in range(0, NO, BO):
            offs_o = o0 + tl.arange(0, BO)
            o_mask = offs_o < NO
            mask = m_mask[:, None] & o_mask[None, :]
            col = tl.load(outl_ptr + offs_o, mask=o_mask, other=0)
            xo = tl.load(x_ptr + offs_m[:, None] * stride_xm + col[None, :], mask=mask, other=0.0)
            tl.store(xo_ptr + offs_m[:, None] * NO + offs_o[None, :], xo.to(tl.float32), mask=mask)
"""

TEMPLATE = """

@triton.jit
def ${KERNEL}(
    q_ptr, sx_ptr, codes_ptr, scale_ptr, xo_ptr, outw_ptr, bias_ptr, out_ptr, ${AUX_PARAMS}
    M, N, KP_DIV, NO, M_CLASS,
    HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr, KP_ALIGN: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, BO: tl.constexpr,
):
    KP = KP_DIV * KP_ALIGN  # the row stride of q and codes, known to be a multiple of KP_ALIGN
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    m_mask = offs_m < M
    n_mask = offs_n < N

    # int32(q · codesᵀ): exact
    acc_i = tl.zeros((BM, BN), dtype=tl.int32)
    for k0 in range(0, KP, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_mask = offs_k < KP
        q = tl.load(q_ptr + offs_m[:, None] * KP + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0)
        w = tl.load(codes_ptr + offs_n[None, :] * KP + offs_k[:, None], mask=n_mask[None, :] & k_mask[:, None], other=0)
        acc_i = tl.dot(q, w, acc_i, out_dtype=tl.int32)
    acc = acc_i.to(tl.float32) * tl.load(sx_ptr + offs_m, mask=m_mask, other=0.0)[:, None]
    acc = acc * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]

    # + x[:, outliers] · outlier_weightᵀ in fp32
    if HAS_OUTLIERS:
        for o0 in range(0, NO, BO):
            offs_o = o0 + tl.arange(0, BO)
            o_mask = offs_o < NO
            xo = tl.load(xo_ptr + offs_m[:, None] * NO + offs_o[None, :], mask=m_mask[:, None] & o_mask[None, :], other=0.0)
            wo = tl.load(outw_ptr + offs_n[None, :] * NO + offs_o[:, None], mask=n_mask[None, :] & o_mask[:, None], other=0.0)
            acc = tl.dot(xo, wo.to(tl.float32), acc, input_precision="ieee")
"""
TEMPLATE += tile_tail("    ")

#: The prologue's tiles: ``BM`` rows, ``BK`` int8 columns and ``BO`` outlier columns at a time. One
#: row per program at decode; a few rows per program when there are thousands.
QUANT_CONFIGS = (
    {"BM": 1, "BK": 1024, "BO": 64, "num_warps": 4, "num_stages": 1},
    {"BM": 1, "BK": 2048, "BO": 64, "num_warps": 8, "num_stages": 1},
    {"BM": 4, "BK": 512, "BO": 64, "num_warps": 4, "num_stages": 1},
)

#: The GEMM's tiles: ``BM`` rows × ``BN`` outputs, ``BK`` int8 columns and ``BO`` outliers at a time
#: (every dimension of an int8 ``tl.dot`` at least 16). Decode: 16 rows (the smallest dot), wide
#: ``BK`` to stream ``codes``; prefill: 128 × 128 tensor-core tiles.
CONFIGS = (
    {"BM": 64, "BN": 64, "BK": 64, "BO": 16, "num_warps": 4, "num_stages": 3},
    {"BM": 16, "BN": 32, "BK": 256, "BO": 16, "num_warps": 4, "num_stages": 4},
    {"BM": 16, "BN": 64, "BK": 256, "BO": 16, "num_warps": 4, "num_stages": 3},
    {"BM": 16, "BN": 128, "BK": 128, "BO": 16, "num_warps": 4, "num_stages": 4},
    {"BM": 64, "BN": 128, "BK": 64, "BO": 16, "num_warps": 4, "num_stages": 4},
    {"BM": 128, "BN": 128, "BK": 64, "BO": 16, "num_warps": 8, "num_stages": 3},
    {"BM": 128, "BN": 256, "BK": 64, "BO": 16, "num_warps": 8, "num_stages": 3},
)


def quant_kernel():
    """The built prologue (gather, ``s_x``, quantization, outlier columns; cached)."""
    return build(QUANT_TEMPLATE, "_int8_outlier_quant_kernel", NO_EPILOGUE, QUANT_CONFIGS, ("M_CLASS", "KP_DIV"), __name__)


def kernel(epilogue: Epilogue = NO_EPILOGUE):
    """The built GEMM for ``epilogue`` (cached; ``.source`` is the generated code)."""
    return build(TEMPLATE, "_int8_outlier_kernel", epilogue, CONFIGS, ("M_CLASS", "N", "KP_DIV", "NO"), __name__)


def int8_outlier_linear_ref(x, codes, scale, input_index, outlier_columns, outlier_weight, bias=None, epilogue="", aux=()):
    """The semantics: the module's torch code (``passes.int8_outlier.int8_outlier_forward``: per-token
    quantization, an exact int8 matmul, the fp32 outlier product), then the epilogue."""
    from passes.int8_outlier import int8_outlier_forward

    y = int8_outlier_forward(x, codes, scale, input_index, outlier_columns, outlier_weight, bias)
    return reference_epilogue(y, epilogue, aux)


def _alignment(k_pad: int) -> int:
    """The largest of 16, 8, 1 dividing ``k_pad`` (the stored format pads it to a multiple of 8)."""
    return 16 if k_pad % 16 == 0 else 8 if k_pad % 8 == 0 else 1


def quantize_activations(x2, input_index, outlier_columns, *, wrap=None):
    """The prologue: ``(q, s_x, x_o)`` for the row-contiguous ``(m, in)`` activations ``x2``.

    ``q`` ``(m, k_pad)`` int8 and ``s_x`` ``(m,)`` fp32 are ``int8_rowwise(x2[:, input_index])``
    exactly; ``x_o`` is ``x2[:, outlier_columns]`` as a contiguous ``(m, n_outliers)`` fp32 matrix.
    """
    m, k_pad, n_out = x2.shape[0], input_index.numel(), outlier_columns.numel()
    q = torch.empty((m, k_pad), dtype=torch.int8, device=x2.device)
    sx = torch.empty((m,), dtype=torch.float32, device=x2.device)
    xo = torch.empty((m, n_out), dtype=torch.float32, device=x2.device)
    if m == 0:
        return q, sx, xo
    align = _alignment(k_pad)
    quant_kernel().launch(
        lambda meta: (-(-m // meta["BM"]),),
        x2, input_index, outlier_columns if n_out else UNUSED, q, sx, xo if n_out else UNUSED,
        m, k_pad // align, n_out, x2.stride(0), shape_class(m), HAS_OUTLIERS=n_out > 0, KP_ALIGN=align, wrap=wrap,
    )  # fmt: skip
    return q, sx, xo


def int8_outlier_linear(
    x, codes, scale, input_index, outlier_columns, outlier_weight, bias=None, epilogue: str = "", aux=(), *, wrap=None
) -> torch.Tensor:
    """``epilogue(LLM.int8(x) + bias)`` in two launches: the activations' quantization, then the GEMM.

    Args:
        x: ``(..., in)`` activations (fp32/fp16/bf16).
        codes: ``(out, k_pad)`` int8; scale: ``(out,)`` per-row weight scale (any float dtype).
        input_index: ``(k_pad,)`` the input column of each stored int8 column (int32 or int64).
        outlier_columns: ``(n_outliers,)`` int32 input columns kept in float; outlier_weight:
            ``(out, n_outliers)`` their weight.
        bias: ``(out,)`` or None. epilogue, aux: the fused epilogue and its output-shaped operands.
        wrap: ``torch.library.wrap_triton`` inside a ``triton_op``.
    """
    out, k_pad = codes.shape
    n_out = outlier_columns.numel()
    if codes.dtype != torch.int8 or tuple(input_index.shape) != (k_pad,) or tuple(scale.shape) != (out,):
        raise KernelError(
            f"LLM.int8 buffers must be int8 codes (out, k_pad), scale (out,), input_index (k_pad,); got codes "
            f"{codes.dtype} {tuple(codes.shape)}, scale {tuple(scale.shape)}, input_index {tuple(input_index.shape)}"
        )
    if tuple(outlier_weight.shape) != (out, n_out):
        raise KernelError(f"outlier_weight must be ({out}, {n_out}), got {tuple(outlier_weight.shape)}")
    if k_pad > MAX_K:
        raise KernelError(f"{k_pad} int8 columns overflow the exact int32 accumulation (at most {MAX_K})")
    if k_pad == 0:
        raise KernelError("no int8 columns (every input column is an outlier): use int8_outlier_linear_ref")
    check_float("x", x)
    if bias is not None:
        check_float("bias", bias, x.dtype, x.device)
    eager = type(x) is torch.Tensor  # real tensors launch directly; wrap_triton is for tracing
    wrap = None if eager else wrap
    ep, x2, m, auxs, y, out_shape = launch_rows(x, x.shape[-1], out, epilogue, aux)
    if m == 0:
        return y.view(out_shape)
    outlier_columns = outlier_columns.contiguous()
    q, sx, xo = quantize_activations(x2, input_index.contiguous(), outlier_columns, wrap=wrap)
    align = _alignment(k_pad)
    kernel(ep).launch(
        lambda meta: (-(-m // meta["BM"]), -(-out // meta["BN"])),
        q, sx, codes.contiguous(), scale.contiguous(), xo if n_out else UNUSED,
        outlier_weight.contiguous() if n_out else UNUSED, bias, y, *auxs,
        m, out, k_pad // align, n_out, shape_class(m),
        HAS_OUTLIERS=n_out > 0, HAS_BIAS=bias is not None, KP_ALIGN=align, wrap=wrap,
    )  # fmt: skip
    return y.view(out_shape)
