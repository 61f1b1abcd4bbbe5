"""When the rewritten modules call the kernels, and the calls they make (light: no triton import).

``passes`` modules (``LowRankLinear``, ``QuantizedLinear``, ``LQLinear``, ``MonarchLinear``, ``BlockDiagLinear``,
``Int8OutlierLinear``, ``KroneckerLinear``)
ask :func:`use_kernels` in their ``forward``; when it says yes they call the ``decomp::*``
operator through the helpers here, otherwise they keep their eager torch code (which is the
kernels' reference, so both give the same results up to rounding order). Yes means:

- the input is on CUDA and triton is installed (or :func:`force_kernels` is on: the CPU tests
  run the operators, i.e. Triton's interpreter, this way),
- no gradient is needed (the kernels have no backward),
- the module's float parameters have the input's dtype (under autocast they may not),
- not inside ``torch.export`` (export keeps the modules' own code, which
  ``passes.dequant_ops``/ONNX lowering translate),
- not switched off with ``DECOMP_KERNELS=0`` (or :func:`force_kernels(False) <force_kernels>`).

The operators are registered on first use (``import codegen.ops``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

__all__ = [
    "blockdiag_linear",
    "force_kernels",
    "int8_outlier_linear",
    "kernel_args",
    "kronecker_linear",
    "lowrank_linear",
    "monarch_linear",
    "quant_linear",
    "quant_linear_group",
    "use_kernels",
]

_TRITON = importlib.util.find_spec("triton") is not None
_ENABLED = os.environ.get("DECOMP_KERNELS", "1") != "0"
_FORCE: bool | None = None  # None: decide by device; True/False: forced on/off


@contextlib.contextmanager
def force_kernels(on: bool = True):
    """Within the block, rewritten modules call the ``decomp::*`` operators on any device (``on``)
    or never (``not on``). CPU inputs then run the kernels in Triton's interpreter when
    ``TRITON_INTERPRET=1``, else the torch references."""
    global _FORCE
    previous, _FORCE = _FORCE, on
    try:
        yield
    finally:
        _FORCE = previous


def _exporting() -> bool:
    """Inside ``torch.export`` (not merely ``torch.compile``).

    Reads the flag export sets rather than calling ``torch.compiler.is_exporting()``: dynamo
    before torch 2.13 folds that call to True while tracing for ``torch.compile`` too, which
    made every compiled graph take the torch path (seen on torch 2.11, H100).
    """
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return bool(flag) if flag is not None else torch.compiler.is_exporting()


def use_kernels(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether a rewritten module with input ``x`` and float parameters ``params`` should call its kernel."""
    if _exporting():
        return False
    params = [p for p in params if p is not None]
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return False
    if any(p.dtype != x.dtype for p in params):
        return False  # mixed dtypes (autocast): the torch path casts, the kernels do not
    if _FORCE is not None:
        return _FORCE
    return _ENABLED and _TRITON and x.is_cuda


def _direct(x: torch.Tensor) -> bool:
    """Eager call on a real CUDA tensor (not traced, not compiling): launch without the op layer."""
    return type(x) is torch.Tensor and x.is_cuda and not torch.compiler.is_compiling()


def _ops():
    import codegen.ops  # noqa: F401  (registers torch.ops.decomp.*)

    return torch.ops.decomp


def _call(name: str, x: torch.Tensor, *args):
    """``torch.ops.decomp.<name>(x, *args)``; for an eager call on a real CUDA tensor, the operator's
    CUDA branch (``codegen.ops.<name>_cuda``) directly, without the dispatcher's per-call cost."""
    if _direct(x):
        import codegen.ops

        return getattr(codegen.ops, f"{name}_cuda")(x, *args)
    return getattr(_ops(), name)(x, *args)


def lowrank_linear(x, down, up, bias=None, epilogue: str = "", aux=()) -> torch.Tensor:
    """``decomp::lowrank_linear``: ``epilogue((x·downᵀ)·upᵀ + bias)``."""
    return _call("lowrank_linear", x, down, up, bias, epilogue, list(aux))


def quant_linear(x, packed, bias=None, down=None, up=None, epilogue: str = "", aux=()) -> torch.Tensor:
    """``decomp::quant_linear`` over a ``PackedWeight``'s buffers as stored (+ the optional low-rank term).

    Reads what the kernel takes besides tensors from ``packed.kernel_args`` (worked out once, when
    the weight was packed) and the tensors from ``packed._buffers``: under ``torch.compile`` every
    Python value read here becomes a guard checked on every call. Deriving the format from the
    config per call cost a Python-evaluated guard per quantized linear (209 on SmolLM2) and 20
    guards per linear instead of the 11 left (``tests/codegen/test_guards.py``)."""
    spec, names, cols = packed.kernel_args
    buffers = packed._buffers  # one dict lookup per tensor, not nn.Module.__getattr__'s three
    codes, constants = buffers["codes"], [buffers[n] for n in names]
    return _call("quant_linear", x, codes, constants, spec, cols, bias, down, up, epilogue, list(aux))


def quant_linear_group(
    x, packed, pair: bool = False, epilogue: str = "", aux=(), norm_weight=None, eps: float = 0.0, biases=()
) -> list[torch.Tensor]:
    """``decomp::quant_linear_group`` over two or three ``PackedWeight``s of one format and input
    size: ``[epilogue(silu(x·W₀ᵀ)·(x·W₁ᵀ))]`` (``pair``) or ``[x·Wᵢᵀ (+ biases[i]) for each]``, one
    launch at decode sizes (``codegen.fusion`` emits it for sibling linears in compiled graphs); with
    ``norm_weight``, of HF Llama's RMSNorm of x (weight ``norm_weight``, ``eps``) instead of x."""
    from codegen.kernels.common import KernelError

    args = {p.kernel_args for p in packed}
    if len(args) != 1:
        raise KernelError(f"a group's weights must share one format and input size, got {sorted(a[0] for a in args)}")
    spec, names, cols = packed[0].kernel_args
    codes = [p._buffers["codes"] for p in packed]
    constants = [[p._buffers[n] for n in names] for p in packed]
    flat = [c for per in constants for c in per]
    return _call("quant_linear_group", x, codes, flat, spec, cols, pair, epilogue, list(aux), norm_weight, eps, list(biases))


def kernel_args(config, in_features: int) -> tuple[str, tuple[str, ...], int]:
    """``(format string, constant buffer names in argument order, input columns)`` that
    ``decomp::quant_linear`` takes for a ``passes.quant_storage`` config; raises ``KernelError`` for
    a config without a kernel."""
    from codegen.kernels.dequant import QuantFormat

    fmt = QuantFormat.of(config)
    return fmt.spec, fmt.constant_names(), in_features


def blockdiag_linear(
    x, blocks, out_features: int, in_index=None, out_pos=None, bias=None, epilogue: str = "", aux=()
) -> torch.Tensor:
    """``decomp::blockdiag_linear``: ``epilogue(blockdiag(x) + bias)`` with the input permutation
    ``in_index`` and the output positions ``out_pos`` (``in_index``/``out_index`` inverted) fused."""
    return _call("blockdiag_linear", x, blocks, out_features, in_index, out_pos, bias, epilogue, list(aux))


def int8_outlier_linear(x, packed, bias=None, epilogue: str = "", aux=()) -> torch.Tensor:
    """``decomp::int8_outlier_linear`` over an ``Int8OutlierWeight``'s buffers: LLM.int8()'s per-token
    int8 product plus the fp16 outlier columns, ``epilogue(... + bias)``."""
    b = packed._buffers
    return _call(
        "int8_outlier_linear", x, b["codes"], b["scale"], b["input_index"], b["outlier_columns"], b["outlier_weight"], bias,
        epilogue, list(aux),
    )  # fmt: skip


def kronecker_linear(x, A, B, out_features: int, bias=None, epilogue: str = "", aux=()) -> torch.Tensor:
    """``decomp::kronecker_linear``: ``epilogue(Σ_t (A_t ⊗ B_t)·x + bias)``."""
    return _call("kronecker_linear", x, A, B, out_features, bias, epilogue, list(aux))


def monarch_linear(x, L, R, out_features: int, bias=None, epilogue: str = "", aux=()) -> torch.Tensor:
    """``decomp::monarch_linear``: ``epilogue(monarch(x) + bias)``."""
    return _call("monarch_linear", x, L, R, out_features, bias, epilogue, list(aux))
