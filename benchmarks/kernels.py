"""Kernel correctness and speed, measured side by side in one run (the README's kernel numbers).

    python benchmarks/kernels.py            # CUDA: correctness of every kernel, then the benchmarks
    python benchmarks/kernels.py --check    # CUDA: correctness only (< 1 minute)
    python benchmarks/kernels.py --e2e      # also SmolLM2-shaped decode under torch.compile (needs transformers)

Needs only torch, triton and this repository (it puts the repository root on ``sys.path``; no
``pip install``). On a machine without CUDA it times the eager torch reference paths instead
(labelled so), so the table is never empty; those numbers say nothing about the kernels.

GPU timings: every speed row times both sides the same way, replayed from one CUDA graph with
cold operands: the graph calls the op on ``copies`` independent sets of weights (and inputs),
round robin, with enough copies that their bytes exceed twice the L2 cache, so every call reads
its operands from HBM as a decode step through a model's layers does, and no host launch
overhead is counted (a serving stack replays graphs too). The median over replays, per call.
The kernel's eager per-call time (``triton.testing.do_bench``, which flushes L2 and includes our
Python launch path) is printed beside it, for the record. The decode proxy is timed both eager
and as one CUDA graph per step. Every row names the card it ran on.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:  # passes' progress bars; a bare GPU image may lack tqdm (no network there to install it)
    import tqdm  # noqa: F401
except ImportError:
    stub = types.ModuleType("tqdm")
    stub.tqdm = lambda it=None, *a, **k: it
    stub.auto = types.ModuleType("tqdm.auto")
    stub.auto.tqdm = stub.tqdm
    sys.modules.update({"tqdm": stub, "tqdm.auto": stub.auto})

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the kernel_bench sections beside this file
from kernel_bench.checks import (
    check_blockdiag,
    check_dequant,
    check_int8_outlier,
    check_kronecker,
    check_lowrank,
    check_modules_and_compile,
    check_monarch,
)
from kernel_bench.common import BUDGET_S, FAILURES, START, _bench, _buffers, _format, _guard, _late, _packed, _print_row
from kernel_bench.decode import bench_decode_proxy, bench_e2e
from kernel_bench.speed import (
    GEMV_FORMATS,
    LANDSCAPE_FORMATS,
    bench_blockdiag,
    bench_dequant,
    bench_int8_outlier,
    bench_kronecker,
    bench_lowrank,
    bench_monarch,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="correctness only (CUDA)")
    parser.add_argument("--e2e", action="store_true", help="also SmolLM2-shaped end-to-end decode (needs transformers)")
    parser.add_argument("--budget-s", type=float, default=270.0, help="start no section or row past this many seconds")
    parser.add_argument("--sections", default="dequant,e2e,lowrank,monarch,blockdiag,kronecker,int8outlier,proxy",
                        help="speed sections to run, comma-separated, in this order (e2e also needs --e2e)")  # fmt: skip
    parser.add_argument("--checks", default="lowrank,dequant,monarch,blockdiag,kronecker,int8 outliers,modules",
                        help="correctness sections to run, comma-separated (a short GPU session checks what changed)")  # fmt: skip
    parser.add_argument("--e2e-rows", choices=("all", "compiled", "ours-compiled"), default="all",
                        help="compiled: no eager rows; ours-compiled: only the compiled int4 model (short GPU sessions)")  # fmt: skip
    parser.add_argument("--e2e-guard-filter", action="store_true",
                        help="both models also compiled with dynamo's nn-module guards skipped (host time per step)")  # fmt: skip
    parser.add_argument(
        "--e2e-host-profile",
        action="store_true",
        help="split the compiled rows' host time: dynamo and AOT wrappers vs the compiled graph",
    )
    parser.add_argument("--gemv-formats", default=",".join(GEMV_FORMATS), help="formats of the GEMV rows, comma-separated")
    parser.add_argument("--landscape-formats", default=",".join(LANDSCAPE_FORMATS),
                        help="formats of the every-GEMV-config table, comma-separated (empty: no table)")  # fmt: skip
    args = parser.parse_args(argv)
    GEMV_FORMATS[:] = args.gemv_formats.split(",")
    LANDSCAPE_FORMATS[:] = [f for f in args.landscape_formats.split(",") if f]
    BUDGET_S[0] = args.budget_s

    cuda = torch.cuda.is_available()
    import importlib.util

    has_triton = importlib.util.find_spec("triton") is not None
    card = torch.cuda.get_device_name() if cuda else "none (CPU)"
    print(f"device: {card}" + (f", capability {torch.cuda.get_device_capability()}" if cuda else ""))
    print(f"torch {torch.__version__}, triton {__import__('triton').__version__ if has_triton else 'not installed'}, "
          f"python {sys.version.split()[0]}", flush=True)  # fmt: skip

    if not cuda:
        print("\nNo CUDA device: the kernels do not run here. Timing the eager torch reference paths instead.\n")
        bench_cpu_references()
        return 0
    if not has_triton:
        print("triton is not installed: nothing to check")
        return 1

    os.environ["DECOMP_AUTOTUNE"] = "0"  # correctness needs one config each; tuning is for the timings
    print("\n## Correctness on CUDA (kernel vs eager torch, both against an fp64 evaluation)\n")
    blocks = ("int4g32",) if args.check else ("int4g32", "lowrank r64")
    for name, fn in (("lowrank", check_lowrank), ("dequant", check_dequant), ("monarch", check_monarch),
                     ("blockdiag", check_blockdiag), ("kronecker", check_kronecker), ("int8 outliers", check_int8_outlier),
                     ("modules + torch.compile", lambda d: check_modules_and_compile(d, blocks))):  # fmt: skip
        if name.split(" + ")[0] in args.checks.split(","):
            _guard(name, fn, "cuda")
    print(f"\ncorrectness: {len(FAILURES)} failure(s), {time.time() - START:.0f} s so far", flush=True)
    if args.check:
        return 1 if FAILURES else 0

    os.environ["DECOMP_AUTOTUNE"] = "1"
    print(f"\n## Speed on {card} (fp16; per call, replayed from CUDA graphs over cold operand copies)")
    # by default the end-to-end rows right after the GEMV tables: the product-level number, not to be cut by the budget
    sections = [("dequant", bench_dequant)]
    if args.e2e:
        sections.append(
            (
                "e2e",
                lambda d, t: bench_e2e(
                    d, rows=args.e2e_rows, host_profile=args.e2e_host_profile, guard_filter=args.e2e_guard_filter
                ),
            )
        )
    sections += [("lowrank", bench_lowrank), ("monarch", bench_monarch), ("blockdiag", bench_blockdiag),
                 ("kronecker", bench_kronecker), ("int8outlier", bench_int8_outlier),
                 ("proxy", lambda d, t: bench_decode_proxy(d, t, 30))]  # fmt: skip
    order = args.sections.split(",")  # run in the order given (a short session puts what matters first)
    for name, fn in sorted((s for s in sections if s[0] in order), key=lambda s: order.index(s[0])):
        if _late(name):
            continue
        _guard(name, fn, "cuda", torch.float16)
    print(f"\ntotal {time.time() - START:.0f} s on {card}; {len(FAILURES)} failure(s)")
    for f in FAILURES:
        print("  " + f[:300])
    return 1 if FAILURES else 0


def bench_cpu_references():
    """The reference paths' ratios on CPU (fp32), so the table is never empty."""
    from codegen.kernels import dequant as D
    from codegen.kernels import lowrank as LK
    from codegen.kernels import monarch as MK

    torch.manual_seed(0)
    print("| case | baseline | reference path | ratio |")
    print("| --- | --- | --- | --- |")
    m, d, r = 512, 1024, 128
    x, w = torch.randn(m, d), torch.randn(d, d)
    down, up = torch.randn(r, d), torch.randn(d, r)
    dense = _bench(lambda: F.linear(x, w))
    ours = _bench(lambda: LK.lowrank_linear_ref(x, down, up))
    _print_row(f"low-rank {m}×{d}→{d}, r={r}", f"dense {dense:.2f} ms", f"two matmuls {ours:.2f} ms", f"{dense / ours:.3g}×")
    n = k = 2048
    pw, _ = _packed(_format("int4g128"), n, k, torch.float32, "cpu")
    codes, constants, fmt = _buffers(pw)
    x1, w1 = torch.randn(1, k), torch.randn(n, k)
    dense = _bench(lambda: F.linear(x1, w1))
    ours = _bench(lambda: D.quant_linear_ref(x1, codes, constants, fmt, k))
    _print_row(
        f"int4 g128 batch 1, {n}×{k}", f"dense {dense:.2f} ms", f"dequantize + matmul {ours:.2f} ms", f"{dense / ours:.3g}×"
    )
    n, b = 4096, 64
    xm, wm = torch.randn(512, n), torch.randn(n, n)
    L, R = torch.randn(b, n // b, b), torch.randn(b, b, n // b)
    dense = _bench(lambda: F.linear(xm, wm))
    ours = _bench(lambda: MK.monarch_linear_ref(xm, L, R, n))
    _print_row(f"Monarch 512×{n}, b={b}", f"dense {dense:.2f} ms", f"two bmm + regroup {ours:.2f} ms", f"{dense / ours:.2f}×")
    from passes.blockdiag import blockdiag_forward

    blocks, perm = torch.randn(4, n // 4, n // 4), torch.randperm(n).int()
    ours = _bench(lambda: blockdiag_forward(xm, blocks, n, perm, perm))
    _print_row(f"block-diagonal 512×{n}, b=4, permuted", f"dense {dense:.2f} ms", f"gather + bmm + scatter {ours:.2f} ms",
               f"{dense / ours:.2f}×")  # fmt: skip
    bench_decode_proxy("cpu", torch.float32, 4)


if __name__ == "__main__":
    sys.exit(main())
