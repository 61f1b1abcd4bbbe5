"""Kronecker-sum linear: ``y = Σ_t (A_t ⊗ B_t)·x`` as two small products per token, in one launch.

Layout (``passes.kronecker.KroneckerLinear``): ``A: (r, a_out, a_in)``, ``B: (r, b_out, b_in)``;
a token's (zero-padded) input is the ``a_in × b_in`` matrix ``X`` and its output the
``a_out × b_out`` matrix ``Y = Σ_t A_t·X·B_tᵀ``, read row by row (column ``i1·b_out + i2``) and
cropped to ``out``. The torch reference runs ``X·B_tᵀ`` for all tokens and terms as one matmul
(rounded to the input dtype), permutes that intermediate in memory, then one more matmul and a
transpose. Here a program owns one token and a ``BA × BB`` tile of ``Y``: it holds ``X`` in
registers, and per term computes ``Z = X·B_tᵀ`` for its ``BB`` columns on tensor cores, rounds it
to the input dtype as the reference does, and accumulates ``A_t·Z`` — no intermediate in memory,
one store. ``X`` must fit a register tile: ``a_in·b_in`` (padded to powers of two) at most
:data:`MAX_TILE` (:func:`supports`); larger factors take the reference.
"""

from __future__ import annotations

import torch

from codegen.kernels.common import (
    DOT_HELPER,
    ROW_TAIL,
    KernelError,
    check_float,
    dot_flags,
    launch_rows,
    next_pow2,
    reference_epilogue,
)
from codegen.template import NO_EPILOGUE, Epilogue, build, shape_class

__all__ = ["CONFIGS", "MAX_TILE", "fits", "kernel", "kronecker_linear", "kronecker_linear_ref", "supports"]

#: Largest padded ``a_in · b_in`` (a token's input as a matrix) the kernel holds in registers.
MAX_TILE = 8192

TEMPLATE = (
    DOT_HELPER
    + """

@triton.jit
def ${KERNEL}(
    x_ptr, a_ptr, b_ptr, bias_ptr, out_ptr, ${AUX_PARAMS}
    M, IN, N, R, A_OUT, A_IN, B_OUT, B_IN, stride_xm, M_CLASS,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    AI: tl.constexpr, BI: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr,
):
    m = tl.program_id(0)
    offs_i1 = tl.program_id(1) * BA + tl.arange(0, BA)  # rows of A_t: Y's rows
    offs_i2 = tl.program_id(2) * BB + tl.arange(0, BB)  # rows of B_t: Y's columns
    offs_j1 = tl.arange(0, AI)
    offs_j2 = tl.arange(0, BI)
    i1_mask = offs_i1 < A_OUT
    i2_mask = offs_i2 < B_OUT
    j1_mask = offs_j1 < A_IN
    j2_mask = offs_j2 < B_IN

    # the token's input as the a_in × b_in matrix X (past `in`: the zero padding)
    col = offs_j1[:, None] * B_IN + offs_j2[None, :]
    X = tl.load(x_ptr + m * stride_xm + col, mask=j1_mask[:, None] & j2_mask[None, :] & (col < IN), other=0.0)

    # Y = Σ_t A_t · (X · B_tᵀ), the inner product rounded to the input dtype as the reference's is
    acc = tl.zeros((BA, BB), dtype=tl.float32)
    for t in range(R):
        bt = tl.load(b_ptr + t * B_OUT * B_IN + offs_i2[None, :] * B_IN + offs_j2[:, None],
                     mask=i2_mask[None, :] & j2_mask[:, None], other=0.0)
        z = _dot(X, bt, tl.zeros((AI, BB), dtype=tl.float32), IEEE, UPCAST).to(x_ptr.dtype.element_ty)
        at = tl.load(a_ptr + t * A_OUT * A_IN + offs_i1[:, None] * A_IN + offs_j1[None, :],
                     mask=i1_mask[:, None] & j1_mask[None, :], other=0.0)
        acc = _dot(at, z, acc, IEEE, UPCAST)

    # output column i1·b_out + i2 (cropped to N): the tile as one row for the shared tail
    offs_n = tl.reshape(offs_i1[:, None] * B_OUT + offs_i2[None, :], (BA * BB,))
    n_mask = tl.reshape(i1_mask[:, None] & i2_mask[None, :], (BA * BB,)) & (offs_n < N)
    acc = tl.reshape(acc, (BA * BB,))
"""
    + ROW_TAIL
)

#: Tiles of Y per program (the dots need each ≥ 16).
CONFIGS = (
    {"BA": 32, "BB": 32, "num_warps": 4, "num_stages": 1},
    {"BA": 64, "BB": 64, "num_warps": 4, "num_stages": 1},
    {"BA": 16, "BB": 64, "num_warps": 4, "num_stages": 1},
    {"BA": 64, "BB": 16, "num_warps": 4, "num_stages": 1},
    {"BA": 64, "BB": 64, "num_warps": 8, "num_stages": 1},
    {"BA": 16, "BB": 16, "num_warps": 2, "num_stages": 1},
)


def kernel(epilogue: Epilogue = NO_EPILOGUE):
    """The built kernel for ``epilogue`` (cached; ``.source`` is the generated code)."""
    return build(TEMPLATE, "_kronecker_linear_kernel", epilogue, CONFIGS, ("M_CLASS", "N", "A_IN", "B_IN", "R"), __name__)


def fits(a_in: int, b_in: int) -> bool:
    """Whether an ``a_in × b_in`` input matrix fits the kernel's register tile (:data:`MAX_TILE`)."""
    return next_pow2(max(16, a_in)) * next_pow2(max(16, b_in)) <= MAX_TILE


def supports(A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether the factors' input matrix fits the kernel (:func:`fits`)."""
    return fits(A.shape[2], B.shape[2])


def kronecker_linear_ref(x, A, B, out_features: int, bias=None, epilogue: str = "", aux=()) -> torch.Tensor:
    """The semantics: the module's torch code (``passes.kronecker.kronecker_forward``: two matmuls
    and a permute), then the epilogue."""
    from passes.kronecker import kronecker_forward

    return reference_epilogue(kronecker_forward(x, A, B, out_features, bias), epilogue, aux)


def kronecker_linear(x, A, B, out_features: int, bias=None, epilogue: str = "", aux=(), *, wrap=None) -> torch.Tensor:
    """``epilogue(Σ_t (A_t ⊗ B_t)·x + bias)`` in one launch.

    Args:
        x: ``(..., in)`` with ``in ≤ a_in·b_in``. A: ``(r, a_out, a_in)``; B: ``(r, b_out, b_in)``.
        out_features: ``out ≤ a_out·b_out``. bias: ``(out,)`` or None.
        epilogue, aux: the fused epilogue and its output-shaped operands.
        wrap: ``torch.library.wrap_triton`` inside a ``triton_op``.
    """
    if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0]:
        raise KernelError(
            f"Kronecker factors must be A (r, a_out, a_in) and B (r, b_out, b_in), got {tuple(A.shape)}, {tuple(B.shape)}"
        )
    r, a_out, a_in = A.shape
    b_out, b_in = B.shape[1:]
    n_in = x.shape[-1]
    if n_in > a_in * b_in or out_features > a_out * b_out:
        raise KernelError(f"x has {n_in} features and out is {out_features}; the factors cover {a_in * b_in} → {a_out * b_out}")
    if not supports(A, B):
        raise KernelError(
            f"a {a_in}×{b_in} input matrix exceeds the kernel's register tile ({MAX_TILE}); use kronecker_linear_ref"
        )
    for name, t in (("A", A), ("B", B)) + ((("bias", bias),) if bias is not None else ()):
        check_float(name, t, x.dtype, x.device)
    ep, x2, m, auxs, out, out_shape = launch_rows(x, n_in, out_features, epilogue, aux)
    if m == 0:
        return out.view(out_shape)
    kernel(ep).launch(
        lambda meta: (m, -(-a_out // meta["BA"]), -(-b_out // meta["BB"])),
        x2, A.contiguous(), B.contiguous(), bias, out, *auxs,
        m, n_in, out_features, r, a_out, a_in, b_out, b_in, x2.stride(0), shape_class(m),
        HAS_BIAS=bias is not None, AI=next_pow2(max(16, a_in)), BI=next_pow2(max(16, b_in)), wrap=wrap, **dot_flags(x.dtype),
    )  # fmt: skip
    return out.view(out_shape)
