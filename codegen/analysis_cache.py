"""torch.compile's analysis of what a user Triton kernel writes, memoized for our kernels.

Tracing a ``triton_op``, torch asks of every kernel call in the graph which of its pointer
arguments the kernel stores to: it generates the kernel's TTIR with Triton's front end and walks
it (``torch._higher_order_ops.triton_kernel_wrap.identify_accessed_tensors``; before torch 2.13
``identify_mutated_tensors``). Functionalization asks once per call, inductor again while
lowering and scheduling, and torch keeps no cache: every call site is analysed anew. A compiled
decode step of SmolLM2 has 120 kernel calls (30 layers × 4), all of them one of four kernels at
one of four shapes; each analysis of our GEMV templates takes ~70 ms on the 2-core development
machine (the front end walks the whole source).

The answer depends only on what the TTIR is generated from: the kernel, its constexpr and scalar
arguments, and the dtypes of its tensor arguments (torch stands each tensor in by a 2-element
tensor of its dtype and each symbolic size by the constant 2). :func:`install` memoizes the
analysis on exactly that key for kernels built by :func:`codegen.template.build`; any other
kernel, or a call with TMA descriptors or an argument of another kind, goes to torch's analysis
unchanged, and every caller gets its own copy of the result. ``codegen.ops`` installs it when it
registers the operators; ``DECOMP_ANALYSIS_CACHE=0`` leaves torch's functions alone.
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Any

import torch

__all__ = ["ANALYSES", "install", "stats"]

#: The functions of ``torch._higher_order_ops.triton_kernel_wrap`` memoized (those this torch has).
ANALYSES = ("identify_accessed_tensors", "identify_mutated_tensors")

_STATS = {"hits": 0, "misses": 0}


def _ours(kernel) -> bool:
    from codegen.template import built_kernel_ids

    return id(kernel) in built_kernel_ids()


def _arg_key(value: Any):
    """What the TTIR depends on of one argument, or None where that is not known."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return (type(value).__name__, value)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym",)
    import sympy

    if isinstance(value, sympy.Expr):
        return ("sym",)
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype)
    get_dtype = getattr(value, "get_dtype", None)  # inductor's TensorBox / buffers
    if callable(get_dtype):
        return ("tensor", get_dtype())
    return None


def _key(kernel, kwargs, tma_descriptor_metadata) -> tuple | None:
    if tma_descriptor_metadata or not isinstance(kwargs, dict) or not _ours(kernel):
        return None
    parts = []
    for name in sorted(kwargs):
        part = _arg_key(kwargs[name])
        if part is None:
            return None
        parts.append((name, *part))
    return (id(kernel), tuple(parts))


def _memoized(original):
    cache: dict[tuple, tuple[Any, Any]] = {}

    @functools.wraps(original)
    def analysis(kernel, kwargs, tma_descriptor_metadata=None, *args, **kw):
        key = None if args or kw else _key(kernel, kwargs, tma_descriptor_metadata)
        if key is None:
            return original(kernel, kwargs, tma_descriptor_metadata, *args, **kw)
        hit = cache.get(key)
        if hit is None:
            _STATS["misses"] += 1
            # the kernel is kept with its result: its id cannot be reused while the entry lives
            hit = cache[key] = (kernel, original(kernel, kwargs, tma_descriptor_metadata))
        else:
            _STATS["hits"] += 1
        return copy.deepcopy(hit[1])

    analysis.decomp_original = original
    return analysis


def install() -> list[str]:
    """Memoize torch's kernel-access analyses for our kernels (idempotent); returns the names patched."""
    if os.environ.get("DECOMP_ANALYSIS_CACHE", "1") == "0":
        return []
    try:
        from torch._higher_order_ops import triton_kernel_wrap as wrap
    except ImportError:  # a torch without user-kernel support: nothing to speed up
        return []
    patched = []
    for name in ANALYSES:
        fn = getattr(wrap, name, None)
        if fn is None:
            continue
        if not hasattr(fn, "decomp_original"):
            setattr(wrap, name, _memoized(fn))
        patched.append(name)
    return patched


def stats() -> dict[str, int]:
    """Analyses answered from the memo (``hits``) and run by torch (``misses``) in this process."""
    return dict(_STATS)
