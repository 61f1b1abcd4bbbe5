"""The first dequant GEMV/GEMM kernels (v1), kept only so the benchmark can time them beside v2.

v1's GEMV gives each program 16–64 rows and walks K in 128-column steps (1–4 KB of codes per
program and step, 256 programs for a 4096-row weight): too little memory-level parallelism; its
byte masks (on ``k0 + 2·j``) also kept the code loads from vectorizing. v2
(:mod:`codegen.kernels.dequant`) replaces it. Same arguments and buffers; select with
``quant_linear(..., variant="v1")``.
"""

from __future__ import annotations

from codegen.kernels.common import DOT_HELPER
from codegen.kernels.dequant import _HELPERS, _KEY, _PARAMS, GEMM_TEMPLATE
from codegen.template import NO_EPILOGUE, Epilogue, build

__all__ = [
    "GEMM_CONFIGS",
    "GEMV_CONFIGS",
    "GEMV_TEMPLATE",
    "gemm_kernel",
    "gemv_kernel",
]

# v1's helpers as they were
_HELPERS_V1 = (
    DOT_HELPER
    + '''

@triton.jit
def _constant(vals_ptr, blocks_ptr, idx, mask, DQ: tl.constexpr):
    """fp32 constants at ``idx``: stored fp16, or uint8 codes · block scale + block offset."""
    if DQ:
        blk = idx // 256
        c = tl.load(vals_ptr + idx, mask=mask, other=0).to(tl.float32)
        return c * tl.load(blocks_ptr + 2 * blk, mask=mask, other=0.0) + tl.load(blocks_ptr + 2 * blk + 1, mask=mask, other=0.0)
    return tl.load(vals_ptr + idx, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _weight_tile(codes_ptr, c0_ptr, c1_ptr, c2_ptr, c3_ptr, cb_ptr, offs_n, n_mask, k0, row_bytes, n_groups,
                 KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, DQ: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr):
    """The fp32 ``(BN, BK)`` tile of W at rows ``offs_n``, columns ``k0 … k0 + BK``."""
    if KIND == 2:
        offs_k = k0 + tl.arange(0, BK)
        q = tl.load(codes_ptr + offs_n[:, None] * row_bytes + offs_k[None, :],
                    mask=n_mask[:, None] & (offs_k < row_bytes)[None, :], other=0)
        s = tl.load(c0_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        w = q.to(tl.float32) * s[:, None]
    else:
        w = _packed_tile(codes_ptr, c0_ptr, c1_ptr, c2_ptr, c3_ptr, cb_ptr, offs_n, n_mask, k0, row_bytes, n_groups,
                         KIND, BITS, GROUP, DQ, BN, BK)
    return w


@triton.jit
def _packed_tile(codes_ptr, c0_ptr, c1_ptr, c2_ptr, c3_ptr, cb_ptr, offs_n, n_mask, k0, row_bytes, n_groups,
                 KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, DQ: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr):
    """``_weight_tile`` of the packed group formats (intN, NF4)."""
    # packed codes: BK·BITS/8 contiguous bytes per row; words past the stored (padded) row are masked
    base = codes_ptr + offs_n[:, None] * row_bytes + (k0 * BITS) // 8
    if BITS == 4:
        j = tl.arange(0, BK // 2)
        b = tl.load(base + j[None, :], mask=n_mask[:, None] & ((k0 + 2 * j) < n_groups * GROUP)[None, :], other=0).to(tl.int32)
        q = tl.join(b & 15, b >> 4)
    elif BITS == 2:
        j = tl.arange(0, BK // 4)
        b = tl.load(base + j[None, :], mask=n_mask[:, None] & ((k0 + 4 * j) < n_groups * GROUP)[None, :], other=0).to(tl.int32)
        q = tl.join(tl.join(b & 3, (b >> 4) & 3), tl.join((b >> 2) & 3, b >> 6))
    else:
        # int3: eight codes per little-endian 3-byte word
        j = tl.arange(0, BK // 8)
        mask = n_mask[:, None] & ((k0 + 8 * j) < n_groups * GROUP)[None, :]
        word = tl.load(base + 3 * j[None, :], mask=mask, other=0).to(tl.int32)
        word = word | (tl.load(base + 3 * j[None, :] + 1, mask=mask, other=0).to(tl.int32) << 8)
        word = word | (tl.load(base + 3 * j[None, :] + 2, mask=mask, other=0).to(tl.int32) << 16)
        even = tl.join(tl.join(word & 7, (word >> 12) & 7), tl.join((word >> 6) & 7, (word >> 18) & 7))
        odd = tl.join(tl.join((word >> 3) & 7, (word >> 15) & 7), tl.join((word >> 9) & 7, (word >> 21) & 7))
        q = tl.join(even, odd)
    q = tl.reshape(q, (BN, BK // GROUP, GROUP))
    g = k0 // GROUP + tl.arange(0, BK // GROUP)
    idx = offs_n[:, None] * n_groups + g[None, :]
    cmask = n_mask[:, None] & (g < n_groups)[None, :]
    if KIND == 0:
        s = _constant(c0_ptr, c1_ptr, idx, cmask, DQ)
        mn = _constant(c2_ptr, c3_ptr, idx, cmask, DQ)
        w = q.to(tl.float32) * s[:, :, None] + mn[:, :, None]
    else:
        a = _constant(c0_ptr, c1_ptr, idx, cmask, DQ)
        w = tl.load(cb_ptr + q) * a[:, :, None]
    return tl.reshape(w, (BN, BK))
'''
)

GEMV_TEMPLATE = (
    _HELPERS_V1
    + """

@triton.jit
def ${KERNEL}("""
    + _PARAMS
    + """
    BN: tl.constexpr, BK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N

    # w ⊙ x accumulated in fp32 over K, reduced once
    part = tl.zeros((BN, BK), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        xk = tl.load(x_ptr + m * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        w = _weight_tile(codes_ptr, c0_ptr, c1_ptr, c2_ptr, c3_ptr, cb_ptr, offs_n, n_mask, k0, row_bytes, n_groups,
                         KIND, BITS, GROUP, DQ, BN, BK)
        part += w * xk[None, :]
    acc = tl.sum(part, axis=1)

    # low-rank term t·upᵀ (t = x·downᵀ computed before the launch)
    if HAS_LR:
        offs_r = tl.arange(0, R_PAD)
        tr = tl.load(t_ptr + m * R + offs_r, mask=offs_r < R, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + offs_n[:, None] * R + offs_r[None, :], mask=n_mask[:, None] & (offs_r < R)[None, :], other=0.0)
        acc += tl.sum(u.to(tl.float32) * tr[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    out_offs = m * N + offs_n
    out_mask = n_mask
    ${EPILOGUE}
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
"""
)

GEMM_TEMPLATE_V1 = _HELPERS_V1 + GEMM_TEMPLATE[len(_HELPERS) :]

GEMV_CONFIGS = (
    {"BN": 16, "BK": 128, "num_warps": 4, "num_stages": 2},
    {"BN": 32, "BK": 128, "num_warps": 4, "num_stages": 2},
    {"BN": 8, "BK": 256, "num_warps": 4, "num_stages": 2},
    {"BN": 16, "BK": 256, "num_warps": 4, "num_stages": 3},
    {"BN": 64, "BK": 128, "num_warps": 8, "num_stages": 2},
)
GEMM_CONFIGS = (
    {"BM": 32, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 3},
    {"BM": 64, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 3},
    {"BM": 128, "BN": 64, "BK": 128, "num_warps": 8, "num_stages": 3},
    {"BM": 64, "BN": 128, "BK": 128, "num_warps": 8, "num_stages": 3},
)


def gemv_kernel(epilogue: Epilogue = NO_EPILOGUE):
    """v1's GEMV kernel for ``epilogue`` (cached)."""
    return build(
        GEMV_TEMPLATE, "_dequant_gemv_v1_kernel", epilogue, GEMV_CONFIGS, _KEY, __name__
    )


def gemm_kernel(epilogue: Epilogue = NO_EPILOGUE):
    """v1's GEMM kernel: v2's GEMM body over v1's helpers, v1's tuning configs."""
    return build(
        GEMM_TEMPLATE_V1,
        "_dequant_gemm_v1_kernel",
        epilogue,
        GEMM_CONFIGS,
        _KEY,
        __name__,
    )
