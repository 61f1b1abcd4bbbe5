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
computes ``t = x·downᵀ`` once (``M × r``, a small tensor) and the kernel, in its ``T_GIVEN``
variant, loads ``t`` instead of computing it, so every output tile can have its own program at
no extra work. ``t`` is one cuBLAS matmul when its tiles fill the GPU, else our split-K pair
(:data:`DOWN_TEMPLATE`, :func:`down_splits`): K in slices, fp32 partials summed in order. The
bias and the epilogue stay fused into the second product, which is where the output-sized
round trips are.

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
    rows_of,
    tile_tail,
)
from codegen.template import NO_EPILOGUE, Epilogue, build, shape_class

__all__ = [
    "CONFIGS",
    "DOWN_CONFIGS",
    "MAX_RANK",
    "down_product",
    "down_splits",
    "first_product_plan",
    "kernel",
    "lowrank_linear",
    "lowrank_linear_ref",
    "supports",
]

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

    if T_GIVEN:
        # t = x·downᵀ was computed once by the caller: x_ptr is t, (M, R) with row stride stride_xm
        t = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :], other=0.0)
    else:
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
        u = tl.load(up_ptr + offs_n[None, :] * R + offs_r[:, None], mask=n_mask[None, :] & r_mask[:, None], other=0.0)
        acc = _dot(t, u, tl.zeros((BM, BN), dtype=tl.float32), IEEE, UPCAST)
"""
    + tile_tail("        ")
)


#: Split-K for ``t = x·downᵀ`` on the ``T_GIVEN`` path. ``t`` is ``M × r``: at 512 rows and r = 256
#: that is 8 tiles of 128 × 128 for a 132-SM H100, and cuBLAS took 9.2 of the fused path's 21.0 µs
#: for it (run 5; 1 × 4096 → 4096 at r = 256: 7.1 of 11.0 µs). :data:`DOWN_TEMPLATE` splits K into
#: ``S`` slices, one program per (row tile, rank tile, slice), each writing its fp32 partial
#: product; :data:`SUM_TEMPLATE` adds the ``S`` partials in a fixed order (deterministic, unlike
#: atomics) and rounds to the input dtype, as the reference's first matmul does.
DOWN_TEMPLATE = (
    DOT_HELPER
    + """

@triton.jit
def ${KERNEL}(
    x_ptr, down_ptr, part_ptr, M, K, R, stride_xm, K_CHUNK, M_CLASS,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    s = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_r = pid_r * BR + tl.arange(0, BR)
    m_mask = offs_m < M
    r_mask = offs_r < R
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    # K_CHUNK is a multiple of every BK: the slices tile K without overlap
    for k0 in range(s * K_CHUNK, s * K_CHUNK + K_CHUNK, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_mask = offs_k < K
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(down_ptr + offs_r[None, :] * K + offs_k[:, None], mask=r_mask[None, :] & k_mask[:, None], other=0.0)
        acc = _dot(a, b, acc, IEEE, UPCAST)
    tl.store(part_ptr + s * M * R + offs_m[:, None] * R + offs_r[None, :], acc, mask=m_mask[:, None] & r_mask[None, :])
"""
)

SUM_TEMPLATE = """

@triton.jit
def ${KERNEL}(part_ptr, t_ptr, numel, S: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(S):
        acc += tl.load(part_ptr + s * numel + offs, mask=mask, other=0.0)
    tl.store(t_ptr + offs, acc.to(t_ptr.dtype.element_ty), mask=mask)
"""

#: Tuning space of the split-K partial products (the first is the untuned default).
DOWN_CONFIGS = (
    {"BM": 64, "BR": 64, "BK": 64, "num_warps": 4, "num_stages": 3},
    {"BM": 128, "BR": 64, "BK": 64, "num_warps": 4, "num_stages": 3},
    {"BM": 64, "BR": 128, "BK": 64, "num_warps": 4, "num_stages": 3},
    {"BM": 128, "BR": 128, "BK": 64, "num_warps": 8, "num_stages": 3},
    {"BM": 16, "BR": 64, "BK": 128, "num_warps": 4, "num_stages": 4},
    {"BM": 32, "BR": 128, "BK": 128, "num_warps": 4, "num_stages": 3},
)
SUM_CONFIGS = ({"BLOCK": 1024, "num_warps": 4, "num_stages": 1},)

#: Each K slice is a multiple of this (every ``BK`` of :data:`DOWN_CONFIGS` divides it), and the
#: split stops before slices get shorter than :data:`DOWN_MIN_SLICE`.
DOWN_CHUNK = 128
DOWN_MIN_SLICE = 256
#: At most this many slices (the partials are ``S × M × r`` fp32).
DOWN_MAX_SPLIT = 16


def down_splits(m: int, k: int, r: int, processors: int) -> int:
    """How many K slices ``t = x·downᵀ`` is computed in: 1 (one cuBLAS matmul) when its 64 × 64
    tiles fill more than half the ``processors``; else the largest power of two that keeps the
    programs at most one per processor, bounded by :data:`DOWN_MIN_SLICE` and :data:`DOWN_MAX_SPLIT`."""
    tiles = -(-m // 64) * -(-r // 64)
    split = 1
    while tiles * split * 2 <= processors and split < DOWN_MAX_SPLIT and k // (2 * split) >= DOWN_MIN_SLICE:
        split *= 2
    return split


def _processors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (what the split sizes its grid for); 8 for the
    interpreter, so that CPU tests reach the split path at their small shapes."""
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def first_product_plan(m: int, k: int, r: int, device: torch.device) -> int:
    """How the fused path gets ``t = x·downᵀ`` for ``m`` rows: 0 = each program computes it (few
    rows, small ``down``), 1 = one cuBLAS matmul, ``S > 1`` = :func:`down_product` in ``S`` slices."""
    if m < T_GIVEN_ROWS and r * k < T_GIVEN_DOWN:
        return 0
    return down_splits(m, k, r, _processors(device))


def down_product(x2: torch.Tensor, down: torch.Tensor, split: int, *, wrap=None) -> torch.Tensor:
    """``t = x2·downᵀ`` (``(m, r)`` in x2's dtype) in ``split`` K slices: two launches, fp32 partials."""
    m, k = x2.shape
    r = down.shape[0]
    per_slice = -(-k // split)
    chunk = -(-per_slice // DOWN_CHUNK) * DOWN_CHUNK  # a multiple of every BK
    split = -(-k // chunk)
    parts = torch.empty((split, m, r), dtype=torch.float32, device=x2.device)
    t = torch.empty((m, r), dtype=x2.dtype, device=x2.device)

    def grid(meta):
        return (-(-m // meta["BM"]), -(-r // meta["BR"]), split)

    down_kernel().launch(grid, x2, down, parts, m, k, r, x2.stride(0), chunk, shape_class(m), wrap=wrap, **dot_flags(x2.dtype))
    sum_kernel().launch(lambda meta: (-(-(m * r) // meta["BLOCK"]),), parts, t, m * r, S=split, wrap=wrap)
    return t


def down_kernel():
    """The built split-K partial-product kernel (cached)."""
    return build(DOWN_TEMPLATE, "_lowrank_down_kernel", NO_EPILOGUE, DOWN_CONFIGS, ("M_CLASS", "K", "R", "K_CHUNK"), __name__)


def sum_kernel():
    """The built partial-sum kernel (cached)."""
    return build(SUM_TEMPLATE, "_lowrank_sum_kernel", NO_EPILOGUE, SUM_CONFIGS, ("numel",), __name__)


def kernel(epilogue: Epilogue = NO_EPILOGUE):
    """The built kernel for ``epilogue`` (cached): ``.source`` is the generated Triton code."""
    return build(TEMPLATE, "_lowrank_linear_kernel", epilogue, CONFIGS, ("M_CLASS", "N", "K", "R", "T_GIVEN"), __name__)


def lowrank_linear_ref(x, down, up, bias=None, epilogue: str = "", aux=()) -> torch.Tensor:
    """The semantics: ``F.linear(F.linear(x, down), up, bias)`` then the epilogue (fp32), in x's dtype."""
    y = F.linear(F.linear(x, down), up, bias)
    return Epilogue.parse(epilogue).apply_ref(y.float(), aux).to(x.dtype)


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
    plan = first_product_plan(m, k, r, x.device)
    t_given = plan > 0
    if plan > 1:  # too few tiles of t to fill the GPU: split K (see DOWN_TEMPLATE)
        x2 = down_product(x2, down, plan, wrap=None if eager else wrap)
    elif plan == 1:
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
