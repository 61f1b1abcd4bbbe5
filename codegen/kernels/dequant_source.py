"""The Triton source of the dequantize-and-multiply kernels.

:mod:`codegen.kernels.dequant` builds kernels from these templates (``codegen.template.build``)
and launches them; the formats, the paths (GEMV for decode, GEMM for prefill, the weight decoded
once) and the stored layout they read are described there. Here: the shared ``@triton.jit``
helpers (code unpacking, group constants, decoding in the input dtype, the HALF2 loop's PTX), the
GEMV, GEMM and weight-decoding templates with their ``${EPILOGUE}`` slot. The configs the
autotuner chooses from, and what the H100 runs measured of them, are in
:mod:`codegen.kernels.dequant_tuning`.
"""

from __future__ import annotations

from codegen.kernels.common import DOT_HELPER, ROW_TAIL, tile_tail

__all__ = [
    "CONSTANT_BLOCK",
    "DEQUANT_TEMPLATE",
    "GEMM_TEMPLATE",
    "GEMV_GROUP_TEMPLATE",
    "GEMV_TEMPLATE",
    "HALF2_ASM",
    "NF4_VALUES",
]

#: The HALF2 loop's per-word product (PTX, sm_53+): a 32-bit word of 8 int4 codes (byte j: code 2j in
#: the low nibble, 2j+1 in the high one) against the 8 fp16 inputs as 4 pairs (``$2`` … ``$5``: pair k
#: = x[2k] low, x[2k+1] high). Per byte: ``prmt`` copies it into all four bytes, ``lop3`` keeps the
#: low nibble in the low half's mantissa under 64.0 (ulp 1/16) and the high nibble in the high half's
#: under 4.0 (ulp 1/256, the nibble sits 4 bits up), so the halves read 64 + q/16 and 4 + q'/16;
#: ``sub.f16x2`` of (64.5, 4.5) leaves ((q−8)/16, (q'−8)/16) exactly, and one ``fma.f16x2`` adds both
#: products. Four instructions per two codes, no conversion; the two fp16 lanes are summed in fp32.
#: Centred and scaled by 1/16, each product is at most |x|/2, so the fp16 partial sums cannot
#: overflow where x itself does not.
HALF2_ASM = """
{
.reg .b32 t, p, c, acc;
.reg .b16 lo, hi;
.reg .f32 flo, fhi;
mov.b32 c, 0x44805408;
prmt.b32 t, $1, $1, 0x0000;
lop3.b32 p, t, 0x00F0000F, 0x44005400, 0xEA;
sub.f16x2 p, p, c;
mul.rn.f16x2 acc, p, $2;
prmt.b32 t, $1, $1, 0x1111;
lop3.b32 p, t, 0x00F0000F, 0x44005400, 0xEA;
sub.f16x2 p, p, c;
fma.rn.f16x2 acc, p, $3, acc;
prmt.b32 t, $1, $1, 0x2222;
lop3.b32 p, t, 0x00F0000F, 0x44005400, 0xEA;
sub.f16x2 p, p, c;
fma.rn.f16x2 acc, p, $4, acc;
prmt.b32 t, $1, $1, 0x3333;
lop3.b32 p, t, 0x00F0000F, 0x44005400, 0xEA;
sub.f16x2 p, p, c;
fma.rn.f16x2 acc, p, $5, acc;
mov.b32 {lo, hi}, acc;
cvt.f32.f16 flo, lo;
cvt.f32.f16 fhi, hi;
add.f32 $0, flo, fhi;
}
"""

CONSTANT_BLOCK = 256  # passes.quant_formats.CONSTANT_BLOCK (checked in the tests)

#: NF4's 16 values (``passes.quant_formats.NF4_CODEBOOK``, checked in the tests), written into the
#: kernel source as constants: no codebook tensor to pass, so a compiled graph holds no CPU
#: constant for it (inductor skips CUDA graphs for graphs with CPU tensors; not yet seen on a GPU).
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip

_NF4_CODEBOOK_SOURCE = (
    "\n\n@triton.jit\ndef _nf4_codebook():\n"
    '    """The NF4 values as a 16-element fp32 tensor in registers (from constants)."""\n'
    "    i = tl.arange(0, 16)\n    cb = tl.zeros((16,), dtype=tl.float32)\n"
    + "".join(f"    cb = tl.where(i == {k}, {v!r}, cb)\n" for k, v in enumerate(NF4_VALUES))
    + "    return cb\n"
)

_HELPERS = (
    DOT_HELPER
    + _NF4_CODEBOOK_SOURCE
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
def _group_constants(c0_ptr, c1_ptr, c2_ptr, c3_ptr, offs_n, n_mask, k0, n_groups,
                     KIND: tl.constexpr, GROUP: tl.constexpr, DQ: tl.constexpr, BK: tl.constexpr):
    """The ``(BN, BK/GROUP)`` constants of the groups in columns ``k0 … k0 + BK`` (masked past the
    row): (scale, minimum) for intN, (absmax, absmax) for NF4 (the second unused). Stored fp16
    constants come back as loaded (the caller widens them where it uses them, so that a load
    issued one iteration ahead is not waited on here); double-quantized ones decoded, in fp32."""
    g = k0 // GROUP + tl.arange(0, BK // GROUP)
    idx = offs_n[:, None] * n_groups + g[None, :]
    cmask = n_mask[:, None] & (g < n_groups)[None, :]
    if DQ:
        s = _constant(c0_ptr, c1_ptr, idx, cmask, DQ)
        mn = s
        if KIND == 0:
            mn = _constant(c2_ptr, c3_ptr, idx, cmask, DQ)
    else:
        s = tl.load(c0_ptr + idx, mask=cmask, other=0.0)
        mn = s
        if KIND == 0:
            mn = tl.load(c2_ptr + idx, mask=cmask, other=0.0)
    return s, mn


@triton.jit
def _nf4_values(q, DT: tl.constexpr):
    """``codebook[q]`` in ``DT`` from the 16 codebook values held in registers (``tl.gather``): a
    gather from global memory per code would be an indirect load, which the loop pipeliner stages
    through shared memory at a tile's full size per stage."""
    cb = _nf4_codebook().to(DT)
    flat = tl.reshape(q, (q.numel,))
    return tl.reshape(tl.gather(cb, flat, 0), q.shape)


@triton.jit
def _code_values(q, DT: tl.constexpr):
    """Non-negative int32 codes (< 16) as ``DT`` floats, exactly and without a conversion
    instruction: OR-ed into the low mantissa bits of a power of two ``P`` they read as ``P + q``;
    subtract ``P``. The GEMM's weight tiles use it (``cvt`` runs at a quarter of the FMA rate on
    NVIDIA GPUs, and the fp32 decode took two per weight: int→fp32, fp32→fp16), and the GEMV's
    ``MAGIC`` variant (alone it made no difference on the H100, run 6: that loop waited on loads)."""
    if DT == tl.float16:
        return (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
    elif DT == tl.bfloat16:
        return (q | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True) - 128.0
    else:
        return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _weight_tile(codes_ptr, c0_ptr, c1_ptr, c2_ptr, c3_ptr, offs_n, n_mask, k0, row_bytes, n_groups,
                 KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, DQ: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, DT: tl.constexpr):
    """The ``(BN, BK)`` tile of W at rows ``offs_n``, columns ``k0 … k0 + BK``, decoded in ``DT``
    (the input dtype, which ``tl.dot`` takes: 16-bit arithmetic, no per-weight conversions; the
    reference rounds the fp32 decode to the input dtype, so the two agree to that rounding)."""
    if KIND == 2:
        offs_k = k0 + tl.arange(0, BK)
        q = tl.load(codes_ptr + offs_n[:, None] * row_bytes + offs_k[None, :],
                    mask=n_mask[:, None] & (offs_k < row_bytes)[None, :], other=0)
        s = tl.load(c0_ptr + offs_n, mask=n_mask, other=0.0).to(DT)
        if DT == tl.float16:
            qv = ((q.to(tl.int32) + 128) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1152.0
        else:
            qv = q.to(DT)
        w = qv * s[:, None]
    else:
        w = _packed_tile(codes_ptr, c0_ptr, c1_ptr, c2_ptr, c3_ptr, offs_n, n_mask, k0, row_bytes, n_groups,
                         KIND, BITS, GROUP, DQ, BN, BK, DT)
    return w


@triton.jit
def _codes(codes_ptr, offs_n, n_mask, k0, row_bytes, n_groups,
           BITS: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """The int32 ``(BN, BK)`` codes of rows ``offs_n``, columns ``k0 … k0 + BK`` (packed formats)."""
    # packed codes: BK·BITS/8 contiguous bytes per row; words past the stored (padded) row are masked
    # (masks on the byte index, which is contiguous along the tile, so the loads stay 16-byte vectors)
    kb = (k0 * BITS) // 8
    base = codes_ptr + offs_n[:, None] * row_bytes + kb
    if BITS == 4:
        j = tl.arange(0, BK // 2)
        b = tl.load(base + j[None, :], mask=n_mask[:, None] & ((kb + j) < row_bytes)[None, :], other=0,
                    eviction_policy="evict_first").to(tl.int32)
        q = tl.join(b & 15, b >> 4)
    elif BITS == 2:
        j = tl.arange(0, BK // 4)
        b = tl.load(base + j[None, :], mask=n_mask[:, None] & ((kb + j) < row_bytes)[None, :], other=0,
                    eviction_policy="evict_first").to(tl.int32)
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
    return tl.reshape(q, (BN, BK))


@triton.jit
def _packed_tile(codes_ptr, c0_ptr, c1_ptr, c2_ptr, c3_ptr, offs_n, n_mask, k0, row_bytes, n_groups,
                 KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, DQ: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, DT: tl.constexpr):
    """``_weight_tile`` of the packed group formats (intN, NF4)."""
    q = tl.reshape(_codes(codes_ptr, offs_n, n_mask, k0, row_bytes, n_groups, BITS, GROUP, BN, BK),
                   (BN, BK // GROUP, GROUP))
    s, mn = _group_constants(c0_ptr, c1_ptr, c2_ptr, c3_ptr, offs_n, n_mask, k0, n_groups, KIND, GROUP, DQ, BK)
    if KIND == 0:
        w = _code_values(q, DT) * s.to(DT)[:, :, None] + mn.to(DT)[:, :, None]
    else:
        w = _nf4_values(q, DT) * s.to(DT)[:, :, None]
    return tl.reshape(w, (BN, BK))


@triton.jit
def _rms_rstd(x_ptr, m, K, stride_xm, eps, BK: tl.constexpr):
    """``rsqrt(mean(x[m]²) + eps)`` in fp32 (an RMSNorm's scale; x is one row, read from L2)."""
    ss = tl.zeros((BK,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs = k0 + tl.arange(0, BK)
        xk = tl.load(x_ptr + m * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        ss += xk * xk
    return tl.rsqrt(tl.sum(ss, axis=0) / K + eps)


@triton.jit
def _rms_x(x, nw_ptr, offs, mask, rstd):
    """``w · (x·rstd)`` rounded as an HF Llama RMSNorm rounds it: the fp32 product to x's dtype, times
    the weight, rounded again. Both products in fp32 (exact for 16-bit operands, then rounded
    once), so the result is torch's to the bit and no 16-bit arithmetic runs (the interpreter
    has none for bfloat16)."""
    w = tl.load(nw_ptr + offs, mask=mask, other=0.0)
    xr = (x.to(tl.float32) * rstd).to(x.dtype)
    return (w.to(tl.float32) * xr.to(tl.float32)).to(x.dtype)

@triton.jit
def _half2_x_norm(x_ptr, m, K, stride_xm, k0, nw_ptr, rstd, BK: tl.constexpr, GROUP: tl.constexpr):
    """x[m, k0 … k0 + BK], RMS-normalised (``_rms_x``), as the HALF2 loop takes it: four int32
    ``(BK/8,)`` tensors, the k-th holding the fp16 pair (x[8u + 2k], x[8u + 2k + 1]) of word u (low,
    high half), and Σx per group (fp32, ``(BK/GROUP,)``)."""
    offs = k0 + tl.arange(0, BK // 8)[:, None] * 8 + tl.arange(0, 8)[None, :]
    x8 = _rms_x(tl.load(x_ptr + m * stride_xm + offs, mask=offs < K, other=0.0), nw_ptr, offs, offs < K, rstd)
    xsum = tl.sum(tl.reshape(tl.sum(x8.to(tl.float32), axis=1), (BK // GROUP, GROUP // 8)), axis=1)
    bits = x8.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    lo, hi = tl.split(tl.reshape(bits, (BK // 8, 4, 2)))
    even, odd = tl.split(tl.reshape(lo | (hi << 16), (BK // 8, 2, 2)))
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return x0, x1, x2, x3, xsum


@triton.jit
def _half2_x_rows(x_ptr, m, K, stride_xm, k0, BK: tl.constexpr, GROUP: tl.constexpr):
    """``_half2_x_norm`` without the RMSNorm: pair k of word u is the 32-bit value at x + 8u + 2k, loaded
    as stored (no fp16 unpacking and repacking), as ``(1, BK/8)`` tensors. The compiler still moves
    them into the words' layout through shared memory (8 of the loop's 12 barriers, sm_90 SASS);
    loading them in that layout directly (every row's thread its own copy) cost more instructions
    (374 vs 275 per 64 codes). Needs K and the row stride multiples of 8 and 2 (``WORDS``)."""
    offs_w = k0 // 8 + tl.arange(0, BK // 8)[None, :]
    w_mask = 8 * offs_w < K
    base = x_ptr.to(tl.pointer_type(tl.int32)) + (m * stride_xm) // 2 + 4 * offs_w
    x0 = tl.load(base, mask=w_mask, other=0)
    x1 = tl.load(base + 1, mask=w_mask, other=0)
    x2 = tl.load(base + 2, mask=w_mask, other=0)
    x3 = tl.load(base + 3, mask=w_mask, other=0)
    offs_k3 = k0 + tl.arange(0, BK // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    xsum = tl.sum(tl.load(x_ptr + m * stride_xm + offs_k3, mask=offs_k3 < K, other=0.0).to(tl.float32), axis=1)
    return x0, x1, x2, x3, xsum


@triton.jit
def _half2_pair(acc_lo, acc_hi, words, xk, k: tl.constexpr):
    """One byte of ``_half2_dot``'s emulation: byte k's two codes times pair k, in fp16."""
    b = (words >> (8 * k)) & 255
    v_lo = ((b & 15) - 8).to(tl.float16) * 0.0625
    v_hi = ((b >> 4) - 8).to(tl.float16) * 0.0625
    x_lo = xk.to(tl.int16).to(tl.float16, bitcast=True)
    x_hi = (xk >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return acc_lo + v_lo * x_lo, acc_hi + v_hi * x_hi


@triton.jit
def _half2_dot(words, x0, x1, x2, x3, ASM: tl.constexpr):
    """Σ over each int32 word's 8 int4 codes of ((q − 8)/16)·x, two fp16 lanes summed in fp32
    (``HALF2_ASM``). Without ``ASM`` (the interpreter, which runs no PTX) the same arithmetic in
    Triton ops: fp16 products and sums, rounded per operation where the PTX fuses them."""
    if ASM:
        return tl.inline_asm_elementwise(
            asm=HALF2_SOURCE, constraints="=r,r,r,r,r,r", args=[words, x0, x1, x2, x3], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        zero = tl.zeros(words.shape, dtype=tl.float16)
        lo, hi = _half2_pair(zero, zero, words, x0, 0)
        lo, hi = _half2_pair(lo, hi, words, x1, 1)
        lo, hi = _half2_pair(lo, hi, words, x2, 2)
        lo, hi = _half2_pair(lo, hi, words, x3, 3)
        return lo.to(tl.float32) + hi.to(tl.float32)


@triton.jit
def _gemv_rows(x_ptr, codes_ptr, c0_ptr, c1_ptr, c2_ptr, c3_ptr, offs_n, n_mask, m, K, row_bytes, n_groups, stride_xm,
               nw_ptr, rstd,
               KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, DQ: tl.constexpr, BN: tl.constexpr,
               BK: tl.constexpr, LS: tl.constexpr, PREFETCH: tl.constexpr, ACC3: tl.constexpr, MAGIC: tl.constexpr,
               NORM: tl.constexpr, HALF2: tl.constexpr, WORDS: tl.constexpr, ASM: tl.constexpr):
    """``x[m]·Wᵀ`` over the output rows ``offs_n`` (masked by ``n_mask``) as an fp32 ``(BN,)`` vector:
    the GEMV's main loop, shared by the one-weight kernel and the grouped one (inlined by Triton).
    ``NORM``: x is first RMS-normalised (``_rms_x``, with ``rstd`` and the norm weight ``nw_ptr``)."""
    # Per (row, group) partial sums Σ q·x, scaled once per group: y = Σ_g s_g·Σ q·x + min_g·Σ x
    # (NF4: absmax_g·Σ codebook[q]·x; int8: one scale per row at the end), a (BN, BK/GROUP) fp32
    # tile; or (ACC3) the decoded w·x per code, reduced after the loop.
    if KIND == 2:
        part = tl.zeros((BN, BK), dtype=tl.float32)
    elif ACC3:
        part = tl.zeros((BN, BK // GROUP, GROUP), dtype=tl.float32)
    else:
        part = tl.zeros((BN, BK // GROUP), dtype=tl.float32)
    # Variants (LS, PREFETCH, ACC3, MAGIC, HALF2): see dequant_tuning.GEMV_CONFIGS. LS > 1 pipelines the code and x loads
    # through shared memory (the kernel-level num_stages only pipelines loads that feed a tl.dot).
    if KIND != 2 and PREFETCH:
        s_next, mn_next = _group_constants(c0_ptr, c1_ptr, c2_ptr, c3_ptr, offs_n, n_mask, 0, n_groups,
                                           KIND, GROUP, DQ, BK)
    for k0 in tl.range(0, K, BK, num_stages=LS):
        if KIND == 2:
            offs_k = k0 + tl.arange(0, BK)
            xk = tl.load(x_ptr + m * stride_xm + offs_k, mask=offs_k < K, other=0.0)
            if NORM:
                xk = _rms_x(xk, nw_ptr, offs_k, offs_k < K, rstd)
            xk = xk.to(tl.float32)
            q = tl.load(codes_ptr + offs_n[:, None] * row_bytes + offs_k[None, :],
                        mask=n_mask[:, None] & (offs_k < row_bytes)[None, :], other=0, eviction_policy="evict_first")
            if MAGIC:  # q + 128 (the byte with its top bit flipped) in the low mantissa bits of 2^23: no conversion
                u = q.to(tl.uint8, bitcast=True).to(tl.int32)
                part += ((u ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0) * xk[None, :]
            else:
                part += q.to(tl.float32) * xk[None, :]
        elif HALF2 and WORDS:
            # int4 codes a 32-bit word (8 codes) at a time, x as fp16 pairs: y = 16·s·Σ((q−8)/16)·x + (min + 8·s)·Σx
            if NORM:
                x0, x1, x2, x3, xsum = _half2_x_norm(x_ptr, m, K, stride_xm, k0, nw_ptr, rstd, BK, GROUP)
                x0, x1, x2, x3 = x0[None, :], x1[None, :], x2[None, :], x3[None, :]
            else:
                x0, x1, x2, x3, xsum = _half2_x_rows(x_ptr, m, K, stride_xm, k0, BK, GROUP)
            offs_w = k0 // 8 + tl.arange(0, BK // 8)
            words = tl.load(codes_ptr.to(tl.pointer_type(tl.int32)) + offs_n[:, None] * (row_bytes // 4) + offs_w[None, :],
                            mask=n_mask[:, None] & (offs_w < row_bytes // 4)[None, :], other=0, eviction_policy="evict_first")
            pw = _half2_dot(words, x0, x1, x2, x3, ASM)
            s, mn = _group_constants(c0_ptr, c1_ptr, c2_ptr, c3_ptr, offs_n, n_mask, k0, n_groups, KIND, GROUP, DQ, BK)
            s = s.to(tl.float32)
            part += tl.sum(tl.reshape(pw, (BN, BK // GROUP, GROUP // 8)), axis=2) * (16.0 * s) + (
                mn.to(tl.float32) + 8.0 * s) * xsum[None, :]
        else:
            # x as (groups, columns), the shape the products broadcast it to
            offs_k3 = k0 + tl.arange(0, BK // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
            x3 = tl.load(x_ptr + m * stride_xm + offs_k3, mask=offs_k3 < K, other=0.0)
            if NORM:
                x3 = _rms_x(x3, nw_ptr, offs_k3, offs_k3 < K, rstd)
            x3 = x3.to(tl.float32)
            if PREFETCH:
                s, mn = s_next, mn_next
                s_next, mn_next = _group_constants(c0_ptr, c1_ptr, c2_ptr, c3_ptr, offs_n, n_mask, k0 + BK, n_groups,
                                                   KIND, GROUP, DQ, BK)
            else:
                s, mn = _group_constants(c0_ptr, c1_ptr, c2_ptr, c3_ptr, offs_n, n_mask, k0, n_groups, KIND, GROUP, DQ, BK)
            q = tl.reshape(_codes(codes_ptr, offs_n, n_mask, k0, row_bytes, n_groups, BITS, GROUP, BN, BK),
                           (BN, BK // GROUP, GROUP))
            s = s.to(tl.float32)
            if KIND == 0:
                if MAGIC:
                    qf = _code_values(q, tl.float32)
                else:
                    qf = q.to(tl.float32)
                if ACC3:
                    part += (qf * s[:, :, None] + mn.to(tl.float32)[:, :, None]) * x3[None, :, :]
                else:
                    part += tl.sum(qf * x3[None, :, :], axis=2) * s + mn.to(tl.float32) * tl.sum(x3, axis=1)[None, :]
            else:
                v = _nf4_values(q, tl.float32)
                if ACC3:
                    part += v * s[:, :, None] * x3[None, :, :]
                else:
                    part += tl.sum(v * x3[None, :, :], axis=2) * s
    if KIND != 2 and ACC3:
        acc = tl.sum(tl.sum(part, axis=2), axis=1)
    else:
        acc = tl.sum(part, axis=1)
    if KIND == 2:
        acc = acc * tl.load(c0_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    return acc
'''
).replace("HALF2_SOURCE", '"""' + HALF2_ASM.replace("$", "$$") + '"""')  # ``$`` escaped for string.Template

_PARAMS = """
    x_ptr, codes_ptr, c0_ptr, c1_ptr, c2_ptr, c3_ptr, bias_ptr, t_ptr, up_ptr, out_ptr, ${AUX_PARAMS}
    M, N, K, R, row_bytes, n_groups, stride_xm, M_CLASS,
    KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, DQ: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr, R_PAD: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,"""

GEMV_TEMPLATE = (
    _HELPERS
    + """

@triton.jit
def ${KERNEL}("""
    + _PARAMS
    + """
    WORDS: tl.constexpr, ASM: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, LS: tl.constexpr, PREFETCH: tl.constexpr, ACC3: tl.constexpr, MAGIC: tl.constexpr,
    HALF2: tl.constexpr,
):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N

    acc = _gemv_rows(x_ptr, codes_ptr, c0_ptr, c1_ptr, c2_ptr, c3_ptr, offs_n, n_mask, m, K, row_bytes, n_groups, stride_xm,
                     x_ptr, 1.0, KIND, BITS, GROUP, DQ, BN, BK, LS, PREFETCH, ACC3, MAGIC, False, HALF2, WORDS, ASM)

    # low-rank term t·upᵀ (t = x·downᵀ computed before the launch)
    if HAS_LR:
        offs_r = tl.arange(0, R_PAD)
        tr = tl.load(t_ptr + m * R + offs_r, mask=offs_r < R, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + offs_n[:, None] * R + offs_r[None, :], mask=n_mask[:, None] & (offs_r < R)[None, :], other=0.0)
        acc += tl.sum(u.to(tl.float32) * tr[None, :], axis=1)
"""
    + ROW_TAIL
)

#: Two or three weights of one format on the same input, one launch (decode's q/k/v projections;
#: SwiGLU's gate and up). ``PAIR``: a program computes the same ``BN`` rows of W0 (gate) and W1
#: (up) and stores ``silu(x·W0ᵀ)·(x·W1ᵀ)`` (up's output never goes to memory); otherwise the
#: program's row block picks its weight (blocks ``0 … cdiv(N0, BN)`` of W0, then W1's, then W2's)
#: and stores into that weight's own output (``out0 … out2``, each contiguous as a lone linear's).
#: ``NORM``: the input is an RMSNorm's (``w · x/rms(x)``, HF Llama rounding) computed on the way in:
#: the normalised row is never stored, and the norm is no launch of its own.
GEMV_GROUP_TEMPLATE = (
    _HELPERS
    + """

@triton.jit
def ${KERNEL}(
    x_ptr, w0_ptr, a0_ptr, b0_ptr, c0_ptr, d0_ptr, w1_ptr, a1_ptr, b1_ptr, c1_ptr, d1_ptr,
    w2_ptr, a2_ptr, b2_ptr, c2_ptr, d2_ptr, bias_ptr, bias1_ptr, bias2_ptr, nw_ptr, out0_ptr, out1_ptr, out2_ptr, ${AUX_PARAMS}
    M, N0, N1, N2, K, row_bytes, n_groups, stride_xm, eps, M_CLASS,
    KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, DQ: tl.constexpr, HAS_BIAS: tl.constexpr,
    W: tl.constexpr, PAIR: tl.constexpr, NORM: tl.constexpr, WORDS: tl.constexpr, ASM: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, LS: tl.constexpr, PREFETCH: tl.constexpr, ACC3: tl.constexpr, MAGIC: tl.constexpr,
    HALF2: tl.constexpr,
):
    pid = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid * BN + tl.arange(0, BN)
    out_ptr, N = out0_ptr, N0
    rstd = 1.0
    if NORM:  # the RMSNorm before the linears, folded in (every program recomputes the row's scale)
        rstd = _rms_rstd(x_ptr, m, K, stride_xm, eps, 512)
    if PAIR:
        n_mask = offs_n < N
        gate = _gemv_rows(x_ptr, w0_ptr, a0_ptr, b0_ptr, c0_ptr, d0_ptr, offs_n, n_mask, m, K, row_bytes, n_groups,
                          stride_xm, nw_ptr, rstd, KIND, BITS, GROUP, DQ, BN, BK, LS, PREFETCH, ACC3, MAGIC, NORM, HALF2, WORDS, ASM)
        up = _gemv_rows(x_ptr, w1_ptr, a1_ptr, b1_ptr, c1_ptr, d1_ptr, offs_n, n_mask, m, K, row_bytes, n_groups,
                        stride_xm, nw_ptr, rstd, KIND, BITS, GROUP, DQ, BN, BK, LS, PREFETCH, ACC3, MAGIC, NORM, HALF2, WORDS, ASM)
        acc = gate * tl.sigmoid(gate) * up
    else:
        # this program's weight, output and rows
        nb0 = tl.cdiv(N0, BN)
        nb1 = tl.cdiv(N1, BN)
        w_ptr, a_ptr, b_ptr, c_ptr, d_ptr = w0_ptr, a0_ptr, b0_ptr, c0_ptr, d0_ptr
        if pid >= nb0:  # (the biases: weight i's at bias_ptr, bias1_ptr, bias2_ptr; all or none)
            w_ptr, a_ptr, b_ptr, c_ptr, d_ptr = w1_ptr, a1_ptr, b1_ptr, c1_ptr, d1_ptr
            out_ptr, N, offs_n, bias_ptr = out1_ptr, N1, offs_n - nb0 * BN, bias1_ptr
            if W == 3:
                if pid >= nb0 + nb1:
                    w_ptr, a_ptr, b_ptr, c_ptr, d_ptr = w2_ptr, a2_ptr, b2_ptr, c2_ptr, d2_ptr
                    out_ptr, N, offs_n, bias_ptr = out2_ptr, N2, offs_n - nb1 * BN, bias2_ptr
        n_mask = offs_n < N
        acc = _gemv_rows(x_ptr, w_ptr, a_ptr, b_ptr, c_ptr, d_ptr, offs_n, n_mask, m, K, row_bytes, n_groups,
                         stride_xm, nw_ptr, rstd, KIND, BITS, GROUP, DQ, BN, BK, LS, PREFETCH, ACC3, MAGIC, NORM, HALF2, WORDS, ASM)
"""
    + ROW_TAIL
)

GEMM_TEMPLATE = (
    _HELPERS
    + """

@triton.jit
def ${KERNEL}("""
    + _PARAMS
    + """
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_mask = offs_m < M
    n_mask = offs_n < N

    # x tile · (dequantized tile)ᵀ on tensor cores; the fp weight tile stays on chip
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)
        if UPCAST:  # the interpreter (numpy has no bfloat16 arithmetic): decode in fp32
            w = _weight_tile(codes_ptr, c0_ptr, c1_ptr, c2_ptr, c3_ptr, offs_n, n_mask, k0, row_bytes, n_groups,
                             KIND, BITS, GROUP, DQ, BN, BK, tl.float32)
        else:
            w = _weight_tile(codes_ptr, c0_ptr, c1_ptr, c2_ptr, c3_ptr, offs_n, n_mask, k0, row_bytes, n_groups,
                             KIND, BITS, GROUP, DQ, BN, BK, x_ptr.dtype.element_ty)
        acc = _dot(a, tl.trans(w), acc, IEEE, UPCAST)

    # low-rank term t·upᵀ (t = x·downᵀ computed before the launch)
    if HAS_LR:
        offs_r = tl.arange(0, R_PAD)
        t = tl.load(t_ptr + offs_m[:, None] * R + offs_r[None, :], mask=m_mask[:, None] & (offs_r < R)[None, :], other=0.0)
        u = tl.load(up_ptr + offs_n[None, :] * R + offs_r[:, None], mask=n_mask[None, :] & (offs_r < R)[:, None], other=0.0)
        acc = _dot(t, u, acc, IEEE, UPCAST)
"""
    + tile_tail("    ")
)

#: The weight decoded once to a dense ``(N, K)`` matrix in the input dtype (the prefill path from
#: ``DEQUANT_FIRST_M`` rows: then one cuBLAS matmul). Decoded in fp32 and rounded once, as the
#: reference's ``dequantize_ref(...).to(dtype)`` is.
DEQUANT_TEMPLATE = (
    _HELPERS
    + """

@triton.jit
def ${KERNEL}(
    codes_ptr, c0_ptr, c1_ptr, c2_ptr, c3_ptr, w_ptr, N, K, row_bytes, n_groups,
    KIND: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, DQ: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK
    offs_k = k0 + tl.arange(0, BK)
    n_mask = offs_n < N
    w = _weight_tile(codes_ptr, c0_ptr, c1_ptr, c2_ptr, c3_ptr, offs_n, n_mask, k0, row_bytes, n_groups,
                     KIND, BITS, GROUP, DQ, BN, BK, tl.float32)
    tl.store(w_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(w_ptr.dtype.element_ty),
             mask=n_mask[:, None] & (offs_k < K)[None, :])
"""
)
