"""The kernels as ``decomp::*`` operators (``torch.library``), what modules and compiled graphs call.

Each operator is a ``triton_op``: on CUDA its body launches the Triton kernel through
``wrap_triton``, so ``torch.compile`` (dynamo + inductor) traces into it and schedules the
kernel itself, and ``torch.export`` records it. On any other device the body calls a
``*_host`` twin, an opaque ``custom_op`` that runs the same kernel in Triton's interpreter when
``TRITON_INTERPRET=1`` (the CPU tests; the CUDA branch itself where it depends only on the
arguments, the kernel at every row count for Monarch and block-diagonal) and the eager torch
reference otherwise. Fake (meta)
implementations come from the bodies themselves (``triton_op`` traces them with fake tensors).

| op | computes | module |
|---|---|---|
| ``decomp::lowrank_linear(x, down, up, bias, epilogue, aux)`` | ``ep((x·downᵀ)·upᵀ + b)`` | ``LowRankLinear`` |
| ``decomp::quant_linear(x, codes, constants, fmt, cols, bias, down, up, epilogue, aux)`` | ``ep(x·deq(W)ᵀ [+ (x·downᵀ)·upᵀ] + b)`` | ``QuantizedLinear``, ``LQLinear`` |
| ``decomp::quant_linear_group(x, codes[], constants[], fmt, cols, pair, epilogue, aux, norm_weight, eps, biases)`` | ``[ep(silu(x'·W₀ᵀ)·(x'·W₁ᵀ))]`` or ``[x'·W₀ᵀ + b₀, x'·W₁ᵀ + b₁, …]``, x' = x or its RMSNorm | sibling ``QuantizedLinear``s (``codegen.siblings``) |
| ``decomp::monarch_linear(x, L, R, out_features, bias, epilogue, aux)`` | ``ep(monarch(x) + b)`` | ``MonarchLinear`` |
| ``decomp::blockdiag_linear(x, blocks, out_features, in_index, out_pos, bias, epilogue, aux)`` | ``ep(blockdiag(x) + b)``, permutations fused | ``BlockDiagLinear`` |
| ``decomp::kronecker_linear(x, A, B, out_features, bias, epilogue, aux)`` | ``ep(Σ_t (A_t ⊗ B_t)·x + b)`` | ``KroneckerLinear`` |
| ``decomp::int8_outlier_linear(x, codes, scale, input_index, outlier_columns, outlier_weight, bias, epilogue, aux)`` | ``ep(int8(x)·codesᵀ·s + x_o·W_oᵀ + b)`` (LLM.int8()) | ``Int8OutlierLinear`` |

Each operator's CUDA branch is a plain function, ``<op>_cuda(..., wrap=None)``: the operator calls
it with ``wrap_triton`` (traced), and ``codegen.dispatch`` calls it directly for an eager call on
a real CUDA tensor, without the operator dispatcher's per-call cost (~20 µs of Python a call).

Importing it also memoizes torch.compile's per-call analysis of what each of our kernels writes
(:mod:`codegen.analysis_cache`).

``epilogue`` is a :class:`codegen.template.Epilogue` spec (``""``, ``"silu,mul"``, ...); ``aux``
its output-shaped operands. No autograd: callers take the torch path when gradients are needed.

Importing this module registers the operators; it imports torch only (triton when a kernel
first runs).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from codegen import analysis_cache
from codegen.kernels import blockdiag as _blockdiag
from codegen.kernels import dequant as _dequant
from codegen.kernels import int8_outlier as _int8_outlier
from codegen.kernels import kronecker as _kronecker
from codegen.kernels import lowrank as _lowrank
from codegen.kernels import monarch as _monarch

__all__ = [
    "OPS",
    "blockdiag_linear",
    "int8_outlier_linear",
    "interpreter_active",
    "kronecker_linear",
    "lowrank_linear",
    "monarch_linear",
    "quant_linear",
    "quant_linear_group",
]


def interpreter_active() -> bool:
    """Whether kernels on CPU tensors run in Triton's interpreter (triton importable and TRITON_INTERPRET=1)."""
    try:
        from codegen.template import interpreting

        return interpreting()
    except ImportError:
        return False


def _on_gpu(x: Tensor) -> bool:
    return x.device.type == "cuda"


# ---- low-rank -------------------------------------------------------------------------------


@torch.library.custom_op("decomp::lowrank_linear_host", mutates_args=())
def _lowrank_host(x: Tensor, down: Tensor, up: Tensor, bias: Tensor | None, epilogue: str, aux: list[Tensor]) -> Tensor:
    if interpreter_active():
        return lowrank_linear_cuda(x, down, up, bias, epilogue, aux)
    return _lowrank.lowrank_linear_ref(x, down, up, bias, epilogue, aux)


@_lowrank_host.register_fake
def _(x, down, up, bias, epilogue, aux):
    return x.new_empty((*x.shape[:-1], up.shape[0]))


@triton_op("decomp::lowrank_linear", mutates_args=())
def lowrank_linear(x: Tensor, down: Tensor, up: Tensor, bias: Tensor | None, epilogue: str, aux: list[Tensor]) -> Tensor:
    """``epilogue((x·downᵀ)·upᵀ + bias)``; see :func:`codegen.kernels.lowrank.lowrank_linear`."""
    if _on_gpu(x):
        return lowrank_linear_cuda(x, down, up, bias, epilogue, aux, wrap=wrap_triton)
    return torch.ops.decomp.lowrank_linear_host(x, down, up, bias, epilogue, aux)


def lowrank_linear_cuda(x, down, up, bias, epilogue, aux, wrap=None):
    """The CUDA branch: the fused kernel, or two matmuls for a rank past its on-chip limit."""
    if _lowrank.supports(x, down):
        return _lowrank.lowrank_linear(x, down, up, bias, epilogue, aux, wrap=wrap)
    return _lowrank.lowrank_linear_ref(x, down, up, bias, epilogue, aux)


# ---- dequantize + matmul (+ low-rank) ---------------------------------------------------------


@torch.library.custom_op("decomp::quant_linear_host", mutates_args=())
def _quant_host(
    x: Tensor,
    codes: Tensor,
    constants: list[Tensor],
    fmt: str,
    cols: int,
    bias: Tensor | None,
    down: Tensor | None,
    up: Tensor | None,
    epilogue: str,
    aux: list[Tensor],
) -> Tensor:
    if interpreter_active():
        return quant_linear_cuda(x, codes, constants, fmt, cols, bias, down, up, epilogue, aux)
    return _dequant.quant_linear_ref(x, codes, constants, fmt, cols, bias, down, up, epilogue, aux)


@_quant_host.register_fake
def _(x, codes, constants, fmt, cols, bias, down, up, epilogue, aux):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


@triton_op("decomp::quant_linear", mutates_args=())
def quant_linear(
    x: Tensor,
    codes: Tensor,
    constants: list[Tensor],
    fmt: str,
    cols: int,
    bias: Tensor | None,
    down: Tensor | None,
    up: Tensor | None,
    epilogue: str,
    aux: list[Tensor],
) -> Tensor:
    """``epilogue(x·deq(W)ᵀ [+ (x·downᵀ)·upᵀ] + bias)``; see :func:`codegen.kernels.dequant.quant_linear`."""
    if _on_gpu(x):
        return quant_linear_cuda(x, codes, constants, fmt, cols, bias, down, up, epilogue, aux, wrap=wrap_triton)
    return torch.ops.decomp.quant_linear_host(x, codes, constants, fmt, cols, bias, down, up, epilogue, aux)


def quant_linear_cuda(x, codes, constants, fmt, cols, bias, down, up, epilogue, aux, wrap=None):
    """The CUDA branch: the dequantizing kernels, or the reference for a low-rank term past their limit."""
    if _dequant.supports(down):
        return _dequant.quant_linear(x, codes, constants, fmt, cols, bias, down, up, epilogue, aux, wrap=wrap)
    return _dequant.quant_linear_ref(x, codes, constants, fmt, cols, bias, down, up, epilogue, aux)


def _per_weight(constants: list[Tensor], fmt: str, n: int) -> list[list[Tensor]]:
    """The flat constants list of a group op as one list per weight (the schema has no nested lists)."""
    k = len(_dequant.QuantFormat.parse(fmt).constant_names())
    if len(constants) != k * n:
        raise _dequant.KernelError(
            f"{fmt} stores {k} constant buffer(s) per weight: {k * n} for {n} weights, got {len(constants)}"
        )
    return [constants[i * k : (i + 1) * k] for i in range(n)]


@torch.library.custom_op("decomp::quant_linear_group_host", mutates_args=())
def _group_host(
    x: Tensor,
    codes: list[Tensor],
    constants: list[Tensor],
    fmt: str,
    cols: int,
    pair: bool,
    epilogue: str,
    aux: list[Tensor],
    norm_weight: Tensor | None,
    eps: float,
    biases: list[Tensor],
) -> list[Tensor]:
    if interpreter_active():
        return quant_linear_group_cuda(x, codes, constants, fmt, cols, pair, epilogue, aux, norm_weight, eps, biases)
    per = _per_weight(constants, fmt, len(codes))
    return _dequant.quant_linear_group_ref(x, codes, per, fmt, cols, pair, epilogue, aux, norm_weight, eps, biases)


@_group_host.register_fake
def _(x, codes, constants, fmt, cols, pair, epilogue, aux, norm_weight, eps, biases):
    return [x.new_empty((*x.shape[:-1], c.shape[0])) for c in (codes[:1] if pair else codes)]


@triton_op("decomp::quant_linear_group", mutates_args=())
def quant_linear_group(
    x: Tensor,
    codes: list[Tensor],
    constants: list[Tensor],
    fmt: str,
    cols: int,
    pair: bool,
    epilogue: str,
    aux: list[Tensor],
    norm_weight: Tensor | None,
    eps: float,
    biases: list[Tensor],
) -> list[Tensor]:
    """Two or three quantized linears on one input in one launch: ``[epilogue(silu(x·W₀ᵀ)·(x·W₁ᵀ))]``
    (``pair``) or ``[x·W₀ᵀ (+ b₀), x·W₁ᵀ (+ b₁), …]``, of ``rms_norm(x)`` when ``norm_weight`` is
    given; ``constants`` is every weight's constant buffers, one weight after the other. See
    :func:`codegen.kernels.dequant.quant_linear_group`."""
    if _on_gpu(x):
        return quant_linear_group_cuda(x, codes, constants, fmt, cols, pair, epilogue, aux, norm_weight, eps, biases, wrap_triton)
    return torch.ops.decomp.quant_linear_group_host(x, codes, constants, fmt, cols, pair, epilogue, aux, norm_weight, eps, biases)


def quant_linear_group_cuda(x, codes, constants, fmt, cols, pair, epilogue, aux, norm_weight, eps, biases, wrap=None):
    """The CUDA branch: the grouped GEMV (separate launches past decode rows)."""
    per = _per_weight(constants, fmt, len(codes))
    return _dequant.quant_linear_group(x, codes, per, fmt, cols, pair, epilogue, aux, norm_weight, eps, biases, wrap=wrap)


# ---- Monarch --------------------------------------------------------------------------------


@torch.library.custom_op("decomp::monarch_linear_host", mutates_args=())
def _monarch_host(
    x: Tensor, L: Tensor, R: Tensor, out_features: int, bias: Tensor | None, epilogue: str, aux: list[Tensor]
) -> Tensor:
    if interpreter_active():
        return _monarch.monarch_linear(x, L, R, out_features, bias, epilogue, aux)
    return _monarch.monarch_linear_ref(x, L, R, out_features, bias, epilogue, aux)


@_monarch_host.register_fake
def _(x, L, R, out_features, bias, epilogue, aux):
    return x.new_empty((*x.shape[:-1], out_features))


@triton_op("decomp::monarch_linear", mutates_args=())
def monarch_linear(
    x: Tensor, L: Tensor, R: Tensor, out_features: int, bias: Tensor | None, epilogue: str, aux: list[Tensor]
) -> Tensor:
    """``epilogue(monarch(x) + bias)``; see :func:`codegen.kernels.monarch.monarch_linear`.

    On CUDA the kernels run at every row count (H100 run 9, n = 4096, 64 blocks: 3.0 µs vs the
    reference's batched matmuls 5.6 at 1 row, 9.5 vs 10.3 at 512, 50.9 vs 51.5 at 4096 — the
    reference returning a transposed view of its output and leaving bias and epilogue to further
    passes, the kernels a row-major output with both fused).
    """
    if _on_gpu(x):
        return monarch_linear_cuda(x, L, R, out_features, bias, epilogue, aux, wrap=wrap_triton)
    return torch.ops.decomp.monarch_linear_host(x, L, R, out_features, bias, epilogue, aux)


def monarch_linear_cuda(x, L, R, out_features, bias, epilogue, aux, wrap=None):
    """The CUDA branch: the kernels at every row count."""
    return _monarch.monarch_linear(x, L, R, out_features, bias, epilogue, aux, wrap=wrap)


# ---- block-diagonal ---------------------------------------------------------------------------


@torch.library.custom_op("decomp::blockdiag_linear_host", mutates_args=())
def _blockdiag_host(
    x: Tensor, blocks: Tensor, out_features: int, in_index: Tensor | None, out_pos: Tensor | None, bias: Tensor | None,
    epilogue: str, aux: list[Tensor],
) -> Tensor:  # fmt: skip
    if interpreter_active():
        return _blockdiag.blockdiag_linear(x, blocks, out_features, in_index, out_pos, bias, epilogue, aux)
    return _blockdiag.blockdiag_linear_ref(x, blocks, out_features, in_index, out_pos, bias, epilogue, aux)


@_blockdiag_host.register_fake
def _(x, blocks, out_features, in_index, out_pos, bias, epilogue, aux):
    return x.new_empty((*x.shape[:-1], out_features))


@triton_op("decomp::blockdiag_linear", mutates_args=())
def blockdiag_linear(
    x: Tensor, blocks: Tensor, out_features: int, in_index: Tensor | None, out_pos: Tensor | None, bias: Tensor | None,
    epilogue: str, aux: list[Tensor],
) -> Tensor:  # fmt: skip
    """``epilogue(blockdiag(x) + bias)``, permutations fused; see :func:`codegen.kernels.blockdiag.blockdiag_linear`
    (past :data:`~codegen.kernels.blockdiag.KERNEL_MAX_M` rows the torch path runs on CUDA too)."""
    if _on_gpu(x):
        return blockdiag_linear_cuda(x, blocks, out_features, in_index, out_pos, bias, epilogue, aux, wrap=wrap_triton)
    return torch.ops.decomp.blockdiag_linear_host(x, blocks, out_features, in_index, out_pos, bias, epilogue, aux)


def blockdiag_linear_cuda(x, blocks, out_features, in_index, out_pos, bias, epilogue, aux, wrap=None):
    """The CUDA branch: the kernel up to ``KERNEL_MAX_M`` rows, the torch path beyond."""
    if _blockdiag.kernel_takes(x):
        return _blockdiag.blockdiag_linear(x, blocks, out_features, in_index, out_pos, bias, epilogue, aux, wrap=wrap)
    return _blockdiag.blockdiag_linear_ref(x, blocks, out_features, in_index, out_pos, bias, epilogue, aux)


# ---- Kronecker sums ----------------------------------------------------------------------------


@torch.library.custom_op("decomp::kronecker_linear_host", mutates_args=())
def _kronecker_host(
    x: Tensor, A: Tensor, B: Tensor, out_features: int, bias: Tensor | None, epilogue: str, aux: list[Tensor]
) -> Tensor:
    if interpreter_active():
        return kronecker_linear_cuda(x, A, B, out_features, bias, epilogue, aux)
    return _kronecker.kronecker_linear_ref(x, A, B, out_features, bias, epilogue, aux)


@_kronecker_host.register_fake
def _(x, A, B, out_features, bias, epilogue, aux):
    return x.new_empty((*x.shape[:-1], out_features))


@triton_op("decomp::kronecker_linear", mutates_args=())
def kronecker_linear(
    x: Tensor, A: Tensor, B: Tensor, out_features: int, bias: Tensor | None, epilogue: str, aux: list[Tensor]
) -> Tensor:
    """``epilogue(Σ_t (A_t ⊗ B_t)·x + bias)``; see :func:`codegen.kernels.kronecker.kronecker_linear`
    (factors whose input matrix exceeds its register tile take the reference on CUDA too)."""
    if _on_gpu(x):
        return kronecker_linear_cuda(x, A, B, out_features, bias, epilogue, aux, wrap=wrap_triton)
    return torch.ops.decomp.kronecker_linear_host(x, A, B, out_features, bias, epilogue, aux)


def kronecker_linear_cuda(x, A, B, out_features, bias, epilogue, aux, wrap=None):
    """The CUDA branch: the kernel for factors within its tile, the torch path otherwise."""
    if _kronecker.supports(A, B):
        return _kronecker.kronecker_linear(x, A, B, out_features, bias, epilogue, aux, wrap=wrap)
    return _kronecker.kronecker_linear_ref(x, A, B, out_features, bias, epilogue, aux)


# ---- LLM.int8() --------------------------------------------------------------------------------


@torch.library.custom_op("decomp::int8_outlier_linear_host", mutates_args=())
def _int8_outlier_host(
    x: Tensor, codes: Tensor, scale: Tensor, input_index: Tensor, outlier_columns: Tensor, outlier_weight: Tensor,
    bias: Tensor | None, epilogue: str, aux: list[Tensor],
) -> Tensor:  # fmt: skip
    args = (x, codes, scale, input_index, outlier_columns, outlier_weight, bias, epilogue, aux)
    if interpreter_active():
        return int8_outlier_linear_cuda(*args)
    return _int8_outlier.int8_outlier_linear_ref(*args)


@_int8_outlier_host.register_fake
def _(x, codes, scale, input_index, outlier_columns, outlier_weight, bias, epilogue, aux):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


@triton_op("decomp::int8_outlier_linear", mutates_args=())
def int8_outlier_linear(
    x: Tensor, codes: Tensor, scale: Tensor, input_index: Tensor, outlier_columns: Tensor, outlier_weight: Tensor,
    bias: Tensor | None, epilogue: str, aux: list[Tensor],
) -> Tensor:  # fmt: skip
    """``epilogue(LLM.int8(x) + bias)``; see :func:`codegen.kernels.int8_outlier.int8_outlier_linear`."""
    args = (x, codes, scale, input_index, outlier_columns, outlier_weight, bias, epilogue, aux)
    if _on_gpu(x):
        return int8_outlier_linear_cuda(*args, wrap=wrap_triton)
    return torch.ops.decomp.int8_outlier_linear_host(*args)


def int8_outlier_linear_cuda(x, codes, scale, input_index, outlier_columns, outlier_weight, bias, epilogue, aux, wrap=None):
    """The CUDA branch: the quantization prologue and the int8 GEMM."""
    return _int8_outlier.int8_outlier_linear(
        x, codes, scale, input_index, outlier_columns, outlier_weight, bias, epilogue, aux, wrap=wrap
    )


#: The operators the fusion pass emits (and an exporter would need translations for).
OPS = (
    torch.ops.decomp.lowrank_linear.default,
    torch.ops.decomp.quant_linear.default,
    torch.ops.decomp.quant_linear_group.default,
    torch.ops.decomp.monarch_linear.default,
    torch.ops.decomp.blockdiag_linear.default,
    torch.ops.decomp.int8_outlier_linear.default,
    torch.ops.decomp.kronecker_linear.default,
)

# torch.compile analyses every call of these operators' kernels for what it writes; ours once per
# kernel and signature (codegen.analysis_cache)
analysis_cache.install()
