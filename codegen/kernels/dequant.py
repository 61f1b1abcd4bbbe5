"""Dequantize-and-multiply kernels over ``passes.quant_storage``'s packed buffers, as they are stored.

``y = epilogue(x·Wᵀ + (x·downᵀ)·upᵀ + bias)`` with ``W`` decoded on chip from its codes and
constants; the low-rank term is optional (``passes.lq.LQLinear``), so is the bias. Nothing is
repacked: the kernels read the ``codes`` (uint8, ``(out, row_bytes)``; int8 codes for
``Int8Config``) and the constants in the layout ``IntNConfig``/``NF4Config``/``Int8Config``
store them, fp16 or double-quantized (uint8 codes with an fp32 ``[scale, offset]`` per
block of 256 constants, decoded in the kernel too).

Formats (the ``fmt`` string): ``int8``; ``int{2,3,4}g{32,64,128}``; ``nf4g{32,64,128}``; a
``dq`` suffix for double-quantized constants. Packed codes are a little-endian bit stream
per row (int4: two per byte, int2: four, int3: eight per three bytes): a tile of ``BK`` codes
is ``BK·bits/8`` contiguous bytes, split into code planes with shifts and interleaved back into
column order with ``tl.join`` (no per-element gathers).

Two paths:

- GEMV (``M ≤`` :data:`GEMV_MAX_M`, batch-1 decode): a program owns ``BN`` output rows of
  one input row, accumulates ``w ⊙ x`` in fp32 over K and reduces once; no tensor cores. Its
  bytes are 4× fewer than fp16 for int4, but on the H100 it reads them at 1.0–1.4 TB/s, not the
  ~3 TB/s the card has (1.6–1.8× the fp16 GEMV instead of 3×; see :data:`GEMV_CONFIGS`).
- GEMM (prefill): ``BM × BN`` tiles, the ``BN × BK`` weight tile decoded in the input dtype
  (:func:`_code_values`: no conversion instructions) and fed to ``tl.dot`` (the dequantized tile
  never leaves the chip). At batch 1 its BM = 16 tiles lost to the GEMV on the H100 (run 6:
  11.9 vs 9.6 µs at 4096², 63 vs 20 µs at 4096 × 11008).

The low-rank term: ``t = x·downᵀ`` (``M × r``, small) is one torch matmul before the launch;
the kernel adds ``t·upᵀ`` to its accumulator, so the ``M × out`` low-rank output and the add
never go through global memory.

``BK`` (128 or 256) is a multiple of every group size: a tile's constants are a
``BN × BK/group`` block, broadcast over the group's columns.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from codegen.kernels.common import (
    DOT_HELPER,
    ROW_TAIL,
    KernelError,
    aux_rows,
    check_float,
    dot_flags,
    next_pow2,
    parse_epilogue,
    rows_of,
    unused_pointer,
)
from codegen.template import NO_EPILOGUE, Epilogue, build, shape_class

__all__ = [
    "GEMV_MAX_M",
    "MAX_RANK",
    "QuantFormat",
    "dequantize_ref",
    "gemm_kernel",
    "gemv_kernel",
    "quant_linear",
    "quant_linear_ref",
    "supports",
]

#: Row counts up to this take the GEMV path.
GEMV_MAX_M = 4

#: Largest padded rank of the fused low-rank term.
MAX_RANK = 256


def supports(down: torch.Tensor | None) -> bool:
    """Whether the kernel takes this LQ low-rank term (none, or a padded rank ≤ :data:`MAX_RANK`)."""
    return down is None or next_pow2(max(16, down.shape[0])) <= MAX_RANK


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

_PARSED: dict = {}  # spec -> QuantFormat (parsing is on every launch's path)

_FMT = re.compile(r"^(?:(int8)|int([234])g(32|64|128)|nf4g(32|64|128))(dq)?$")


@dataclass(frozen=True)
class QuantFormat:
    """A packed weight format as the kernels see it.

    Attributes:
        kind: 0 asymmetric groups (``q·scale + min``), 1 NF4 (``codebook[q]·absmax``), 2 int8 per row.
        bits: code width (8 for int8).
        group: columns per constant (0 for int8: one scale per row).
        dq: constants double-quantized.
    """

    kind: int
    bits: int
    group: int
    dq: bool

    @classmethod
    def parse(cls, fmt: str) -> QuantFormat:
        f = _PARSED.get(fmt)
        if f is None:
            f = _PARSED[fmt] = cls._parse(fmt)
        return f

    @classmethod
    def _parse(cls, fmt: str) -> QuantFormat:
        m = _FMT.match(fmt)
        if m is None:
            raise KernelError(
                f"unknown quantized format {fmt!r}; expected int8, int{{2,3,4}}g{{32,64,128}} or nf4g{{32,64,128}}, optionally + 'dq'"
            )
        int8, bits, g, g_nf4, dq = m.groups()
        if int8:
            if dq:
                raise KernelError("int8 stores its scales as fp16 only; 'int8dq' does not exist")
            return cls(2, 8, 0, False)
        if bits:
            return cls(0, int(bits), int(g), bool(dq))
        return cls(1, 4, int(g_nf4), bool(dq))

    @classmethod
    def of(cls, config) -> QuantFormat:
        """The format of a ``passes.quant_storage`` config (``Int8Config``, ``IntNConfig``, ``NF4Config``)."""
        name = type(config).__name__
        if name == "Int8Config":
            return cls(2, 8, 0, False)
        if name == "IntNConfig":
            return cls(0, config.bits, config.group_size, config.double_quant)
        if name == "NF4Config":
            return cls(1, 4, config.group_size, config.double_quant)
        raise KernelError(f"no dequantization kernel for {name} (Int8Config, IntNConfig, NF4Config have one)")

    @property
    def spec(self) -> str:
        if self.kind == 2:
            return "int8"
        base = f"int{self.bits}g{self.group}" if self.kind == 0 else f"nf4g{self.group}"
        return base + ("dq" if self.dq else "")

    def constant_names(self) -> tuple[str, ...]:
        """The ``PackedWeight`` buffer names the kernels read, in their argument order."""
        if self.kind == 2:
            return ("scale",)
        names = ("scale", "minimum") if self.kind == 0 else ("absmax",)
        if self.dq:
            return tuple(f"{n}_{part}" for n in names for part in ("codes", "blocks"))
        return names


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
'''
)

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
    BN: tl.constexpr, BK: tl.constexpr, LS: tl.constexpr, PREFETCH: tl.constexpr, ACC3: tl.constexpr, MAGIC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N

    # Per (row, group) partial sums Σ q·x, scaled once per group: y = Σ_g s_g·Σ q·x + min_g·Σ x
    # (NF4: absmax_g·Σ codebook[q]·x; int8: one scale per row at the end), a (BN, BK/GROUP) fp32
    # tile; or (ACC3) the decoded w·x per code, reduced after the loop.
    if KIND == 2:
        part = tl.zeros((BN, BK), dtype=tl.float32)
    elif ACC3:
        part = tl.zeros((BN, BK // GROUP, GROUP), dtype=tl.float32)
    else:
        part = tl.zeros((BN, BK // GROUP), dtype=tl.float32)
    # Variants (LS, PREFETCH, ACC3, MAGIC): see GEMV_CONFIGS. LS > 1 pipelines the code and x loads
    # through shared memory (the kernel-level num_stages only pipelines loads that feed a tl.dot).
    if KIND != 2 and PREFETCH:
        s_next, mn_next = _group_constants(c0_ptr, c1_ptr, c2_ptr, c3_ptr, offs_n, n_mask, 0, n_groups,
                                           KIND, GROUP, DQ, BK)
    for k0 in tl.range(0, K, BK, num_stages=LS):
        if KIND == 2:
            offs_k = k0 + tl.arange(0, BK)
            xk = tl.load(x_ptr + m * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            q = tl.load(codes_ptr + offs_n[:, None] * row_bytes + offs_k[None, :],
                        mask=n_mask[:, None] & (offs_k < row_bytes)[None, :], other=0, eviction_policy="evict_first")
            part += q.to(tl.float32) * xk[None, :]
        else:
            # x as (groups, columns), the shape the products broadcast it to
            offs_k3 = k0 + tl.arange(0, BK // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
            x3 = tl.load(x_ptr + m * stride_xm + offs_k3, mask=offs_k3 < K, other=0.0).to(tl.float32)
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

    # low-rank term t·upᵀ (t = x·downᵀ computed before the launch)
    if HAS_LR:
        offs_r = tl.arange(0, R_PAD)
        tr = tl.load(t_ptr + m * R + offs_r, mask=offs_r < R, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + offs_n[:, None] * R + offs_r[None, :], mask=n_mask[:, None] & (offs_r < R)[None, :], other=0.0)
        acc += tl.sum(u.to(tl.float32) * tr[None, :], axis=1)
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
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_offs = offs_m[:, None] * N + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    ${EPILOGUE}
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
"""
)

#: GEMV tuning space (the first is the untuned default). Batch-1 decode reads each weight byte once,
#: so the tiles are sized for memory-level parallelism: 1–4 KB of int4 codes per program and
#: iteration, few rows per program so that a 4096-row weight gives 256–2048 programs. What the
#: H100 showed (runs 4–6: ~1.2 TB/s whatever the tiles) and the compiled loop explains (sm_90 SASS,
#: ``benchmarks/kernels_aot.py``): every iteration waited on its loads, and each code cost ~7
#: instructions, two of them conversions (int→fp32 at a quarter of the FMA rate, x fp16→fp32).
#: The switches below are variants of the same arithmetic for the tuner to choose between, by
#: measurement on the card it runs on (each is checked against the reference in the tests):
#:
#: - ``LS``: a loop-level ``num_stages`` (iterations in flight; 1 = none). On its own it did not
#:   move the 4096-wide rows (run 5: 8.9 vs 8.5 µs) and slowed the 576-wide ones (2.9 vs 2.5 µs),
#:   because the group constants, too narrow for async copies, stayed a load waited on per step.
#: - ``PREFETCH``: those constants issued one iteration ahead, widened only where used.
#: - ``ACC3``: accumulate ``w·x`` per code in a ``(BN, BK/GROUP, GROUP)`` tile and reduce once after
#:   the loop, instead of a per-group reduction (and its layout conversion) every iteration.
#: - ``MAGIC``: codes to fp32 through :func:`_code_values` (two full-rate instructions) instead of
#:   a conversion.
#:
#: The last seven are not yet measured on a GPU.
GEMV_CONFIGS = (
    {"BN": 8, "BK": 512, "LS": 1, "PREFETCH": False, "ACC3": False, "MAGIC": False, "num_warps": 4, "num_stages": 1},
    {"BN": 4, "BK": 1024, "LS": 1, "PREFETCH": False, "ACC3": False, "MAGIC": False, "num_warps": 4, "num_stages": 1},
    {"BN": 16, "BK": 256, "LS": 1, "PREFETCH": False, "ACC3": False, "MAGIC": False, "num_warps": 4, "num_stages": 1},
    {"BN": 8, "BK": 512, "LS": 3, "PREFETCH": False, "ACC3": False, "MAGIC": False, "num_warps": 4, "num_stages": 3},
    {"BN": 8, "BK": 256, "LS": 4, "PREFETCH": False, "ACC3": False, "MAGIC": False, "num_warps": 4, "num_stages": 4},
    {"BN": 8, "BK": 512, "LS": 3, "PREFETCH": True, "ACC3": False, "MAGIC": False, "num_warps": 4, "num_stages": 3},
    {"BN": 4, "BK": 1024, "LS": 3, "PREFETCH": True, "ACC3": False, "MAGIC": False, "num_warps": 4, "num_stages": 3},
    {"BN": 8, "BK": 512, "LS": 3, "PREFETCH": True, "ACC3": True, "MAGIC": False, "num_warps": 4, "num_stages": 3},
    {"BN": 8, "BK": 512, "LS": 3, "PREFETCH": True, "ACC3": False, "MAGIC": True, "num_warps": 4, "num_stages": 3},
    {"BN": 4, "BK": 1024, "LS": 3, "PREFETCH": True, "ACC3": False, "MAGIC": True, "num_warps": 4, "num_stages": 3},
    {"BN": 8, "BK": 512, "LS": 3, "PREFETCH": True, "ACC3": True, "MAGIC": True, "num_warps": 4, "num_stages": 3},
    {"BN": 16, "BK": 256, "LS": 3, "PREFETCH": True, "ACC3": True, "MAGIC": True, "num_warps": 4, "num_stages": 3},
)
#: GEMM tuning space: tensor-core tiles up to 128×128 (BK = 128 or 256, multiples of every group
#: size), and BM = 16 tiles for a few rows (decode on tensor cores: the tile is decoded in the
#: input dtype and fed to ``tl.dot`` as is, so no per-weight conversion instructions).
GEMM_CONFIGS = (
    {"BM": 64, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 3},
    {"BM": 128, "BN": 128, "BK": 128, "num_warps": 8, "num_stages": 3},
    {"BM": 64, "BN": 128, "BK": 128, "num_warps": 8, "num_stages": 3},
    {"BM": 128, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 4},
    {"BM": 32, "BN": 128, "BK": 128, "num_warps": 8, "num_stages": 4},
    {"BM": 16, "BN": 128, "BK": 128, "num_warps": 4, "num_stages": 4},
    {"BM": 16, "BN": 64, "BK": 128, "num_warps": 4, "num_stages": 4},
    {"BM": 16, "BN": 32, "BK": 256, "num_warps": 4, "num_stages": 4},
    {"BM": 16, "BN": 64, "BK": 256, "num_warps": 4, "num_stages": 3},
)
_KEY = ("M_CLASS", "N", "K", "R")


def gemv_kernel(epilogue: Epilogue = NO_EPILOGUE):
    """The built GEMV kernel for ``epilogue`` (cached; ``.source`` is the generated code)."""
    return build(GEMV_TEMPLATE, "_dequant_gemv_kernel", epilogue, GEMV_CONFIGS, _KEY, __name__)


def gemm_kernel(epilogue: Epilogue = NO_EPILOGUE):
    """The built GEMM kernel for ``epilogue`` (cached)."""
    return build(GEMM_TEMPLATE, "_dequant_gemm_kernel", epilogue, GEMM_CONFIGS, _KEY, __name__)


# ---- reference -----------------------------------------------------------------------------


def dequantize_ref(codes, constants, fmt: str, cols: int) -> torch.Tensor:
    """fp32 ``(out, cols)`` weight from the stored buffers, by ``passes.quant_formats`` (the semantics)."""
    from passes import quant_formats as qf

    f = QuantFormat.parse(fmt)
    if f.kind == 2:
        return qf.int8_rowwise_dequantize(codes, constants[0].float())
    values = []
    for i in range(0, len(constants), 2 if f.dq else 1):
        values.append(qf.dequantize_constants(constants[i], constants[i + 1]) if f.dq else constants[i].float())
    q = qf.unpack(codes, f.bits, values[0].shape[1] * f.group)
    if f.kind == 0:
        return qf.dequantize_groups(q, values[0], values[1], cols)
    return qf.nf4_dequantize(q, values[0], cols)


def quant_linear_ref(
    x, codes, constants, fmt: str, cols: int, bias=None, down=None, up=None, epilogue: str = "", aux=()
) -> torch.Tensor:
    """The semantics (what ``QuantizedLinear``/``LQLinear`` compute, then the epilogue in fp32)."""
    y = F.linear(x, dequantize_ref(codes, constants, fmt, cols).to(x.dtype), bias)
    if down is not None:
        y = y + F.linear(F.linear(x, down), up)
    return Epilogue.parse(epilogue).apply_ref(y.float(), aux).to(x.dtype)


# ---- launch --------------------------------------------------------------------------------


def _check_buffers(f: QuantFormat, codes, constants, cols: int) -> int:
    """Validate the stored buffers against the format; returns the number of groups per row."""
    out = codes.shape[0]
    names = f.constant_names()
    if len(constants) != len(names):
        raise KernelError(f"{f.spec} stores {len(names)} constant buffers {names}, got {len(constants)}")
    if f.kind == 2:
        if codes.dtype != torch.int8 or codes.shape[1] != cols:
            raise KernelError(f"int8 codes must be int8 ({out}, {cols}), got {codes.dtype} {tuple(codes.shape)}")
        return 1
    first = constants[0]
    n_groups = first.shape[1]
    row_bytes = n_groups * f.group * f.bits // 8
    if codes.dtype != torch.uint8 or tuple(codes.shape) != (out, row_bytes):
        raise KernelError(f"{f.spec} codes must be uint8 ({out}, {row_bytes}), got {codes.dtype} {tuple(codes.shape)}")
    if n_groups * f.group < cols:
        raise KernelError(f"{f.spec}: {n_groups} groups of {f.group} cover fewer than the {cols} input columns")
    return n_groups


def quant_linear(
    x, codes, constants, fmt: str, cols: int, bias=None, down=None, up=None, epilogue: str = "", aux=(), *, wrap=None
) -> torch.Tensor:
    """Launch the dequant GEMV (``M ≤ GEMV_MAX_M``) or GEMM kernel.

    Args:
        x: ``(..., cols)`` activations (fp32/fp16/bf16).
        codes, constants: the ``PackedWeight`` buffers, ``constants`` in
            :meth:`QuantFormat.constant_names` order.
        fmt: the format spec (:class:`QuantFormat`).
        cols: the weight's (unpadded) input size.
        bias: ``(out,)`` or None. down, up: the optional low-rank term, ``(r, cols)`` and ``(out, r)``.
        epilogue, aux: the fused epilogue and its auxiliary tensors (output-shaped).
        wrap: ``torch.library.wrap_triton`` inside a ``triton_op`` (used while tracing; real
            tensors launch directly).
    """
    f = QuantFormat.parse(fmt)
    eager = type(x) is torch.Tensor  # a real tensor: not traced (fake/functional tensors are subclasses)
    n_groups = _check_buffers(f, codes, constants, cols)
    n = codes.shape[0]
    check_float("x", x)
    if bias is not None:
        check_float("bias", bias, x.dtype, x.device)
    if (down is None) != (up is None):
        raise KernelError("give both low-rank factors (down, up) or neither")
    r = 0
    if down is not None:
        r = down.shape[0]
        if down.shape != (r, cols) or up.shape != (n, r):
            raise KernelError(f"low-rank factors must be down (r, {cols}) and up ({n}, r)")
        check_float("down", down, x.dtype, x.device)
        check_float("up", up, x.dtype, x.device)
        if not supports(down):
            raise KernelError(f"rank {r} exceeds the fused limit {MAX_RANK}; use quant_linear_ref")
    ep = parse_epilogue(epilogue)
    x2 = rows_of(x, cols)
    m = x2.shape[0]
    out_shape = (*x.shape[:-1], n)
    auxs = aux_rows(aux, ep, out_shape, x.device, m, n)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(out_shape)
    t = F.linear(x2, down).contiguous() if down is not None else unused_pointer(x, eager)
    consts = [c if c.is_contiguous() else c.contiguous() for c in constants]
    # kernel slots: (values or codes, blocks) per constant; unused slots get any valid pointer
    c = consts if f.dq else [p for v in consts for p in (v, unused_pointer(x, eager))]
    c = c + [unused_pointer(x, eager) for _ in range(4 - len(c))]
    row_bytes = codes.shape[1]
    args = (
        x2, codes if codes.is_contiguous() else codes.contiguous(), *c, bias if bias is not None else unused_pointer(x, eager), t,
        up.contiguous() if up is not None else unused_pointer(x, eager), out, *auxs,
        m, n, cols, r, row_bytes, n_groups, x2.stride(0), shape_class(m),
    )  # fmt: skip
    meta = dict(
        KIND=f.kind, BITS=f.bits, GROUP=max(f.group, 1), DQ=f.dq, HAS_BIAS=bias is not None,
        HAS_LR=down is not None, R_PAD=next_pow2(max(16, r)), **dot_flags(x.dtype),
    )  # fmt: skip
    gemv = m <= GEMV_MAX_M
    kernel = _kernel(gemv, ep)
    if gemv:
        grid = lambda meta: (-(-n // meta["BN"]), m)
    else:
        grid = lambda meta: (-(-m // meta["BM"]), -(-n // meta["BN"]))
    # a direct launch in eager mode (wrap_triton only matters while tracing)
    kernel.launch(grid, *args, wrap=None if eager else wrap, **meta)
    return out.view(out_shape)


_KERNELS: dict[tuple, object] = {}


def _kernel(gemv: bool, ep: Epilogue):
    """The built kernel, cached per (path, epilogue, tuning switch): no rebuild lookups per launch."""
    key = (gemv, ep, os.environ.get("DECOMP_AUTOTUNE", "1"))
    k = _KERNELS.get(key)
    if k is None:
        k = (gemv_kernel if gemv else gemm_kernel)(ep)
        _KERNELS[key] = k
    return k
