"""Kernel speed rows: fused low-rank, dequant GEMV/GEMM, Monarch, each beside its torch baseline."""

from __future__ import annotations

import functools
import math
import unittest.mock

import torch
import torch.nn.functional as F

from .common import _bench, _buffers, _cold, _format, _late, _nbytes, _one_config, _packed, _print_row, _row, _tuned_config

__all__ = ["GEMM_SHAPES", "GEMV_FORMATS", "GEMV_SHAPES", "LANDSCAPE_FORMATS", "LANDSCAPE_SHAPE", "LOWRANK_SHAPES",
           "MONARCH_LANDSCAPE", "MONARCH_ROWS", "MONARCH_SHAPES", "bench_dequant", "bench_lowrank", "bench_monarch"]  # fmt: skip

# The benchmarked shapes (module-level so a smoke test can shrink them).
# The benchmarked shapes (module-level so a smoke test can shrink them).
#: (M, in, out, rank): ranks ≤ d/8; the fused kernel keeps ranks up to 256 on chip (MAX_RANK).
LOWRANK_SHAPES = [(512, 4096, 4096, 256), (2048, 4096, 4096, 256), (4096, 4096, 4096, 128),
                  (512, 576, 1536, 72), (2048, 1536, 576, 72), (1, 4096, 4096, 256), (1, 576, 1536, 64)]  # fmt: skip
#: (out, in) of the batch-1 GEMVs; every format on the first, int4 on the rest.
GEMV_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (1536, 576)]
GEMV_FORMATS = ["int4g128", "int4g32", "int3g64", "int8", "nf4g64"]
#: (M, out, in) of the prefill GEMMs.
GEMM_SHAPES = [(512, 4096, 4096), (4096, 4096, 4096), (512, 1536, 576), (32, 1536, 576)]
#: (n, blocks) and row counts of the Monarch rows.
MONARCH_SHAPES = [(4096, 64), (8192, 64)]
MONARCH_ROWS = (1, 512, 4096)
#: Block-diagonal: (n, blocks) — a quarter and an eighth of the weight — at decode and prefill rows.
BLOCKDIAG_SHAPES = [(4096, 4), (4096, 8)]
BLOCKDIAG_ROWS = (1, 512, 4096)
#: Kronecker sums: (n, terms) with a √n × √n ⊗ √n × √n factorisation, at decode and prefill rows.
KRONECKER_SHAPES = [(4096, 1), (4096, 4)]
KRONECKER_ROWS = (1, 512, 4096)
#: LLM.int8(): (n, outlier columns) at decode and prefill rows.
INT8_OUTLIER_SHAPES = [(4096, 40)]
INT8_OUTLIER_ROWS = (1, 512, 4096)


def bench_lowrank(device, dtype):
    from codegen.kernels import lowrank as K

    print("\n### Fused low-rank vs two torch matmuls (fp16; CUDA graph, cold operands)\n")
    _print_row(
        "M × in → out, rank",
        "two matmuls",
        "fused kernel",
        "speedup",
        "target",
        "met",
        "dense F.linear",
        "kernel eager (do_bench)",
        "t = x·downᵀ alone (cuBLAS)",
    )
    _print_row(*["---"] * 9)
    for m, k, n, r in LOWRANK_SHAPES:
        if _late("low-rank"):
            break

        def operands(i, m=m, k=k, n=n, r=r):
            g = torch.Generator(device=device).manual_seed(i)
            x = torch.randn(m, k, device=device, dtype=dtype, generator=g)
            down = torch.randn(r, k, device=device, dtype=dtype, generator=g) / k**0.5
            up = torch.randn(n, r, device=device, dtype=dtype, generator=g) / r**0.5
            bias = torch.randn(n, device=device, dtype=dtype, generator=g)
            return x, down, up, bias

        def make(i, fn):
            x, down, up, bias = operands(i)
            return (lambda: fn(x, down, up, bias)), _nbytes(x, down, up, bias)

        def make_dense(i, m=m, k=k, n=n):
            x = torch.randn(m, k, device=device, dtype=dtype)
            w, bias = (torch.randn(n, k, device=device, dtype=dtype), torch.randn(n, device=device, dtype=dtype))
            return (lambda: F.linear(x, w, bias)), _nbytes(x, w, bias)

        base = _cold(functools.partial(make, fn=K.lowrank_linear_ref))  # F.linear(F.linear(x, down), up, bias)
        ours = _cold(functools.partial(make, fn=K.lowrank_linear))
        dense = _cold(make_dense)
        eager = _bench(K.lowrank_linear, *operands(0))
        # the first product on its own (cuBLAS): what the T_GIVEN path pays before its launch
        first = _cold(functools.partial(make, fn=lambda x, down, up, bias: F.linear(x, down)))
        target = 1.3 if (r <= k // 8 or r <= n // 8) and m >= 512 else None
        _row(f"{m} × {k} → {n}, r={r}", "", base, "", ours, target, f"{dense * 1e3:.1f} µs", f"{eager * 1e3:.1f} µs",
             f"{first * 1e3:.1f} µs")  # fmt: skip


def bench_dequant(device, dtype):
    from codegen.kernels import dequant as D

    def make_dense(i, m, n, k):
        x, w = (torch.randn(m, k, device=device, dtype=dtype), torch.randn(n, k, device=device, dtype=dtype))
        return (lambda: F.linear(x, w)), _nbytes(x, w)

    def make_quant(i, m, n, k, spec, **kw):
        pw, _ = _packed(_format(spec), n, k, dtype, device, seed=i)
        codes, constants, fmt = _buffers(pw)
        x = torch.randn(m, k, device=device, dtype=dtype)
        return (lambda: D.quant_linear(x, codes, constants, fmt, k, **kw)), _nbytes(x, codes, *constants)

    print("\n### Dequant-GEMV at batch 1 vs the fp16 dense matmul (CUDA graph, cold weights)\n")
    print(f"kernel: what quant_linear runs at 1 row (GEMV_MAX_M = {D.GEMV_MAX_M}: the CUDA-core GEMV); "
          "tensor-core path: the GEMM kernel at 1 row (BM = 16 tiles, decoded in fp16)\n")  # fmt: skip
    _print_row("out × in", "format", "fp16 F.linear", "kernel", "speedup", "target", "met", "weight bytes fp16/packed",
               "HBM GB/s (kernel)", "tuned config", "tensor-core path", "its speedup", "kernel eager (do_bench)")  # fmt: skip
    _print_row(*["---"] * 13)
    tc_wins = []  # int4 rows: the tensor-core path faster than the GEMV?
    for i, (n, k) in enumerate(GEMV_SHAPES):
        if _late("dequant GEMV"):
            break
        dense = _cold(functools.partial(make_dense, m=1, n=n, k=k))
        for spec in GEMV_FORMATS if i == 0 else GEMV_FORMATS[:2]:
            pw, _ = _packed(_format(spec), n, k, dtype, device)
            codes, constants, fmt = _buffers(pw)
            x = torch.randn(1, k, device=device, dtype=dtype)
            ours = _cold(functools.partial(make_quant, m=1, n=n, k=k, spec=spec))
            words = D._word_flags(D.QuantFormat.parse(fmt), x, codes)["WORDS"]
            tuned = _tuned_config(D.gemv_kernel(words=words, k_class=D.gemv_k_class(k)))
            gemv_max_m, D.GEMV_MAX_M = D.GEMV_MAX_M, 0  # read at launch, i.e. while the graphs are captured
            try:
                tc = _cold(functools.partial(make_quant, m=1, n=n, k=k, spec=spec))
            finally:
                D.GEMV_MAX_M = gemv_max_m
            eager = _bench(D.quant_linear, x, codes, constants, fmt, k)
            packed_bytes = _nbytes(*pw.buffers())
            ratio = dense / ours
            if spec.startswith("int4"):
                tc_wins.append(tc < ours)
            target = 2.5 if spec.startswith("int4") and n * k >= 4096 * 4096 else None
            met = "" if target is None else ("yes" if ratio >= target else "no")
            _print_row(f"{n} × {k}", fmt, f"{dense * 1e3:.1f} µs", f"{ours * 1e3:.1f} µs", f"{ratio:.2f}×",
                       f"≥ {target}×" if target else "—", met, f"{n * k * 2 / packed_bytes:.2f}×",
                       f"{packed_bytes / (ours * 1e-3) / 1e9:.0f}", tuned, f"{tc * 1e3:.1f} µs", f"{dense / tc:.2f}×",
                       f"{eager * 1e3:.1f} µs")  # fmt: skip
    if tc_wins and sum(tc_wins) * 2 > len(tc_wins):
        D.GEMV_MAX_M = 0
        print(f"\nthe tensor-core path was faster in {sum(tc_wins)}/{len(tc_wins)} int4 rows: the rest of this run "
              "(end to end included) decodes on it (GEMV_MAX_M = 0)")  # fmt: skip
    _gemv_landscape(device, dtype, make_dense, make_quant)
    print("\n### Dequant at prefill vs the fp16 dense matmul (CUDA graph, cold weights)\n")
    print(f"quant_linear: the GEMM kernel below {D.DEQUANT_FIRST_M} rows, from there the weight decoded once + cuBLAS; "
          "both timed at every row count\n")  # fmt: skip
    _print_row("M × in → out", "format", "fp16 F.linear", "quant_linear", "speedup", "GEMM kernel", "decode once + cuBLAS",
               "decode alone")  # fmt: skip
    _print_row(*["---"] * 8)
    for m, n, k in GEMM_SHAPES:
        if _late("dequant GEMM"):
            break
        dense = _cold(functools.partial(make_dense, m=m, n=n, k=k))
        times = []
        for first_m in (10**9, 0):  # the GEMM kernel; the decode-first path
            with unittest.mock.patch.object(D, "DEQUANT_FIRST_M", first_m):
                times.append(_cold(functools.partial(make_quant, m=m, n=n, k=k, spec="int4g128")))
        ours = times[m >= D.DEQUANT_FIRST_M]  # the path quant_linear takes at these rows

        def make_decode(i, n=n, k=k):
            pw, _ = _packed(_format("int4g128"), n, k, dtype, device, seed=i)
            codes, constants, fmt = _buffers(pw)
            return (lambda: D.dequantize(codes, constants, fmt, k, dtype)), _nbytes(codes, *constants)

        decode = _cold(make_decode)
        _print_row(f"{m} × {k} → {n}", "int4g128", f"{dense * 1e3:.1f} µs", f"{ours * 1e3:.1f} µs", f"{dense / ours:.2f}×",
                   *(f"{t * 1e3:.1f} µs = {dense / t:.2f}×" for t in times), f"{decode * 1e3:.1f} µs")  # fmt: skip


#: (out, in) and formats of the per-config GEMV table (every tuning config timed alone).
LANDSCAPE_SHAPE = (4096, 4096)
LANDSCAPE_FORMATS = ["int4g32", "int8"]


def _gemv_landscape(device, dtype, make_dense, make_quant):
    """Every GEMV tuning config timed alone (what the tuner chose among), so a run says which
    variant — tiles, loop stages, prefetched constants, conversion-free decode — moves the time;
    the int8 rows share the int4 rows' conversion count per code with twice the bytes."""
    from codegen.kernels import dequant as D

    n, k = LANDSCAPE_SHAPE
    configs = D.GEMV_CONFIGS if torch.cuda.is_available() else D.GEMV_CONFIGS[:2]
    print(f"\n### Dequant-GEMV tuning configs, each alone, 1 × {k} → {n} (CUDA graph, cold weights)\n")
    _print_row("format", "config", "kernel", "vs fp16 F.linear", "HBM GB/s", "max err vs fp64 (eager torch's)")
    _print_row(*["---"] * 6)
    dense = _cold(functools.partial(make_dense, m=1, n=n, k=k))
    built = D.gemv_kernel()
    saved = D._kernel
    try:
        for spec in LANDSCAPE_FORMATS:
            pw, _ = _packed(_format(spec), n, k, dtype, device)
            packed_bytes = _nbytes(*pw.buffers())
            codes, constants, fmt = _buffers(pw)
            x = torch.randn(1, k, device=device, dtype=dtype)
            truth = D.quant_linear_ref(x.double(), codes, constants, fmt, k)
            eager = (D.quant_linear_ref(x, codes, constants, fmt, k).double() - truth).abs().max().item()
            for config in configs:
                if _late("GEMV configs"):
                    return
                if config.get("HALF2") and not spec.startswith("int4"):
                    continue  # the plain loop there (HALF2 is int4's)
                one = _one_config(built, config)
                D._kernel = lambda builder, ep, *a, one=one: one if builder is D.gemv_kernel else saved(builder, ep, *a)
                ms = _cold(functools.partial(make_quant, m=1, n=n, k=k, spec=spec))
                err = (D.quant_linear(x, codes, constants, fmt, k).double() - truth).abs().max().item()
                label = " ".join(f"{key}{v}" for key, v in config.items() if key != "num_stages")
                _print_row(spec, label, f"{ms * 1e3:.1f} µs", f"{dense / ms:.2f}×", f"{packed_bytes / (ms * 1e-3) / 1e9:.0f}",
                           f"{err:.3g} ({eager:.3g})")  # fmt: skip
    finally:
        D._kernel = saved


def bench_monarch(device, dtype):
    from codegen.kernels import monarch as K

    print("\n### Monarch (one launch up to 4 rows, two stages beyond) vs dense (CUDA graph, cold operands)\n")
    _print_row(
        "M × n",
        "blocks, rank",
        "dense F.linear",
        "kernel",
        "speedup",
        "target",
        "met",
        "torch reference",
        "kernel eager (do_bench)",
        "stage 1 alone (two-stage rows)",
        "tuned stage 1 / stage 2",
        "floor: x copied once / twice",
    )
    _print_row(*["---"] * 12)
    for n, b in MONARCH_SHAPES:
        for m in MONARCH_ROWS:
            if _late("Monarch"):
                return

            def make_dense(i, m=m, n=n):
                x, w = (torch.randn(m, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype))
                return (lambda: F.linear(x, w)), _nbytes(x, w)

            def make(i, fn, m=m, n=n, b=b):
                x, L, R = _monarch_operands(i, m, n, b, device, dtype)
                return (lambda: fn(x, L, R, n)), _nbytes(x, L, R) + m * n * x.element_size()

            dense = _cold(make_dense)
            ours = _cold(functools.partial(make, fn=K.monarch_linear))
            ref = _cold(functools.partial(make, fn=K.monarch_linear_ref))
            eager = _bench(K.monarch_linear, *_monarch_operands(0, m, n, b, device, dtype), n)
            first, tuned, floor = "—", "—", "—"
            if m > K.GEMV_MAX_ROWS:  # where the time goes between the two stages (the rest is stage 2)
                first = f"{_cold(functools.partial(make, fn=lambda x, L, R, n: K.stage1(x, R))) * 1e3:.1f} µs"
                tuned = f"{_tuned_config(K.stage1_kernel())} / {_tuned_config(K.stage2_kernel())}"
                # what one and two launches cost that only move the activations (x → y, x → g → y;
                # each pass reads and writes m·n values, as each stage does)
                once = _cold(functools.partial(make, fn=lambda x, L, R, n: x.clone()))
                twice = _cold(functools.partial(make, fn=lambda x, L, R, n: x.clone().clone()))
                floor = f"{once * 1e3:.1f} / {twice * 1e3:.1f} µs"
            ratio = dense / ours
            _print_row(f"{m} × {n}", f"{b}, 1", f"{dense * 1e3:.1f} µs", f"{ours * 1e3:.1f} µs", f"{ratio:.2f}×", "≥ 3×",
                       "yes" if ratio >= 3 else "no", f"{ref * 1e3:.1f} µs", f"{eager * 1e3:.1f} µs", first, tuned, floor)  # fmt: skip
    for shape in MONARCH_LANDSCAPE:
        _monarch_landscape(device, dtype, *shape)


def _monarch_operands(i, m, n, b, device, dtype):
    """Copy ``i`` of a Monarch row's operands: ``x (m, n)``, ``L``, ``R`` with ``b`` square blocks."""
    p = n // b
    g = torch.Generator(device=device).manual_seed(i)
    x = torch.randn(m, n, device=device, dtype=dtype, generator=g)
    L = torch.randn(b, p, b, device=device, dtype=dtype, generator=g) / b**0.5
    R = torch.randn(b, b, p, device=device, dtype=dtype, generator=g) / p**0.5
    return x, L, R


#: (rows, n, blocks) of the per-config Monarch tables: the two-stage rows at n = 4096.
MONARCH_LANDSCAPE = [(512, 4096, 64), (4096, 4096, 64)]


def _monarch_landscape(device, dtype, m, n, b):
    """Every stage-1 config (stage 1 alone) and every stage-2 config (both stages, stage 1 tuned)
    timed alone at one shape: which tile moves the time."""
    from codegen.kernels import monarch as K

    print(f"\n### Monarch tuning configs, each alone, {m} × {n}, {b} blocks (CUDA graph, cold operands)\n")
    _print_row("kernel timed", "config", "time", "HBM GB/s (each of x, g, y moved once)")
    _print_row(*["---"] * 4)
    tensor = m * n * torch.tensor([], dtype=dtype).element_size()

    def make(i, fn):
        x, L, R = _monarch_operands(i, m, n, b, device, dtype)
        return (lambda: fn(x, L, R)), _nbytes(x, L, R) + m * n * x.element_size()

    def label(config):
        return " ".join(f"{k}{v}".replace("num_warps", "w") for k, v in config.items() if k != "num_stages")

    cases = [("stage 1", "stage1_kernel", K.STAGE1_CONFIGS, lambda x, L, R: K.stage1(x, R), 2),
             ("both stages", "stage2_kernel", K.STAGE2_CONFIGS, lambda x, L, R: K.monarch_linear(x, L, R, n), 4)]  # fmt: skip
    for timed, builder, configs, fn, moved in cases:
        built = getattr(K, builder)()
        for config in configs if torch.cuda.is_available() else configs[:1]:
            if _late("Monarch configs"):
                return
            single = _one_config(built, config)
            with unittest.mock.patch.object(K, builder, lambda *ep, s=single: s):
                t = _cold(functools.partial(make, fn=fn))
            _print_row(timed, label(config), f"{t * 1e3:.1f} µs", f"{moved * tensor / (t * 1e-3) / 1e9:.0f}")


def _kernel_vs_torch_path(device, dtype, title, param, torch_path, shapes, rows, make_module, kernel, variant=None):
    """One table: per ``(n, param)`` of ``shapes`` and row count, dense ``F.linear`` against the
    rewritten module ``make_module(n, param)`` with its kernel and with its own torch code.
    ``variant``: ``(column, applies(m), setting())``, the kernel timed again under a context manager
    ``setting()`` for the row counts ``applies`` accepts (e.g. a path the wrapper does not choose)."""
    from codegen import dispatch

    print(f"\n### {title} vs dense and vs the torch path (CUDA graph, cold operands)\n")
    extra = [variant[0]] if variant else []
    _print_row("M × n", param, "dense F.linear", "kernel", "vs dense", f"torch path ({torch_path})", "vs torch path", "tuned",
               *extra)  # fmt: skip
    _print_row(*["---"] * (8 + len(extra)))
    for n, value in shapes:
        for m in rows:
            if _late(title.split(" (")[0]):
                return

            def make_dense(i, m=m, n=n):
                x, w = (torch.randn(m, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype))
                return (lambda: F.linear(x, w)), _nbytes(x, w)

            def make(i, on, m=m, n=n, value=value):
                module = make_module(n, value).to(device=device, dtype=dtype)
                x = torch.randn(m, n, device=device, dtype=dtype)

                def run():
                    with torch.no_grad(), dispatch.force_kernels(on):
                        return module(x)

                return run, _nbytes(x, *module.parameters(), *module.buffers()) + m * n * x.element_size()

            dense = _cold(make_dense)
            ours = _cold(functools.partial(make, on=True))
            ref = _cold(functools.partial(make, on=False))
            tuned = _tuned_config(kernel())
            cells = []
            if variant and variant[1](m):
                with variant[2]():
                    other = _cold(functools.partial(make, on=True))
                cells = [f"{other * 1e3:.1f} µs = {dense / other:.2f}× dense ({_tuned_config(kernel())})"]
            elif variant:
                cells = ["—"]
            _print_row(f"{m} × {n}", value, f"{dense * 1e3:.1f} µs", f"{ours * 1e3:.1f} µs", f"{dense / ours:.2f}×",
                       f"{ref * 1e3:.1f} µs", f"{ref / ours:.2f}×", tuned, *cells)  # fmt: skip


def bench_blockdiag(device, dtype):
    from torch import nn

    from codegen.kernels import blockdiag as K
    from passes.blockdiag import BlockDiagLinear

    def module(n, b):
        p = n // b
        perm = (torch.randperm(n).int() for _ in range(2))
        return BlockDiagLinear(nn.Parameter(torch.randn(b, p, p) / p**0.5), None, n, n, *perm)

    # past KERNEL_MAX_M rows the operator takes the torch path: the kernel timed there anyway (input gathered first)
    kernel_anyway = (f"kernel past {K.KERNEL_MAX_M} rows (input gathered first)", lambda m: m > K.KERNEL_MAX_M,
                     lambda: unittest.mock.patch.object(K, "KERNEL_MAX_M", 10**9))  # fmt: skip
    _kernel_vs_torch_path(device, dtype, f"Block-diagonal, permuted (permutations fused; the kernel up to {K.KERNEL_MAX_M} "
                          "rows)", "blocks", "gather, bmm, scatter", BLOCKDIAG_SHAPES, BLOCKDIAG_ROWS, module, K.kernel,
                          kernel_anyway)  # fmt: skip


def bench_int8_outlier(device, dtype):
    from codegen.kernels import int8_outlier as K
    from passes.int8_outlier import Int8OutlierConfig, Int8OutlierLinear, Int8OutlierWeight

    config = Int8OutlierConfig()

    def module(n, n_out):
        buffers = config.encode(torch.randn(n, n) / 64, torch.randperm(n)[:n_out])
        return Int8OutlierLinear(Int8OutlierWeight(config, (n, n), torch.float32, buffers), None)

    _kernel_vs_torch_path(device, dtype, "LLM.int8() (activations quantized once, then an int8 GEMM with the outlier columns)",
                          "outliers", "_int_mm + elementwise", INT8_OUTLIER_SHAPES, INT8_OUTLIER_ROWS, module, K.kernel)  # fmt: skip


def bench_kronecker(device, dtype):
    from torch import nn

    from codegen.kernels import kronecker as K
    from passes.kronecker import KroneckerLinear

    def module(n, r):
        side = math.isqrt(n)
        A, B = (nn.Parameter(torch.randn(r, side, side) / side) for _ in range(2))
        return KroneckerLinear(A, B, None, n, n)

    _kernel_vs_torch_path(device, dtype, "Kronecker sums (both products on chip, one launch)", "terms", "2 matmuls + permutes",
                          KRONECKER_SHAPES, KRONECKER_ROWS, module, K.kernel)  # fmt: skip
