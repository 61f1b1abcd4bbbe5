"""Block-diagonal linear with its input and output permutations fused into the loads and the store.

Layout (``passes.blockdiag.BlockDiagLinear``): ``b`` blocks of ``s × p``; the input is
zero-padded to ``b·p`` columns, permuted by ``in_index`` (``(b·p,)`` int32, or None: contiguous
groups) and cut into ``b`` groups; block ``i`` maps group ``i`` to block rows ``i·s … i·s+s−1``,
and output column ``j`` is block row ``out_index[j]`` (or None: the first ``out`` block rows)::

    y = (blockdiag(blocks) · x_pad[in_index])[out_index] + bias

The torch reference gathers the permuted input (a copy), runs one batched matmul, gathers the
output rows (a copy), transposes (a copy) and adds the bias. Here one kernel (grid: block ×
row tiles × block-row tiles) loads each group's input columns through ``in_index`` (a gather
from x, which stays in L2), multiplies by the block on tensor cores, and stores each block row
straight to its output column: ``out_pos`` is ``out_index`` inverted (block row → output column,
−1 for padding rows that are no output), which the module keeps beside its indices. Bias and the
fused epilogue (``codegen.template``) apply in fp32 before the one rounding.

The gather in the loads pays at decode (1 × 4096 → 4096: 1.6–2.4× the torch path on an H100,
1.3–2.2× dense, run 7) but not at prefill, where every block-row tile re-gathers the same
columns element by element (512 × 4096, 4 blocks: 177.6 µs against the torch path's 41.2; 4096
rows: 2589 against 257). Past :data:`GATHER_MAX_M` rows the wrapper gathers the input once
(``index_select``, one pass) and the kernel reads it contiguously — not measured on a GPU yet,
so the operator runs the kernel only up to :data:`KERNEL_MAX_M` rows and the torch path beyond
(the benchmark times the kernel at those rows beside it).
"""

from __future__ import annotations

import torch

from codegen.kernels.common import DOT_HELPER, KernelError, check_float, dot_flags, launch_rows, reference_epilogue, tile_tail
from codegen.template import NO_EPILOGUE, Epilogue, build, shape_class

__all__ = ["CONFIGS", "GATHER_MAX_M", "KERNEL_MAX_M", "blockdiag_linear", "blockdiag_linear_ref", "kernel", "kernel_takes"]

#: Up to this many rows the kernel gathers the permuted input in its loads; beyond, the wrapper
#: gathers it once first (read at launch).
GATHER_MAX_M = 16
#: ``decomp::blockdiag_linear`` on CUDA runs the kernel up to this many rows, the torch path beyond
#: (measured faster there; read at call time).
KERNEL_MAX_M = 16


def kernel_takes(x: torch.Tensor) -> bool:
    """Whether the operator runs the kernel for ``x`` (``(..., in)``) rather than the torch path."""
    return x.numel() <= KERNEL_MAX_M * x.shape[-1]


TEMPLATE = (
    DOT_HELPER
    + """

@triton.jit
def ${KERNEL}(
    x_ptr, blocks_ptr, in_index_ptr, out_pos_ptr, bias_ptr, out_ptr, ${AUX_PARAMS}
    M, IN, N, P, S, stride_xm, M_CLASS,
    HAS_BIAS: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BS: tl.constexpr, BP: tl.constexpr,
):
    i = tl.program_id(0)
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    offs_a = tl.program_id(2) * BS + tl.arange(0, BS)
    m_mask = offs_m < M
    a_mask = offs_a < S

    # block i's rows from its group of p inputs: x[:, in_index[i·p + c]] (or column i·p + c) · blocks[i]ᵀ
    acc = tl.zeros((BM, BS), dtype=tl.float32)
    for p0 in range(0, P, BP):
        offs_p = p0 + tl.arange(0, BP)
        p_mask = offs_p < P
        if GATHER:
            col = tl.load(in_index_ptr + i * P + offs_p, mask=p_mask, other=IN)
        else:
            col = i * P + offs_p
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + col[None, :],
                    mask=m_mask[:, None] & (p_mask & (col < IN))[None, :], other=0.0)
        w = tl.load(blocks_ptr + i * S * P + offs_a[None, :] * P + offs_p[:, None],
                    mask=a_mask[None, :] & p_mask[:, None], other=0.0)
        acc = _dot(a, w, acc, IEEE, UPCAST)

    # block row i·s + a is output column out_pos[i·s + a] (−1: a padding row), or i·s + a itself
    if SCATTER:
        offs_n = tl.load(out_pos_ptr + i * S + offs_a, mask=a_mask, other=-1)
    else:
        offs_n = i * S + offs_a
    n_mask = a_mask & (offs_n >= 0) & (offs_n < N)
"""
    + tile_tail("    ")
)

#: Tiles: ``BM`` rows × ``BS`` block rows, the group's columns ``BP`` at a time (dots need ≥ 16 each).
CONFIGS = (
    {"BM": 64, "BS": 64, "BP": 64, "num_warps": 4, "num_stages": 3},
    {"BM": 16, "BS": 64, "BP": 64, "num_warps": 4, "num_stages": 2},
    {"BM": 128, "BS": 64, "BP": 32, "num_warps": 8, "num_stages": 3},
    {"BM": 64, "BS": 128, "BP": 64, "num_warps": 8, "num_stages": 3},
    {"BM": 32, "BS": 32, "BP": 64, "num_warps": 4, "num_stages": 3},
    {"BM": 16, "BS": 32, "BP": 128, "num_warps": 4, "num_stages": 2},
)


def kernel(epilogue: Epilogue = NO_EPILOGUE):
    """The built kernel for ``epilogue`` (cached; ``.source`` is the generated code)."""
    return build(TEMPLATE, "_blockdiag_linear_kernel", epilogue, CONFIGS, ("M_CLASS", "N", "S", "P"), __name__)


def blockdiag_linear_ref(x, blocks, out_features: int, in_index=None, out_pos=None, bias=None, epilogue: str = "", aux=()):
    """The semantics: the module's torch code (``passes.blockdiag.blockdiag_forward``: gather, one
    batched matmul, gather back), then the epilogue."""
    from passes.blockdiag import blockdiag_forward

    out_index = None
    if out_pos is not None:  # block row -> output column, back to output column -> block row
        # a scatter, not nonzero(): no data-dependent shape, so no host sync (CUDA-graph capture, tracing);
        # rows without an output column (-1) land in a spare last slot
        slot = torch.where(out_pos >= 0, out_pos, out_features).long()
        rows = torch.arange(out_pos.numel(), dtype=torch.int32, device=out_pos.device)
        out_index = torch.empty(out_features + 1, dtype=torch.int32, device=out_pos.device).scatter_(0, slot, rows)[:out_features]
    return reference_epilogue(blockdiag_forward(x, blocks, out_features, in_index, out_index, bias), epilogue, aux)


def blockdiag_linear(
    x, blocks, out_features: int, in_index=None, out_pos=None, bias=None, epilogue: str = "", aux=(), *, wrap=None
) -> torch.Tensor:
    """``epilogue(blockdiag(x) + bias)`` in one launch.

    Args:
        x: ``(..., in)`` with ``in ≤ b·p``. blocks: ``(b, s, p)``.
        out_features: ``out ≤ b·s``.
        in_index: ``(b·p,)`` int32 input permutation (entries ≥ ``in`` read the zero padding), or None.
        out_pos: ``(b·s,)`` int32 output column of each block row, −1 for none
            (the module's ``out_pos``: its ``out_index`` inverted), or None for the first ``out`` rows.
        bias: ``(out,)`` or None. epilogue, aux: the fused epilogue and its output-shaped operands.
        wrap: ``torch.library.wrap_triton`` inside a ``triton_op``.
    """
    if blocks.dim() != 3:
        raise KernelError(f"blocks must be (b, s, p), got {tuple(blocks.shape)}")
    b, s, p = blocks.shape
    n_in = x.shape[-1]
    if n_in > b * p or out_features > b * s:
        raise KernelError(f"x has {n_in} features and out is {out_features}; {b} blocks of {s}×{p} cover {b * p} → {b * s}")
    for name, index, size in (("in_index", in_index, b * p), ("out_pos", out_pos, b * s)):
        if index is not None and (index.dtype != torch.int32 or tuple(index.shape) != (size,) or index.device != x.device):
            raise KernelError(
                f"{name} must be int32 ({size},) on {x.device}, got {index.dtype} {tuple(index.shape)} on {index.device}"
            )
    check_float("blocks", blocks, x.dtype, x.device)
    if bias is not None:
        check_float("bias", bias, x.dtype, x.device)
    ep, x2, m, auxs, out, out_shape = launch_rows(x, n_in, out_features, epilogue, aux)
    if m == 0:
        return out.view(out_shape)
    if in_index is not None and m > GATHER_MAX_M:  # prefill: one gather pass, then contiguous loads
        if n_in < b * p:  # in_index entries ≥ n_in read the zero padding: one zero column stands for it
            x2 = torch.nn.functional.pad(x2, (0, 1)).index_select(1, in_index.clamp(max=n_in))
        else:
            x2 = x2.index_select(1, in_index)
        in_index, n_in = None, b * p
    kernel(ep).launch(
        lambda meta: (b, -(-m // meta["BM"]), -(-s // meta["BS"])),
        x2, blocks.contiguous(), in_index, out_pos, bias, out, *auxs, m, n_in, out_features, p, s, x2.stride(0), shape_class(m),
        HAS_BIAS=bias is not None, GATHER=in_index is not None, SCATTER=out_pos is not None, wrap=wrap, **dot_flags(x.dtype),
    )  # fmt: skip
    return out.view(out_shape)
