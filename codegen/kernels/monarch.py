"""Monarch linear: the two block-diagonal batched matmuls, the permutation fused into the first's store.

Layout (``passes.monarch.MonarchLinear``, /tmp/notes/monarch_layout.md): ``b`` blocks, rank
``k``, input block ``p = ⌈in/b⌉``, output block ``s = ⌈out/b⌉``;
``R: (b, k·b, p)`` with ``R[j, t·b + i, c]`` (input block j, term t, output block i) and
``L: (b, s, b·k)`` with ``L[i, a, j·k + t]``. The reference computes
``h[j] = R[j]·x_jᵀ``, regroups ``h[j, t·b+i] → g[i, j·k+t]`` (a permute + copy), then
``y_i = L[i]·g[i]``.

Here stage 1 (grid: input block j × row tiles × column tiles) computes ``x_j·R[j]ᵀ`` on
tensor cores and stores each value straight at its regrouped place — the permutation costs no pass
of its own. The intermediate keeps the reference's layout, rows last: ``g[i, j·k+t, n]``, so each
column of a stage-1 tile is a run of ``BM`` consecutive rows (vector stores; the buffer's rows are
padded to 16 for alignment). Stage 2 (grid: output block i × row tiles × column tiles) computes
``g[i]ᵀ·L[i]ᵀ`` — its operand read transposed, again in runs of rows — with the bias and the fused
epilogue, cropping to ``out``. Both stages are plain per-block GEMMs. Two launches, because every
output block reads every input block's result: one program owning both stages must either hold a
token's whole ``b·k·b`` intermediate on chip or read x once per group of output blocks.

Measured against the earlier rows-first intermediate ``g[n, i, j·k+t]`` (H100, runs 7 and 9): stored
one value at a time its neighbours land ``b`` elements apart (512 × 4096, b = 64: 42.6 µs); a
blocked stage 1 that computed 16 input blocks with one batched (3-D) dot to store runs of 16
multiplied the tile traffic (accumulators ``16 × BM × BI``: x re-read per output tile, R per row
tile) and streamed ~1.1 TB/s — stage 1 58.0 µs at 4096 × 4096 against 26.0 µs rows last, the whole
layer 82.0 against 50.9 µs (2.21× and 3.57× dense). The blocked kernel was removed.

At 512 × 4096 the two stages take ~9.3 µs (2.7× dense, under the 3× target): 8 MB each, stage 1
alone 5.0 µs — near two launches' floor plus the bytes. Launching stage 2 as a programmatic
dependent launch (``griddepcontrol``: scheduled while stage 1's last programs run, waiting for
their stores) was measured (run 9c) and not kept: 9.8 vs 9.3 µs there, 1–7 % elsewhere. Nor was
one launch for both stages (run 9d: a 1-D grid of stage-1 then stage-2 tiles, each stage-2 tile
waiting on an acquire counter its row's stage-1 tiles release — correct on the card, but 10.5 vs
9.1 µs at 512 rows and 53.5 vs 52.4 at 4096). Run 10 measured the floor: two launches that only
copy the activations (x → g → y, each reading and writing m·n values as each stage does) take
6.4 µs at 512 × 4096 (one launch 3.9), 48.2 µs at 4096 × 4096 against the stages' 51.4 — so at
4096 rows the stages run at the copies' pace, at 512 rows 3 µs over it. Persistent stages (1–4
programs per SM over a flattened tile × k loop, so that one tile's loads overlap the last's math
and store) and a stage 1 that prefetches stage 2's weights into L2 (``prefetch.global.L2``) were
measured too (run 10b): 9.0–10.8 against 9.1 µs at 512 rows, 52.6–65.8 against 52.5 at 4096; not
kept.

A one-launch prefill kernel (stage 1 for a group of input blocks fed straight into stage 2's
accumulator, x read ``b/16`` times from L2) was built and measured on an H100 (run 7): 37.9 µs
at 512 × 4096 against the two stages' 12.7, 0.67–1.46× dense where the two stages give
2.0–5.6×. It was removed.

Decode (``M ≤`` :data:`GEMV_MAX_ROWS`) is the exception: a token's intermediate *is* small, and
output block ``i`` needs only the ``b·k`` values ``h[j, t·b+i] = R[j, t·b+i]·x_j`` — one row of
every input block's factor. The GEMV kernel (grid: output block × row × column chunk) computes
those with CUDA-core dot products, rounds them to the input dtype as the reference's first bmm
does, and multiplies by ``L[i]`` at once: one launch, no intermediate in global memory, and each
weight byte read once (the ``R`` rows of block ``i`` are its alone; chunks of a block re-read them
from L2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from codegen.kernels.common import (
    DOT_HELPER,
    ROW_TAIL,
    KernelError,
    check_float,
    dot_flags,
    launch_rows,
    next_pow2,
    reference_epilogue,
    tile_tail,
)
from codegen.template import NO_EPILOGUE, Epilogue, build, shape_class

__all__ = ["GEMV_MAX_ROWS", "gemv_kernel", "monarch_linear", "monarch_linear_ref", "stage1", "stage1_kernel", "stage2_kernel"]

#: Row counts up to this take the one-launch GEMV kernel (when a block row of x fits: :data:`GEMV_MAX_TILE`).
GEMV_MAX_ROWS = 4
#: Largest ``b × p`` (padded to powers of two) the GEMV kernel holds as one register tile.
GEMV_MAX_TILE = 8192

STAGE1_TEMPLATE = (
    DOT_HELPER
    + """

@triton.jit
def ${KERNEL}(
    x_ptr, r_ptr, g_ptr,
    M, IN, P, KB, NB, K_TERMS, stride_xm, LD_G, M_CLASS,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr,
):
    j = tl.program_id(0)
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    offs_c = tl.program_id(2) * BC + tl.arange(0, BC)
    m_mask = offs_m < M
    c_mask = offs_c < KB

    # h = x_j · R[j]ᵀ over the block's p input columns (past `in`: the zero padding)
    acc = tl.zeros((BM, BC), dtype=tl.float32)
    for p0 in range(0, P, BP):
        offs_p = p0 + tl.arange(0, BP)
        col = j * P + offs_p
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + col[None, :],
                    mask=m_mask[:, None] & ((offs_p < P) & (col < IN))[None, :], other=0.0)
        r = tl.load(r_ptr + j * KB * P + offs_c[None, :] * P + offs_p[:, None],
                    mask=c_mask[None, :] & (offs_p < P)[:, None], other=0.0)
        acc = _dot(a, r, acc, IEEE, UPCAST)

    # the permutation: column c = t·NB + i goes to g[i, j·K_TERMS + t, n], each column of the tile a
    # run of BM consecutive rows (LD_G: g's leading dimension, rows padded to 16). The padding rows
    # are stored too (zeros: x's rows past M load as 0), so that the mask is constant over 16 rows
    # and the runs store as vectors.
    t = offs_c // NB
    i = offs_c % NB
    dest = (i * KB + j * K_TERMS + t)[None, :] * LD_G + offs_m[:, None]
    tl.store(g_ptr + dest, acc.to(g_ptr.dtype.element_ty), mask=(offs_m < LD_G)[:, None] & c_mask[None, :])
"""
)

STAGE2_TEMPLATE = (
    DOT_HELPER
    + """

@triton.jit
def ${KERNEL}(
    g_ptr, l_ptr, bias_ptr, out_ptr, ${AUX_PARAMS}
    M, N, S, BK_IN, LD_G, M_CLASS,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BS: tl.constexpr, BQ: tl.constexpr,
):
    i = tl.program_id(0)
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    offs_a = tl.program_id(2) * BS + tl.arange(0, BS)
    offs_n = i * S + offs_a
    m_mask = offs_m < M
    n_mask = (offs_a < S) & (offs_n < N)

    # y_i = g[i]ᵀ · L[i]ᵀ
    acc = tl.zeros((BM, BS), dtype=tl.float32)
    for q0 in range(0, BK_IN, BQ):
        offs_q = q0 + tl.arange(0, BQ)
        q_mask = offs_q < BK_IN
        # g[i, q, n]: the block's operand read transposed, runs of BM rows (with the zero padding
        # rows: a mask constant over 16 rows, vector loads)
        a = tl.load(g_ptr + (i * BK_IN + offs_q[None, :]) * LD_G + offs_m[:, None],
                    mask=(offs_m < LD_G)[:, None] & q_mask[None, :], other=0.0)
        w = tl.load(l_ptr + i * S * BK_IN + offs_a[None, :] * BK_IN + offs_q[:, None],
                    mask=(offs_a < S)[None, :] & q_mask[:, None], other=0.0)
        acc = _dot(a, w, acc, IEEE, UPCAST)
"""
    + tile_tail("    ")
)

GEMV_TEMPLATE = (
    """

@triton.jit
def ${KERNEL}(
    x_ptr, r_ptr, l_ptr, bias_ptr, out_ptr, ${AUX_PARAMS}
    M, IN, N, P, S, KB, NB, K_TERMS, stride_xm, M_CLASS,
    HAS_BIAS: tl.constexpr, BB: tl.constexpr, BP: tl.constexpr, BS: tl.constexpr,
):
    i = tl.program_id(0)
    m = tl.program_id(1)
    offs_a = tl.program_id(2) * BS + tl.arange(0, BS)
    offs_j = tl.arange(0, BB)
    offs_c = tl.arange(0, BP)
    j_mask = offs_j < NB
    col = offs_j[:, None] * P + offs_c[None, :]
    xr_mask = j_mask[:, None] & (offs_c < P)[None, :]
    x = tl.load(x_ptr + m * stride_xm + col, mask=xr_mask & (col < IN), other=0.0).to(tl.float32)
    offs_n = i * S + offs_a
    n_mask = (offs_a < S) & (offs_n < N)

    acc = tl.zeros((BS,), dtype=tl.float32)
    for t in range(K_TERMS):
        # h[j] = R[j, t·NB + i] · x_j for every input block j, rounded like the reference's bmm output
        r = tl.load(r_ptr + offs_j[:, None] * (KB * P) + (t * NB + i) * P + offs_c[None, :], mask=xr_mask, other=0.0)
        h = tl.sum(r.to(tl.float32) * x, axis=1).to(x_ptr.dtype.element_ty).to(tl.float32)
        # y_i += L[i, :, j·K + t] · h
        w = tl.load(l_ptr + i * S * KB + offs_a[:, None] * KB + offs_j[None, :] * K_TERMS + t,
                    mask=(offs_a < S)[:, None] & j_mask[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * h[None, :], axis=1)
"""
    + ROW_TAIL
)

#: GEMV tuning space: output-block chunks of ``BS`` rows (more chunks, more programs: 64 blocks
#: × 2 chunks fill 128 SMs).
GEMV_CONFIGS = (
    {"BS": 32, "num_warps": 4, "num_stages": 1},
    {"BS": 64, "num_warps": 4, "num_stages": 1},
    {"BS": 16, "num_warps": 4, "num_stages": 1},
    {"BS": 128, "num_warps": 8, "num_stages": 1},
    {"BS": 32, "num_warps": 2, "num_stages": 1},
)

#: Stage-1 tiles. H100 runs 9b/9c, each alone, 4096 × 4096, 64 blocks: BM128 BC64 BP64 w8 26.0 µs
#: (2.6 TB/s), BM128 BP32 26.6, BM64 28.0, BM32 28.9, BM16 BC128 52.0; at 512 rows 5.0–5.4 µs for
#: BM32–BM128, 8.6 for BM16 BC128. (BM16 BC64 and BM32 BC32, for more programs at few rows, were
#: slower at both: 6.7/35.1 and 6.2/37.0 µs; dropped.)
STAGE1_CONFIGS = (
    {"BM": 32, "BC": 64, "BP": 64, "num_warps": 4, "num_stages": 3},
    {"BM": 64, "BC": 64, "BP": 64, "num_warps": 4, "num_stages": 3},
    {"BM": 128, "BC": 64, "BP": 32, "num_warps": 8, "num_stages": 3},
    {"BM": 16, "BC": 128, "BP": 64, "num_warps": 4, "num_stages": 2},
    {"BM": 128, "BC": 64, "BP": 64, "num_warps": 8, "num_stages": 3},
)
#: Stage-2 tiles. H100 runs 9b/9c, 4096 × 4096 (both stages, stage 1 tuned): BM128 BS64 BQ32 w8
#: 50.1 µs, BM128 BQ64 50.9, BM64 52.1, BM32 53.3, BM16 BS128 78.5; at 512 rows 9.0–9.9 µs.
#: BM128 BS128 holds a whole 128-wide output block (n = 8192: g read once; the tuner's pick there,
#: 78.9 µs at 4096 rows). (BM64 BS32, BM32 BS32 and BM64 BS128 lost everywhere; dropped.)
STAGE2_CONFIGS = (
    {"BM": 32, "BS": 64, "BQ": 64, "num_warps": 4, "num_stages": 3},
    {"BM": 64, "BS": 64, "BQ": 64, "num_warps": 4, "num_stages": 3},
    {"BM": 128, "BS": 64, "BQ": 32, "num_warps": 8, "num_stages": 3},
    {"BM": 16, "BS": 128, "BQ": 64, "num_warps": 4, "num_stages": 2},
    {"BM": 128, "BS": 64, "BQ": 64, "num_warps": 8, "num_stages": 3},
    {"BM": 128, "BS": 128, "BQ": 32, "num_warps": 8, "num_stages": 3},
)


def stage1_kernel():
    return build(STAGE1_TEMPLATE, "_monarch_stage1_kernel", NO_EPILOGUE, STAGE1_CONFIGS, ("M_CLASS", "IN", "P", "KB"), __name__)


def stage2_kernel(epilogue: Epilogue = NO_EPILOGUE):
    """The built stage-2 kernel for ``epilogue`` (cached; ``.source`` is the generated code)."""
    return build(STAGE2_TEMPLATE, "_monarch_stage2_kernel", epilogue, STAGE2_CONFIGS, ("M_CLASS", "N", "S", "BK_IN"), __name__)


def gemv_kernel(epilogue: Epilogue = NO_EPILOGUE):
    """The built one-launch decode kernel for ``epilogue`` (cached)."""
    return build(GEMV_TEMPLATE, "_monarch_gemv_kernel", epilogue, GEMV_CONFIGS, ("M_CLASS", "N", "S", "KB", "P"), __name__)


def monarch_linear_ref(x, L, R, out_features: int, bias=None, epilogue: str = "", aux=()) -> torch.Tensor:
    """The semantics: the layout note's ``monarch_ref`` (two bmm's and the regrouping), then the epilogue."""
    b, kb, p = R.shape
    k = kb // b
    s = L.shape[1]
    lead, n_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n_in)
    if n_in < b * p:
        x2 = F.pad(x2, (0, b * p - n_in))
    n = x2.shape[0]
    h = torch.bmm(R, x2.reshape(n, b, p).permute(1, 2, 0))
    g = h.reshape(b, k, b, n).permute(2, 0, 1, 3).reshape(b, b * k, n)
    y = torch.bmm(L, g).reshape(b * s, n)[:out_features].t()
    if bias is not None:
        y = y + bias
    return reference_epilogue(y, epilogue, aux).reshape(*lead, out_features)


def monarch_linear(x, L, R, out_features: int, bias=None, epilogue: str = "", aux=(), *, wrap=None) -> torch.Tensor:
    """``epilogue(monarch(x) + bias)``: the one-launch kernel up to :data:`GEMV_MAX_ROWS` rows (when a
    block row fits, :data:`GEMV_MAX_TILE`), else the two stages.

    Args:
        x: ``(..., in)`` with ``in ≤ b·p``; L: ``(b, s, b·k)``; R: ``(b, k·b, p)``; bias ``(out,)`` or None.
        out_features: ``out ≤ b·s``.
        epilogue, aux: the fused epilogue and its output-shaped auxiliary tensors.
        wrap: ``torch.library.wrap_triton`` inside a ``triton_op``.
    """
    if R.dim() != 3 or L.dim() != 3:
        raise KernelError(f"Monarch factors must be L (b, s, b·k) and R (b, k·b, p), got {tuple(L.shape)}, {tuple(R.shape)}")
    b, kb, p = R.shape
    s = L.shape[1]
    if kb % b or L.shape != (b, s, kb):
        raise KernelError(f"Monarch factors disagree: R {tuple(R.shape)} needs L ({b}, s, {kb}), got {tuple(L.shape)}")
    n_in = x.shape[-1]
    if n_in > b * p or out_features > b * s:
        raise KernelError(f"x has {n_in} features and out is {out_features}; the factors cover {b * p} → {b * s}")
    for name, t in (("L", L), ("R", R)) + ((("bias", bias),) if bias is not None else ()):
        check_float(name, t, x.dtype, x.device)
    ep, x2, m, auxs, out, out_shape = launch_rows(x, n_in, out_features, epilogue, aux)
    if m == 0:
        return out.view(out_shape)
    L, R = L.contiguous(), R.contiguous()
    bb, bp = next_pow2(b), next_pow2(p)
    if m <= GEMV_MAX_ROWS and bb * bp <= GEMV_MAX_TILE:
        gemv_kernel(ep).launch(
            lambda meta: (b, m, -(-s // meta["BS"])),
            x2, R, L, bias, out, *auxs, m, n_in, out_features, p, s, kb, b, kb // b, x2.stride(0), shape_class(m),
            HAS_BIAS=bias is not None, BB=bb, BP=bp, wrap=wrap,
        )  # fmt: skip
        return out.view(out_shape)
    g = stage1(x2, R, wrap=wrap)
    stage2_kernel(ep).launch(
        lambda meta: (b, -(-m // meta["BM"]), -(-s // meta["BS"])),
        g, L, bias, out, *auxs, m, out_features, s, kb, g.stride(1), shape_class(m),
        HAS_BIAS=bias is not None, wrap=wrap, **dot_flags(x.dtype),
    )  # fmt: skip
    return out.view(out_shape)


def stage1(x2: torch.Tensor, R: torch.Tensor, *, wrap=None) -> torch.Tensor:
    """The first stage on ``(m, in)`` rows: ``g`` as a ``(b, k·b, m)`` view (the reference's
    regrouped intermediate) of a buffer whose rows are padded to 16. Split out so that the
    benchmark can time the stages apart."""
    m, n_in = x2.shape
    b, kb, p = R.shape
    g = torch.empty((b, kb, -(-m // 16) * 16), dtype=x2.dtype, device=x2.device)[:, :, :m]
    stage1_kernel().launch(
        lambda meta: (b, -(-m // meta["BM"]), -(-kb // meta["BC"])),
        x2, R, g, m, n_in, p, kb, b, kb // b, x2.stride(0), g.stride(1), shape_class(m), wrap=wrap, **dot_flags(x2.dtype),
    )  # fmt: skip
    return g
