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

Three paths:

- GEMV (``M ≤`` :data:`GEMV_MAX_M`, batch-1 decode): a program owns ``BN`` output rows of
  one input row, accumulates per-group sums ``Σ q·x`` over K and applies each group's scale and
  minimum once; no tensor cores. int4 on fp16 (:func:`gemv_configs`, ``WORDS``) runs the ``HALF2``
  loop: a 32-bit word of codes decoded two at a time into fp16 pairs and multiplied with one
  ``fma.f16x2`` (inline PTX), ~2.4 instructions per code against ~6.4 for the fp32 loop — on the
  H100 (run 8b) 2.56–3.04× the fp16 GEMV at 4096-wide shapes, up from 1.77–2.05× (run 7), with
  its error vs the fp64 truth 1.2× eager torch's. Other formats and dtypes: the fp32 loop.
- GEMM (prefill): ``BM × BN`` tiles, the ``BN × BK`` weight tile decoded in the input dtype
  (:func:`_code_values`: no conversion instructions) and fed to ``tl.dot`` (the dequantized tile
  never leaves the chip). At batch 1 its BM = 16 tiles lost to the GEMV on the H100 (run 6:
  11.9 vs 9.6 µs at 4096², 63 vs 20 µs at 4096 × 11008).
- From :data:`DEQUANT_FIRST_M` rows: the weight decoded once (:func:`dequantize`, one kernel)
  and multiplied by cuBLAS — the GEMM decodes each weight tile once per row block (run 8b at
  512 × 4096 → 4096: GEMM 63.4 µs, decode + cuBLAS 50.8, dense 25.4; at 4096 rows 469 / 289 / 182).

The low-rank term: ``t = x·downᵀ`` (``M × r``, small) is one torch matmul before the launch;
the kernel adds ``t·upᵀ`` to its accumulator, so the ``M × out`` low-rank output and the add
never go through global memory.

``BK`` (128 or 256) is a multiple of every group size: a tile's constants are a
``BN × BK/group`` block, broadcast over the group's columns.

The Triton source (templates, ``@triton.jit`` helpers) is in :mod:`codegen.kernels.dequant_source`,
the tuning spaces in :mod:`codegen.kernels.dequant_tuning`; this module parses formats, builds and
launches.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from codegen.kernels.common import (
    UNUSED,
    KernelError,
    aux_rows,
    check_float,
    dot_flags,
    next_pow2,
    parse_epilogue,
    reference_epilogue,
    rows_of,
)
from codegen.kernels.dequant_source import (
    CONSTANT_BLOCK,
    DEQUANT_TEMPLATE,
    GEMM_TEMPLATE,
    GEMV_GROUP_TEMPLATE,
    GEMV_TEMPLATE,
    NF4_VALUES,
)
from codegen.kernels.dequant_tuning import DEQUANT_CONFIGS, GEMM_CONFIGS, GEMV_CONFIGS
from codegen.template import NO_EPILOGUE, Epilogue, build, interpreting, shape_class

__all__ = [
    "CONSTANT_BLOCK",
    "DEQUANT_FIRST_M",
    "GEMM_CONFIGS",
    "GEMV_CONFIGS",
    "GEMV_MAX_M",
    "GEMV_RELATIVE_RATE",
    "MAX_RANK",
    "NF4_VALUES",
    "QuantFormat",
    "dequant_kernel",
    "dequantize",
    "dequantize_ref",
    "gemm_kernel",
    "gemv_configs",
    "gemv_group_kernel",
    "gemv_k_class",
    "gemv_kernel",
    "gemv_relative_rate",
    "quant_linear",
    "quant_linear_group",
    "quant_linear_group_ref",
    "quant_linear_ref",
    "rms_norm_ref",
    "supports",
]

#: Row counts up to this take the GEMV path.
GEMV_MAX_M = 4

#: Largest padded rank of the fused low-rank term.
MAX_RANK = 256

#: From this many rows on (prefill), the weight is decoded once to a dense matrix
#: (:func:`dequantize`) and multiplied by cuBLAS, instead of the GEMM kernel decoding every weight
#: tile once per row block (``M / BM`` times). H100, run 8b, int4 g128: at 512 × 4096 → 4096 the
#: decode takes 15.2 µs and decode + cuBLAS 50.8 against the GEMM's 63.4 (dense fp16 25.4); at 4096
#: rows 289 against 469 (dense 182). At 512 × 576 → 1536 the GEMM won, 8.4 against 13.2 µs — of
#: which ~6 µs were an fp32 round trip of the output since removed (``reference_epilogue`` with no
#: epilogue); not re-measured. Read at call time.
DEQUANT_FIRST_M = 512


def supports(down: torch.Tensor | None) -> bool:
    """Whether the kernel takes this LQ low-rank term (none, or a padded rank ≤ :data:`MAX_RANK`)."""
    return down is None or next_pow2(max(16, down.shape[0])) <= MAX_RANK


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


#: The tuned GEMV's HBM rate relative to fp16 ``F.linear``'s at 1 × 4096 → 4096 on an H100 (both
#: replayed from CUDA graphs with cold weights): the speedup over fp16 divided by the byte ratio, in
#: the latest of ``benchmarks/results/kernels_h100_run*.txt`` that measured each format (int4 g32
#: and g128: run 9, the HALF2 loop, 2.82× / 3.20 and 2.70× / 3.76 — run 8b had int4 g32 at 2.62×,
#: run 6 int4 g128 before HALF2 at 0.45; the others run 5 — int3 g64 with run 5's tuning space,
#: which run 4's tiles beat: 0.30 then). The cost model divides a quantized layer's decode bytes by it on
#: GPU profiles (int3 g64 at 0.19: slower than fp16 despite 4.6× fewer bytes, as measured).
#: A test reads these off the result files. :func:`gemv_relative_rate` for unmeasured formats.
GEMV_RELATIVE_RATE = {"int8": 0.90, "int4g32": 0.88, "int4g128": 0.72, "int3g64": 0.19, "nf4g64": 0.42}


def gemv_relative_rate(fmt: QuantFormat) -> float:
    """:data:`GEMV_RELATIVE_RATE` of ``fmt``'s codes and group size (double quantization aside);
    unmeasured: the lowest measured rate of the same code width and kind, else the lowest of all."""
    base = fmt.spec.removesuffix("dq")
    if base in GEMV_RELATIVE_RATE:
        return GEMV_RELATIVE_RATE[base]
    same = [
        v
        for k, v in GEMV_RELATIVE_RATE.items()
        if QuantFormat.parse(k).kind == fmt.kind and QuantFormat.parse(k).bits == fmt.bits
    ]
    return min(same or GEMV_RELATIVE_RATE.values())


_KEY = ("M_CLASS", "N", "K", "R")


def gemv_configs(words: bool, k_class: int | None = None) -> tuple[dict, ...]:
    """The GEMV tuning configs for launches with ``WORDS`` true (int4 on fp16: the ``HALF2`` loop,
    which beat every plain-loop config on an H100, run 8) or false (the plain loop); with
    ``k_class`` (:func:`gemv_k_class` of the row width), without the configs whose ``BK`` exceeds it
    — their columns past the row are masked work, and at 576 columns the tuner picked a ``BK`` 2048
    config 0.5 µs slower than its ``BK`` 1024 pick of another run (H100, runs 8 and 8b)."""
    configs = tuple(c for c in GEMV_CONFIGS if c["HALF2"] == words)
    if k_class is None:
        return configs
    fit = tuple(c for c in configs if c["BK"] <= k_class)
    smallest = min(c["BK"] for c in configs)
    return fit or tuple(c for c in configs if c["BK"] == smallest)


_WIDEST_BK = max(c["BK"] for c in GEMV_CONFIGS)


def gemv_k_class(cols: int) -> int:
    """The row width's power-of-two class for :func:`gemv_configs` (capped at the largest ``BK``)."""
    return min(next_pow2(max(cols, 1)), _WIDEST_BK)


def gemv_kernel(epilogue: Epilogue = NO_EPILOGUE, words: bool = False, k_class: int | None = None):
    """The built GEMV kernel for ``epilogue`` (cached; ``.source`` is the generated code), tuning
    over :func:`gemv_configs` of ``words`` and ``k_class``."""
    return build(GEMV_TEMPLATE, "_dequant_gemv_kernel", epilogue, gemv_configs(words, k_class), _KEY, __name__)


def gemv_group_kernel(epilogue: Epilogue = NO_EPILOGUE, words: bool = False, k_class: int | None = None):
    """The built grouped GEMV kernel (two or three weights on one input; cached)."""
    return build(
        GEMV_GROUP_TEMPLATE, "_dequant_gemv_group_kernel", epilogue, gemv_configs(words, k_class),
        ("M_CLASS", "N0", "N1", "K"), __name__,
    )  # fmt: skip


def gemm_kernel(epilogue: Epilogue = NO_EPILOGUE):
    """The built GEMM kernel for ``epilogue`` (cached)."""
    return build(GEMM_TEMPLATE, "_dequant_gemm_kernel", epilogue, GEMM_CONFIGS, _KEY, __name__)


def dequant_kernel():
    """The built weight-decoding kernel (cached)."""
    return build(DEQUANT_TEMPLATE, "_dequant_weight_kernel", NO_EPILOGUE, DEQUANT_CONFIGS, ("N", "K"), __name__)


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
    return _dense_linear(x, dequantize_ref(codes, constants, fmt, cols).to(x.dtype), bias, down, up, epilogue, aux)


def _dense_linear(x, w, bias, down, up, epilogue: str, aux) -> torch.Tensor:
    """``epilogue(x·wᵀ [+ (x·downᵀ)·upᵀ] + bias)`` in torch, with the dense weight ``w`` in x's dtype:
    the reference's arithmetic, and the prefill path's once the weight is decoded."""
    y = F.linear(x, w, bias)
    if down is not None:
        y = y + F.linear(F.linear(x, down), up)
    return reference_epilogue(y, epilogue, aux)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Llama's RMSNorm (``LlamaRMSNorm.forward``): ``weight · (x/rms(x))`` with the normalised
    row rounded to x's dtype before the weight multiplies it."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def quant_linear_group_ref(
    x, codes, constants, fmt: str, cols: int, pair: bool, epilogue: str = "", aux=(), norm_weight=None, eps: float = 0.0,
    biases=None,
) -> list[torch.Tensor]:  # fmt: skip
    """The semantics of :func:`quant_linear_group`: ``[ep(silu(x·W₀ᵀ)·(x·W₁ᵀ))]`` (``pair``; the
    products rounded to x's dtype, as separate linears are) or ``[x·Wᵢᵀ (+ bᵢ) for each weight]``;
    with ``norm_weight``, x is first :func:`rms_norm_ref`'s output."""
    if norm_weight is not None:
        x = rms_norm_ref(x, norm_weight, eps)
    if not pair:
        biases = list(biases) if biases else [None] * len(codes)
        return [quant_linear_ref(x, c, k, fmt, cols, b) for c, k, b in zip(codes, constants, biases)]
    gate, up = (quant_linear_ref(x, c, k, fmt, cols).float() for c, k in zip(codes, constants))
    return [Epilogue.parse(epilogue).apply_ref(F.silu(gate) * up, aux).to(x.dtype)]


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
    """Launch the dequant GEMV (``M ≤ GEMV_MAX_M``) or GEMM kernel; from ``DEQUANT_FIRST_M`` rows,
    decode the weight once and multiply with torch (cuBLAS on CUDA).

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
    if m >= DEQUANT_FIRST_M:  # prefill: decode the weight once, then cuBLAS (what quant_linear_ref computes)
        w = _dequantize(f, codes, constants, cols, n_groups, x.dtype, None if eager else wrap)
        return _dense_linear(x2, w, bias, down, up, epilogue, auxs).view(out_shape)
    t = F.linear(x2, down).contiguous() if down is not None else UNUSED
    c = _constant_slots(f, constants)
    row_bytes = codes.shape[1]
    args = (
        x2, codes if codes.is_contiguous() else codes.contiguous(), *c, bias, t, up.contiguous() if up is not None else UNUSED,
        out, *auxs,
        m, n, cols, r, row_bytes, n_groups, x2.stride(0), shape_class(m),
    )  # fmt: skip
    meta = dict(
        KIND=f.kind, BITS=f.bits, GROUP=max(f.group, 1), DQ=f.dq, HAS_BIAS=bias is not None,
        HAS_LR=down is not None, R_PAD=next_pow2(max(16, r)), **dot_flags(x.dtype),
    )  # fmt: skip
    if m <= GEMV_MAX_M:
        meta |= _word_flags(f, x2, codes)
        kernel = _kernel(gemv_kernel, ep, meta["WORDS"], gemv_k_class(cols))
        grid = lambda meta: (-(-n // meta["BN"]), m)
    else:
        kernel = _kernel(gemm_kernel, ep)
        grid = lambda meta: (-(-m // meta["BM"]), -(-n // meta["BN"]))
    # a direct launch in eager mode (wrap_triton only matters while tracing)
    kernel.launch(grid, *args, wrap=None if eager else wrap, **meta)
    return out.view(out_shape)


def quant_linear_group(
    x, codes, constants, fmt: str, cols: int, pair: bool, epilogue: str = "", aux=(), norm_weight=None, eps: float = 0.0,
    biases=None, *, wrap=None,
) -> list[torch.Tensor]:  # fmt: skip
    """Two or three quantized linears of one format on the same input, as one GEMV launch.

    ``pair`` (two weights of the same shape, SwiGLU's gate and up): ``[ep(silu(x·W₀ᵀ)·(x·W₁ᵀ))]``,
    up's output never stored. Otherwise ``[x·W₀ᵀ, x·W₁ᵀ(, x·W₂ᵀ)]`` (decode's q/k/v projections),
    each output its own contiguous tensor, as the separate linears would return it. Beyond
    :data:`GEMV_MAX_M` rows (prefill) the weights run as separate GEMM launches with the same
    results (the pair as up, then gate with the SwiGLU epilogue).

    Args:
        x: ``(..., cols)`` activations.
        codes, constants: per weight, the ``PackedWeight`` buffers (as :func:`quant_linear` takes them).
        fmt, cols: the format all weights share and their (unpadded) input size.
        pair: SwiGLU pair instead of separate outputs.
        epilogue, aux: the pair's epilogue after the product (the separate outputs take none).
        norm_weight, eps: an RMSNorm on the way in (:func:`rms_norm_ref`, HF Llama's): the
            weights multiply ``norm_weight · x/rms(x)``, computed in the kernel and never stored.
        biases: one bias per weight (Qwen2's q/k/v), or None/empty; not for a pair.
        wrap: ``torch.library.wrap_triton`` inside a ``triton_op``.
    """
    f = QuantFormat.parse(fmt)
    codes, constants = list(codes), [list(c) for c in constants]
    if len(codes) not in (2, 3) or len(constants) != len(codes):
        raise KernelError(f"a group is 2 or 3 weights with a constants list each, got {len(codes)} and {len(constants)}")
    groups = {_check_buffers(f, c, k, cols) for c, k in zip(codes, constants)}
    sizes = [c.shape[0] for c in codes]
    if len({c.shape[1] for c in codes}) != 1 or len(groups) != 1:
        raise KernelError(f"the weights of a group must store the same row layout ({fmt}, {cols} columns)")
    if pair and (len(codes) != 2 or sizes[0] != sizes[1]):
        raise KernelError(f"a SwiGLU pair is two weights with the same number of rows, got rows {sizes}")
    ep = parse_epilogue(epilogue)
    if ep.steps and not pair:
        raise KernelError("only a SwiGLU pair takes an epilogue; fuse the separate outputs' tails one by one")
    biases = list(biases) if biases else []
    if biases and (pair or len(biases) != len(codes)):
        raise KernelError(f"biases go one per weight of a group that is not a pair; got {len(biases)} for {len(codes)} weights")
    check_float("x", x)
    if norm_weight is not None:
        check_float("norm_weight", norm_weight, x.dtype, x.device)
        if tuple(norm_weight.shape) != (cols,):
            raise KernelError(f"the norm weight must be ({cols},), got {tuple(norm_weight.shape)}")
    x2 = rows_of(x, cols)
    m = x2.shape[0]
    for i, b in enumerate(biases):
        check_float(f"biases[{i}]", b, x.dtype, x.device)
        if tuple(b.shape) != (sizes[i],):
            raise KernelError(f"biases[{i}] must be ({sizes[i]},), got {tuple(b.shape)}")
    if m > GEMV_MAX_M:  # prefill: separate GEMMs, same results
        if norm_weight is not None:
            x = rms_norm_ref(x, norm_weight, eps)
        if pair:
            up = quant_linear(x, codes[1], constants[1], fmt, cols, wrap=wrap)
            steps = ",".join(("silu", "mul", *ep.steps))
            return [quant_linear(x, codes[0], constants[0], fmt, cols, epilogue=steps, aux=[up, *aux], wrap=wrap)]
        return [
            quant_linear(x, c, k, fmt, cols, b, wrap=wrap) for c, k, b in zip(codes, constants, biases or [None] * len(codes))
        ]
    eager = type(x) is torch.Tensor
    out_sizes = sizes[:1] if pair else sizes  # the pair stores one output
    outs = [torch.empty((m, s), dtype=x.dtype, device=x.device) for s in out_sizes]
    auxs = aux_rows(aux, ep, (*x.shape[:-1], sizes[0]), x.device, m, sizes[0])
    if m > 0:
        weights = []
        for c, k in zip(codes, constants):
            weights += [c if c.is_contiguous() else c.contiguous(), *_constant_slots(f, k)]
        weights += [UNUSED] * (15 - len(weights))
        out_slots = outs + [UNUSED] * (3 - len(outs))
        nw = norm_weight.contiguous() if norm_weight is not None else UNUSED
        bias_slots = [b.contiguous() for b in biases] + [UNUSED] * (3 - len(biases))
        args = (x2, *weights, *bias_slots, nw, *out_slots, *auxs, m, *sizes, *[0] * (3 - len(sizes)), cols,
                codes[0].shape[1], groups.pop(), x2.stride(0), float(eps), shape_class(m))  # fmt: skip
        meta = {"KIND": f.kind, "BITS": f.bits, "GROUP": max(f.group, 1), "DQ": f.dq, "HAS_BIAS": bool(biases), "W": len(codes),
                "PAIR": pair, "NORM": norm_weight is not None, **_word_flags(f, x2, *codes)}  # fmt: skip
        grid = lambda meta: (sum(-(-s // meta["BN"]) for s in out_sizes), m)
        _kernel(gemv_group_kernel, ep, meta["WORDS"], gemv_k_class(cols)).launch(
            grid, *args, wrap=None if eager else wrap, **meta
        )
    return [o.view(*x.shape[:-1], o.shape[1]) for o in outs]


def dequantize(codes, constants, fmt: str, cols: int, dtype: torch.dtype, *, wrap=None) -> torch.Tensor:
    """The ``(out, cols)`` weight in ``dtype``, decoded from the stored buffers by one kernel:
    ``dequantize_ref(...)`` (fp32) rounded once to ``dtype``."""
    f = QuantFormat.parse(fmt)
    n_groups = _check_buffers(f, codes, constants, cols)
    return _dequantize(f, codes, constants, cols, n_groups, dtype, wrap)


def _dequantize(f: QuantFormat, codes, constants, cols: int, n_groups: int, dtype: torch.dtype, wrap) -> torch.Tensor:
    n = codes.shape[0]
    w = torch.empty((n, cols), dtype=dtype, device=codes.device)
    if n == 0 or cols == 0:
        return w
    dequant_kernel().launch(
        lambda meta: (-(-n // meta["BN"]), -(-cols // meta["BK"])),
        codes if codes.is_contiguous() else codes.contiguous(), *_constant_slots(f, constants), w,
        n, cols, codes.shape[1], n_groups, KIND=f.kind, BITS=f.bits, GROUP=max(f.group, 1), DQ=f.dq, wrap=wrap,
    )  # fmt: skip
    return w


def _word_flags(f: QuantFormat, x, *codes) -> dict:
    """The GEMV's ``HALF2`` loop's preconditions. ``WORDS``: fp16 rows ``x`` (2-D) of a width that is
    a multiple of 8 with an even stride and offset (read as fp16 pairs), int4 group codes whose rows
    start 4-byte aligned (read as 32-bit words), and not a ROCm build (the loop's inline asm is PTX).
    ``ASM``: compiled for a GPU (the interpreter runs no PTX: it takes the same arithmetic in Triton
    ops). Without ``WORDS`` the plain loop runs. (Storage offsets, not ``data_ptr``: traced fake
    tensors have none; torch allocates storages aligned.)"""
    words = (
        f.kind == 0
        and f.bits == 4
        and x.dtype == torch.float16
        and x.shape[1] % 8 == 0
        and x.stride(0) % 2 == 0
        and x.storage_offset() % 2 == 0
        and all(c.shape[1] % 4 == 0 and c.storage_offset() % 4 == 0 for c in codes)
        and torch.version.hip is None
    )
    return {"WORDS": words, "ASM": not interpreting()}


def _constant_slots(f: QuantFormat, constants) -> list:
    """The four constant pointer slots of a kernel argument list: (values or codes, blocks) per
    constant; :data:`~codegen.kernels.common.UNUSED` in the slots a format does not use."""
    consts = [c if c.is_contiguous() else c.contiguous() for c in constants]
    slots = consts if f.dq else [p for v in consts for p in (v, UNUSED)]
    return slots + [UNUSED] * (4 - len(slots))


_KERNELS: dict[tuple, object] = {}


def _kernel(builder, ep: Epilogue, *args):
    """``builder(ep, *args)`` (:func:`gemv_kernel`, :func:`gemm_kernel` or :func:`gemv_group_kernel`;
    ``args``: the GEMV's ``words`` and ``k_class``), cached per (builder, epilogue, args, tuning switch): no rebuild
    lookups per launch."""
    key = (builder, ep, args, os.environ.get("DECOMP_AUTOTUNE", "1"))
    k = _KERNELS.get(key)
    if k is None:
        k = _KERNELS[key] = builder(ep, *args)
    return k
