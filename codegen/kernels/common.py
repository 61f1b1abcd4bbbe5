"""What every kernel wrapper shares: argument checks, the dot helper, launch constants.

Not a kernel. The Triton source here (:data:`DOT_HELPER`) is pasted into templates.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from codegen.template import Epilogue, interpreting

__all__ = [
    "DOT_HELPER",
    "FLOAT_DTYPES",
    "ROW_TAIL",
    "UNUSED",
    "KernelError",
    "LaunchRows",
    "aux_rows",
    "check_float",
    "dot_flags",
    "launch_rows",
    "next_pow2",
    "parse_epilogue",
    "reference_epilogue",
    "rows_of",
    "tile_tail",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: ``acc += a @ b`` with the precision the torch reference uses. ``IEEE``: fp32 inputs without
#: TF32 (torch's default for fp32 matmuls). ``UPCAST``: widen to fp32 first — Triton's
#: interpreter computes bf16 ``tl.dot`` wrongly (numpy has no bfloat16; we measured errors of
#: 1e10), so CPU runs of bf16 kernels take this path; compiled GPU kernels never do.
DOT_HELPER = """
@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)
"""


#: The end of a one-row (GEMV) template: bias, the epilogue slot, one store. Before it the template
#: has the fp32 accumulator ``acc`` over output columns ``offs_n`` (in range: ``n_mask``) of row ``m``.
ROW_TAIL = """    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    out_offs = m * N + offs_n
    out_mask = n_mask
    ${EPILOGUE}
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
"""


def tile_tail(indent: str = "    ") -> str:
    """The end of a 2-D tile template at ``indent``: bias, the epilogue slot, one store. Before it
    the template has the fp32 accumulator ``acc`` over rows ``offs_m`` (in range: ``m_mask``) and
    output columns ``offs_n`` (``n_mask``) of an ``(M, N)`` output."""
    return "".join(indent + line + "\n" for line in _TILE_TAIL.splitlines())


_TILE_TAIL = """if HAS_BIAS:
    acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
out_offs = offs_m[:, None] * N + offs_n[None, :]
out_mask = m_mask[:, None] & n_mask[None, :]
${EPILOGUE}
tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)"""


class KernelError(ValueError):
    """Arguments a kernel cannot take (shapes, dtypes, devices); the message says what is expected."""


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def check_float(name: str, t: torch.Tensor, dtype: torch.dtype | None = None, device=None) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise KernelError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise KernelError(f"{name} is {t.dtype} but the input is {dtype}; cast it (module.to(dtype))")
    if device is not None and t.device != device:
        raise KernelError(f"{name} is on {t.device} but the input is on {device}; move the module (.to(device))")


def rows_of(x: torch.Tensor, k: int, name: str = "x") -> torch.Tensor:
    """``x`` as a row-contiguous ``(M, k)`` matrix (a view when it already is one)."""
    if x.shape[-1] != k:
        raise KernelError(f"{name} has {x.shape[-1]} features in its last dimension, the weight expects {k}")
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def aux_rows(aux, epilogue: Epilogue, out_shape: tuple[int, ...], device, m: int, n: int) -> list[torch.Tensor]:
    """The epilogue's auxiliary tensors as contiguous ``(M, N)`` matrices (shape-checked)."""
    aux = list(aux)
    if len(aux) != epilogue.n_aux:
        raise KernelError(f"epilogue {epilogue.spec!r} reads {epilogue.n_aux} auxiliary tensor(s), got {len(aux)}")
    out = []
    for i, a in enumerate(aux):
        if tuple(a.shape) != tuple(out_shape):
            raise KernelError(f"auxiliary tensor {i} has shape {tuple(a.shape)}, the output is {tuple(out_shape)}")
        if a.device != device:
            raise KernelError(f"auxiliary tensor {i} is on {a.device}, the output on {device}")
        out.append(a.reshape(m, n).contiguous())
    return out


class LaunchRows(NamedTuple):
    """What a launch of a row-wise operator works on (:func:`launch_rows`)."""

    epilogue: Epilogue
    x2: torch.Tensor  # the input as row-contiguous (M, in)
    m: int
    auxs: list  # the epilogue's operands as contiguous (M, out)
    out: torch.Tensor  # (M, out), uninitialised
    shape: tuple  # the output's shape as the caller sees it: (..., out)


def launch_rows(x: torch.Tensor, n_in: int, n_out: int, epilogue: str, aux) -> LaunchRows:
    """The parsed epilogue, ``x`` as ``(M, n_in)`` rows, its checked auxiliary tensors and the
    ``(M, n_out)`` output buffer in ``x``'s dtype: the launch wrappers' shared preamble (Monarch,
    block-diagonal, Kronecker, LLM.int8())."""
    ep = parse_epilogue(epilogue)
    x2 = rows_of(x, n_in)
    m = x2.shape[0]
    shape = (*x.shape[:-1], n_out)
    auxs = aux_rows(aux, ep, shape, x.device, m, n_out)
    return LaunchRows(ep, x2, m, auxs, torch.empty((m, n_out), dtype=x.dtype, device=x.device), shape)


def reference_epilogue(y: torch.Tensor, epilogue: str, aux) -> torch.Tensor:
    """A reference's tail: ``epilogue`` applied in fp32 to ``y`` (``(..., out)``, bias already
    added), rounded once to ``y``'s dtype. No epilogue: ``y`` as it is (the fp32 round trip would be
    two elementwise passes over the output for nothing: H100 run 8 timed the quantized prefill at
    512 × 576 → 1536 at 13.2 µs where its decode alone took 2.3 and the dense matmul 4.7)."""
    if not epilogue:
        return y
    n_out = y.shape[-1]
    rows = y.reshape(-1, n_out)
    out = Epilogue.parse(epilogue).apply_ref(rows.float(), [a.reshape(rows.shape[0], n_out) for a in aux])
    return out.to(y.dtype).reshape(y.shape)


#: What a launch passes for a pointer argument the kernel's constexprs compile out (no bias, no
#: low-rank term, a constant slot the format does not use, a group's missing third weight): None.
#: Triton makes a None argument a constexpr, so the launcher neither reads a ``data_ptr`` nor asks
#: the driver about the pointer (``cuPointerGetAttribute``, once per tensor argument and launch),
#: and a traced graph holds no placeholder allocation for it. (Until 2026-11 every such slot got a
#: one-element tensor: up to 12 per grouped launch, each a node and a buffer in compiled graphs.)
UNUSED = None


_EPILOGUES: dict[str, Epilogue] = {}


def parse_epilogue(spec: str) -> Epilogue:
    """:meth:`Epilogue.parse`, cached (it runs on every launch)."""
    ep = _EPILOGUES.get(spec)
    if ep is None:
        ep = _EPILOGUES[spec] = Epilogue.parse(spec)
    return ep


def dot_flags(dtype: torch.dtype) -> dict:
    """``IEEE``/``UPCAST`` constexprs for inputs of ``dtype`` (see :data:`DOT_HELPER`)."""
    ieee = dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    upcast = dtype == torch.bfloat16 and interpreting()
    return {"IEEE": ieee or upcast, "UPCAST": upcast}
