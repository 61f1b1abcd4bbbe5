"""Fused low-rank linear: ``y = epilogue((x·downᵀ)·upᵀ + bias)`` in one kernel.

The module it serves is ``passes.lowrank.LowRankLinear`` (``down``: ``(r, in)``, ``up``:
``(out, r)``). A program owns ``BM`` rows of x: it computes their rank-r intermediate
``t = x·downᵀ`` into registers (``BM × R_PAD`` fp32, never written to global memory), rounds it to
the input dtype as the two-matmul reference does, then produces the output tiles
``pid_n, pid_n + SPLIT, …`` of ``t·upᵀ`` with the bias and the fused epilogue, one store each.
``SPLIT`` programs share a row block (they each recompute its ``t``: extra ``M·K·r`` work per
extra program, which pays at small M where there are too few row blocks to fill the GPU; the
tuner chooses per shape class).

From :data:`T_GIVEN_ROWS` rows on (prefill), or when ``down`` is large
(:data:`T_GIVEN_DOWN`), recomputing ``t`` per program costs more than it saves: the wrapper
computes ``t = x·downᵀ`` once (``M × r``, a small tensor, one cuBLAS matmul) and the kernel, in
its ``T_GIVEN`` variant, runs the second product as an ordinary tiled GEMM over the rank (``t``
and ``up`` loaded ``BK`` of the rank at a time), so every output tile can have its own program
at no extra work. The bias and the epilogue stay fused into the second product, which is where
the output-sized round trips are.

Ranks whose padded size exceeds :data:`MAX_RANK` do not fit on chip: :func:`supports` says so
and the callers keep the two-matmul path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from codegen.kernels.common import (
    DOT_HELPER,
    KernelError,
    aux_rows,
    check_float,
    dot_flags,
    next_pow2,
    parse_epilogue,
    reference_epilogue,
    rows_of,
    tile_tail,
)
from codegen.template import NO_EPILOGUE, Epilogue, build, shape_class

__all__ = ["CONFIGS", "MAX_RANK", "first_product_given", "kernel", "lowrank_linear", "lowrank_linear_ref", "supports"]

#: Largest padded rank kept on chip (``BM × MAX_RANK`` fp32 accumulators per program).
MAX_RANK = 256

#: From this many rows on, ``t = x·downᵀ`` is one torch matmul and the kernel only loads it.
T_GIVEN_ROWS = 256
#: ... and from this many elements of ``down`` on at any row count: every program re-reading a big
#: ``down`` cost more than the extra launch (H100, 1 × 4096 → 4096 at r = 256: fused 44.6 µs vs
#: two matmuls 15.1 µs; at 576 × 64 the fused kernel won, 4.6 vs 8.8 µs).
T_GIVEN_DOWN = 2**18

#: Tuning space (the first is the untuned default). Small on purpose: compile time is paid per config.
CONFIGS = (
    {"BM": 16, "BN": 64, "BK": 64, "SPLIT": 8, "num_warps": 4, "num_stages": 2},
    {"BM": 16, "BN": 32, "BK": 128, "SPLIT": 64, "num_warps": 4, "num_stages": 2},
    {"BM": 32, "BN": 64, "BK": 64, "SPLIT": 2, "num_warps": 4, "num_stages": 3},
    {"BM": 64, "BN": 64, "BK": 32, "SPLIT": 1, "num_warps": 4, "num_stages": 3},
    {"BM": 64, "BN": 128, "BK": 32, "SPLIT": 4, "num_warps": 8, "num_stages": 3},
    {"BM": 128, "BN": 128, "BK": 32, "SPLIT": 1024, "num_warps": 8, "num_stages": 3},
    {"BM": 64, "BN": 64, "BK": 32, "SPLIT": 1024, "num_warps": 4, "num_stages": 3},
    {"BM": 128, "BN": 128, "BK": 64, "SPLIT": 1024, "num_warps": 8, "num_stages": 3},
    {"BM": 64, "BN": 128, "BK": 64, "SPLIT": 1024, "num_warps": 4, "num_stages": 4},
)

TEMPLATE = (
    DOT_HELPER
    + """

@triton.jit
def ${KERNEL}(
    x_ptr, down_ptr, up_ptr, bias_ptr, out_ptr, ${AUX_PARAMS}
    M, N, K, R, stride_xm, M_CLASS,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, R_PAD: tl.constexpr, T_GIVEN: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_r = tl.arange(0, R_PAD)
    m_mask = offs_m < M
    r_mask = offs_r < R

    if not T_GIVEN:
        # stage 1: t = x·downᵀ for this row block, kept in registers
        t = tl.zeros((BM, R_PAD), dtype=tl.float32)
        for k0 in range(0, K, BK):
            offs_k = k0 + tl.arange(0, BK)
            k_mask = offs_k < K
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(down_ptr + offs_r[None, :] * K + offs_k[:, None], mask=r_mask[None, :] & k_mask[:, None], other=0.0)
            t = _dot(a, b, t, IEEE, UPCAST)
        t = t.to(x_ptr.dtype.element_ty)

    # stage 2: this program's output tiles of t·upᵀ, bias and epilogue fused, one store each
    for n0 in range(pid_n * BN, N, BN * tl.num_programs(1)):
        offs_n = n0 + tl.arange(0, BN)
        n_mask = offs_n < N
        if T_GIVEN:
            # t = x·downᵀ was computed once by the caller (x_ptr is t, (M, R), row stride stride_xm):
            # an ordinary GEMM over the rank, BK of it at a time (the loads pipelined, no M × R_PAD
            # tile held in registers)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for r0 in range(0, R, BK):
                offs_q = r0 + tl.arange(0, BK)
                q_mask = offs_q < R
                t = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_q[None, :], mask=m_mask[:, None] & q_mask[None, :],
                            other=0.0)
                u = tl.load(up_ptr + offs_n[None, :] * R + offs_q[:, None], mask=n_mask[None, :] & q_mask[:, None], other=0.0)
                acc = _dot(t, u, acc, IEEE, UPCAST)
        else:
            u = tl.load(up_ptr + offs_n[None, :] * R + offs_r[:, None], mask=n_mask[None, :] & r_mask[:, None], other=0.0)
            acc = _dot(t, u, tl.zeros((BM, BN), dtype=tl.float32), IEEE, UPCAST)
"""
    + tile_tail("        ")
)


def first_product_given(m: int, k: int, r: int) -> bool:
    """Whether the wrapper computes ``t = x·downᵀ`` once (one cuBLAS matmul) for ``m`` rows instead of
    each program computing its rows' ``t``: from :data:`T_GIVEN_ROWS` rows or :data:`T_GIVEN_DOWN`
    elements of ``down`` on. (A split-K Triton pair for this product, K in slices, lost to cuBLAS at
    every measured shape on an H100 — 10.7 vs 9.2 µs at 512 × 4096 → 256, 5.1 vs 3.7 µs at
    512 × 576 → 72, run 7 — and was removed.)"""
    return m >= T_GIVEN_ROWS or r * k >= T_GIVEN_DOWN


def kernel(epilogue: Epilogue = NO_EPILOGUE):
    """The built kernel for ``epilogue`` (cached): ``.source`` is the generated Triton code."""
    return build(TEMPLATE, "_lowrank_linear_kernel", epilogue, CONFIGS, ("M_CLASS", "N", "K", "R", "T_GIVEN"), __name__)


def lowrank_linear_ref(x, down, up, bias=None, epilogue: str = "", aux=()) -> torch.Tensor:
    """The semantics: ``F.linear(F.linear(x, down), up, bias)`` then the epilogue (fp32), in x's dtype."""
    return reference_epilogue(F.linear(F.linear(x, down), up, bias), epilogue, aux)


def supports(x: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether the fused kernel takes this rank and dtype (else use the two-matmul path)."""
    return next_pow2(max(16, down.shape[0])) <= MAX_RANK and x.dtype in (torch.float32, torch.float16, torch.bfloat16)


def lowrank_linear(x, down, up, bias=None, epilogue: str = "", aux=(), *, wrap=None) -> torch.Tensor:
    """Launch the fused kernel: ``epilogue((x·downᵀ)·upᵀ + bias)``.

    Args:
        x: ``(..., in)`` activations, fp32/fp16/bf16, on CUDA (or CPU under ``TRITON_INTERPRET=1``).
        down: ``(r, in)``; up: ``(out, r)``; bias: ``(out,)`` or None; all in x's dtype.
        epilogue: an :class:`~codegen.template.Epilogue` spec, e.g. ``"silu,mul"``.
        aux: the epilogue's auxiliary tensors, each of the output's shape ``(..., out)``.
        wrap: ``torch.library.wrap_triton`` when called inside a ``triton_op``.

    Returns:
        ``(..., out)`` in x's dtype.
    """
    k = x.shape[-1]
    r, n = down.shape[0], up.shape[0]
    if down.shape != (r, k) or up.shape != (n, r):
        raise KernelError(f"low-rank factors must be down (r, {k}) and up (out, r), got {tuple(down.shape)}, {tuple(up.shape)}")
    for name, t in (("down", down), ("up", up)) + ((("bias", bias),) if bias is not None else ()):
        check_float(name, t, x.dtype, x.device)
    if not supports(x, down):
        raise KernelError(f"rank {r} exceeds the on-chip limit {MAX_RANK}; use lowrank_linear_ref")
    ep = parse_epilogue(epilogue)
    eager = type(x) is torch.Tensor  # real tensors launch directly; wrap_triton is for tracing
    x2 = rows_of(x, k)
    m = x2.shape[0]
    out_shape = (*x.shape[:-1], n)
    auxs = aux_rows(aux, ep, out_shape, x.device, m, n)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(out_shape)
    down = down if down.is_contiguous() else down.contiguous()
    up = up if up.is_contiguous() else up.contiguous()
    t_given = first_product_given(m, k, r)
    if t_given:
        x2 = F.linear(x2, down)  # t, (m, r): one cuBLAS matmul instead of one per program

    def grid(meta):
        n_tiles = -(-n // meta["BN"])
        return (-(-m // meta["BM"]), min(meta["SPLIT"], n_tiles))

    kernel(ep).launch(
        grid, x2, down, up, bias, out, *auxs,
        m, n, k, r, x2.stride(0), shape_class(m),
        HAS_BIAS=bias is not None, R_PAD=next_pow2(max(16, r)), T_GIVEN=t_given, wrap=None if eager else wrap,
        **dot_flags(x.dtype),
    )  # fmt: skip
    return out.view(out_shape)
