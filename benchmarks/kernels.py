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
import contextlib
import functools
import logging
import os
import sys
import time
import traceback
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

FAILURES: list[str] = []
START = time.time()
BUDGET_S = [300.0]  # set by --budget-s: no new row starts past it

# The benchmarked shapes (module-level so a smoke test can shrink them).
#: (M, in, out, rank): ranks ≤ d/8; the fused kernel keeps ranks up to 256 on chip (MAX_RANK).
LOWRANK_SHAPES = [(512, 4096, 4096, 256), (2048, 4096, 4096, 256), (4096, 4096, 4096, 128),
                  (512, 576, 1536, 72), (2048, 1536, 576, 72), (1, 4096, 4096, 256), (1, 576, 1536, 64)]  # fmt: skip
#: (out, in) of the batch-1 GEMVs; every format on the first, int4 on the rest.
GEMV_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (1536, 576)]
GEMV_FORMATS = ["int4g128", "int4g32", "int3g64", "int8", "nf4g64"]
#: (M, out, in) of the prefill GEMMs.
GEMM_SHAPES = [(512, 4096, 4096), (512, 1536, 576)]
#: (n, blocks) and row counts of the Monarch rows.
MONARCH_SHAPES = [(4096, 64), (8192, 64)]
MONARCH_ROWS = (1, 512, 4096)
#: SmolLM2's projections per layer: name -> (out, in).
PROXY_SHAPES = {
    "q": (576, 576),
    "k": (192, 576),
    "v": (192, 576),
    "o": (576, 576),
    "gate": (1536, 576),
    "up": (1536, 576),
    "down": (576, 1536),
}


def _late(section: str) -> bool:
    """Past the time budget: say so (once per section) and stop starting rows."""
    if time.time() - START <= BUDGET_S[0]:
        return False
    print(f"(rest of {section} skipped: past the {BUDGET_S[0]:.0f} s budget)", flush=True)
    return True


def _print_row(*cells) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def _guard(name: str, fn, *args, **kwargs):
    """Run one case; a failure is printed and recorded, never fatal."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 — a benchmark reports every case
        FAILURES.append(f"{name}: {type(e).__name__}: {e}")
        print(f"ERROR {name}: {type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}", flush=True)
        traceback.print_exc(limit=3)
        return None


# ---- shared builders -------------------------------------------------------------------------


def _packed(config, out, inn, dtype, device, seed=0):
    from passes.quant_storage import PackedWeight

    w = torch.randn(out, inn, generator=torch.Generator().manual_seed(seed)) / inn**0.5
    return PackedWeight(config, (out, inn), dtype, config.encode(w)).to(device), w


def _format(spec: str):
    from passes.quant_storage import Int8Config, IntNConfig, NF4Config

    if spec == "int8":
        return Int8Config()
    dq = spec.endswith("dq")
    body = spec[:-2] if dq else spec
    bits, group = body[: -len(body.split("g")[-1]) - 1], int(body.split("g")[-1])
    if bits == "nf4":
        return NF4Config(group, dq)
    return IntNConfig(int(bits[3:]), group, dq)


def _buffers(pw):
    from codegen.kernels.dequant import QuantFormat

    f = QuantFormat.of(pw.config)
    return pw.codes, [getattr(pw, n) for n in f.constant_names()], f.spec


# ---- correctness (CUDA) ----------------------------------------------------------------------


def _verdict(name, out, ref, truth) -> None:
    out, ref_f, truth = out.float(), ref.float(), truth.float()
    eps = torch.finfo(ref.dtype).eps
    scale = truth.abs().max().clamp_min(1.0)
    err = (out - truth).abs().max().item()
    eager = (ref_f - truth).abs().max().item()
    bound = 2 * eager + 4 * eps * scale.item()
    ok = bool(torch.isfinite(out).all()) and err <= bound
    if not ok:
        FAILURES.append(f"{name}: error {err:.3g} > bound {bound:.3g}")
    print(f"{'PASS' if ok else 'FAIL'}  {name:58s} max|err| {err:.3g}  (eager torch {eager:.3g}, bound {bound:.3g})", flush=True)


def check_lowrank(device):
    from codegen.kernels import lowrank as K

    g = torch.Generator().manual_seed(0)
    shapes = ((1, 576, 64, 1536, ""), (37, 70, 5, 45, ""), (300, 576, 72, 1536, "silu,mul"))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for m, k, r, n, ep in shapes if dtype == torch.float16 else shapes[1:]:
            x, down, up, bias = (torch.randn(*s, generator=g) for s in ((m, k), (r, k), (n, r), (n,)))
            down, up = down / k**0.5, up / r**0.5
            aux = [torch.randn(m, n, generator=g)] if ep else []
            args = [t.to(device, dtype) for t in (x, down, up, bias)]
            auxd = [a.to(device, dtype) for a in aux]
            out = K.lowrank_linear(*args, ep, auxd)
            ref = K.lowrank_linear_ref(*args, ep, auxd)
            truth = K.lowrank_linear_ref(*[t.to(device, torch.float64) for t in (x, down, up, bias)], ep,
                                         [a.to(device, torch.float64) for a in aux])  # fmt: skip
            _verdict(f"lowrank {str(dtype)[6:]} {m}x{k}x{r}x{n} {ep or 'bias'}", out, ref, truth)


def check_dequant(device):
    from codegen.kernels import dequant as D

    g = torch.Generator().manual_seed(1)
    cases = [
        (f, torch.float16) for f in ("int8", "int4g32", "int4g128dq", "int3g64", "int2g128", "nf4g64", "nf4g32dq", "int3g32dq")
    ]
    cases += [("int4g32", torch.bfloat16), ("int4g32", torch.float32)]
    out_f, inn = 1536, 576 + 70  # ragged against every group size
    for spec, dtype in cases:
        pw, _ = _packed(_format(spec), out_f, inn, dtype, device)
        codes, constants, fmt = _buffers(pw)
        for m in (1, 3, 64) if spec == "int4g32" else (1, 64):
            x = torch.randn(m, inn, generator=g).to(device, dtype)
            bias = torch.randn(out_f, generator=g).to(device, dtype)
            out = D.quant_linear(x, codes, constants, fmt, inn, bias)
            ref = D.quant_linear_ref(x, codes, constants, fmt, inn, bias)
            truth = D.quant_linear_ref(x.double(), codes, constants, fmt, inn, bias.double())
            _verdict(f"dequant {fmt} {str(dtype)[6:]} m={m} ({'gemv' if m <= D.GEMV_MAX_M else 'gemm'})", out, ref, truth)
    # LQ: int3 + rank-16 term, SwiGLU epilogue
    pw, _ = _packed(_format("int3g64"), 576, 1536, torch.float16, device)
    codes, constants, fmt = _buffers(pw)
    for m in (1, 64):
        x, down, up, aux = (torch.randn(*s, generator=g) for s in ((m, 1536), (16, 1536), (576, 16), (m, 576)))
        x, down, up, aux = (t.to(device, torch.float16) for t in (x, down / 40, up / 4, aux))
        out = D.quant_linear(x, codes, constants, fmt, 1536, None, down, up, "silu,mul", [aux])
        ref = D.quant_linear_ref(x, codes, constants, fmt, 1536, None, down, up, "silu,mul", [aux])
        truth = D.quant_linear_ref(
            x.double(), codes, constants, fmt, 1536, None, down.double(), up.double(), "silu,mul", [aux.double()]
        )
        _verdict(f"dequant LQ int3g64+r16 fp16 m={m} silu,mul", out, ref, truth)


def check_monarch(device):
    from codegen.kernels import monarch as K

    g = torch.Generator().manual_seed(2)
    shapes = [(1, 1024, 1024, 32, 1), (64, 70, 45, 4, 2)]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for m, inn, out, b, k in shapes + [(256, 4096, 4096, 64, 1)] if dtype == torch.float16 else shapes[1:]:
            p, s = -(-inn // b), -(-out // b)
            L, R = (torch.randn(b, s, b * k, generator=g) / (b * k) ** 0.5, torch.randn(b, k * b, p, generator=g) / p**0.5)
            x, bias = torch.randn(m, inn, generator=g), torch.randn(out, generator=g)
            args = [t.to(device, dtype) for t in (x, L, R)]
            y = K.monarch_linear(*args, out, bias.to(device, dtype))
            ref = K.monarch_linear_ref(*args, out, bias.to(device, dtype))
            truth = K.monarch_linear_ref(*[t.to(device, torch.float64) for t in (x, L, R)], out, bias.to(device, torch.float64))
            _verdict(f"monarch {str(dtype)[6:]} {m}x{inn}->{out} b={b} k={k}", y, ref, truth)


def _swiglu_block(d, hidden, device, dtype, rank=None, spec="int4g32"):
    """x + down(silu(gate(x)) * up(x)) with rewritten projections (low-rank when ``rank``, else quantized)."""
    from torch import nn

    from passes.lowrank import LowRankLinear
    from passes.quant_storage import QuantizedLinear

    def lowrank(o, i, seed):
        g = torch.Generator().manual_seed(seed)
        return LowRankLinear(nn.Parameter(torch.randn(rank, i, generator=g) / i**0.5),
                             nn.Parameter(torch.randn(o, rank, generator=g) / rank**0.5), None)  # fmt: skip

    def quant(o, i, seed):
        return QuantizedLinear(_packed(_format(spec), o, i, dtype, "cpu", seed)[0], None)

    make = lowrank if rank else quant

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down = (make(hidden, d, 1), make(hidden, d, 2), make(d, hidden, 3))

        def forward(self, x):
            return x + self.down(F.silu(self.gate(x)) * self.up(x))

    return Block().to(device=device, dtype=dtype).eval()


def _ensure_backend() -> None:
    """Register ``backend="decomp"`` when the package's entry point is absent (repo not pip-installed)."""
    from torch._dynamo.backends.registry import lookup_backend, register_backend

    try:
        lookup_backend("decomp")
    except Exception:  # noqa: BLE001 — InvalidBackend: no entry point in this environment
        from passes.backend import decomp_backend

        register_backend(compiler_fn=decomp_backend, name="decomp")


def check_modules_and_compile(device, blocks=("int4g32", "lowrank r64")):
    """The module hooks on CUDA, and torch.compile(backend="decomp") with epilogue fusion, vs eager torch."""
    import copy

    import codegen.fusion
    from codegen import dispatch

    x = torch.randn(4, 7, 576, device=device, dtype=torch.float16)
    for label in blocks:
        rank = 64 if label.startswith("lowrank") else None
        block = _swiglu_block(576, 1536, device, torch.float16, rank=rank)
        with torch.no_grad():
            with dispatch.force_kernels(False):
                eager = block(x)
                truth = copy.deepcopy(block).float()(x.float())  # packed codes stay; they dequantize to fp32
            calls = _count_op_calls()
            with calls:
                kernels = block(x)  # CUDA input: the modules call the kernels
            _verdict(f"modules {label} SwiGLU block (kernels)", kernels, eager, truth)
            print(f"      module hooks called the decomp ops {calls.n} time(s) (expected 3); "
                  f"use_kernels(x) = {dispatch.use_kernels(x)}", flush=True)  # fmt: skip
            if calls.n != 3:
                FAILURES.append(f"modules {label}: the hooks called the ops {calls.n} times, expected 3")
            reports, graphs = [], []
            real = codegen.fusion.fuse_epilogues

            def spy(gm, _r=real, graphs=graphs, reports=reports, **kw):
                graphs.append([f"{n.op}:{n.target}" for n in gm.graph.nodes if n.op.startswith("call")])
                reports.append(_r(gm, **kw))
                return reports[-1]

            codegen.fusion.fuse_epilogues = spy
            try:
                _ensure_backend()
                torch._dynamo.reset()
                t = time.time()
                compiled = torch.compile(block, backend="decomp")(x)
                seconds = time.time() - t
            finally:
                codegen.fusion.fuse_epilogues = real
            fused = reports[0] if reports else None
            _verdict(f"compile(backend='decomp') {label} block ({seconds:.0f} s compile)", compiled, eager, truth)
            print(f"      fusion: {fused}" if fused else "      fusion: did not run (no CUDA inputs?)", flush=True)
            if not fused or fused.kernels_removed != 3:
                FAILURES.append(f"compile {label}: expected 3 fused elementwise steps, got {fused}")
                for i, nodes in enumerate(graphs):  # what the backend saw, to see why nothing matched
                    print(f"      graph {i}: {nodes}"[:3000], flush=True)


class _count_op_calls:
    """Counts calls of ``dispatch.lowrank_linear``/``quant_linear``/``monarch_linear`` within the block."""

    def __enter__(self):
        from codegen import dispatch

        self.n, self.saved = 0, {}
        for name in ("lowrank_linear", "quant_linear", "monarch_linear"):
            real = self.saved[name] = getattr(dispatch, name)

            def counted(*a, _real=real, **k):
                self.n += 1
                return _real(*a, **k)

            setattr(dispatch, name, counted)
        return self

    def __exit__(self, *exc):
        from codegen import dispatch

        for name, real in self.saved.items():
            setattr(dispatch, name, real)
        return False


# ---- timing ----------------------------------------------------------------------------------


def _bench(fn, *args) -> float:
    """Median milliseconds per call of ``fn(*args)`` (GPU: do_bench with L2 flush; CPU: wall clock)."""
    if args:
        return _bench(lambda: fn(*args))
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[len(times) // 2]


def _bench_graph(fn, calls: int = 10, reps: int = 20) -> float:
    """Median milliseconds per call of ``fn`` replayed from one CUDA graph (no launch overhead)."""
    fn()
    return _graph_ms([fn], calls, reps, warm=3)


def _graph_ms(fns, calls: int, reps: int, warm: int = 1) -> float:
    """Median milliseconds per call of one CUDA graph holding ``calls`` calls of ``fns``, round robin.

    Each fn runs ``warm`` times on a side stream first (what capture needs), then the graph is
    replayed ``reps`` times.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warm):
            for fn in fns:
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def _cold(make, calls: int = 24, reps: int = 15) -> float:
    """Median milliseconds per call, from one CUDA graph over cold operand copies (see the docstring).

    ``make(i)`` builds copy ``i``'s operands and returns ``(fn, bytes)``: a zero-argument call
    on them and the bytes it reads. CPU: wall clock of copy 0.
    """
    fn0, nbytes = make(0)
    if not torch.cuda.is_available():
        return _bench(fn0)
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    copies = max(1, min(64, -(-2 * l2 // max(1, nbytes))))
    fns = [fn0] + [make(i)[0] for i in range(1, copies)]
    for fn in fns:  # tunes (the first call of a shape class) and compiles before capture
        fn()
    torch.cuda.synchronize()
    return _graph_ms(fns, max(calls, copies), reps)


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _tuned_config(kernel) -> str:
    """The config the autotuner chose at the kernel's last launch (which variant won, on this card)."""
    best = getattr(kernel.fn, "best_config", None)
    if best is None:
        return "—"
    flags = {k: v for k, v in best.kwargs.items() if not isinstance(v, bool)}
    on = [k for k, v in best.kwargs.items() if v is True]
    return " ".join([*(f"{k}{v}" for k, v in flags.items()), *on, f"w{best.num_warps}"])


def _row(case, base_name, base_ms, ours_name, ours_ms, target=None, *extra) -> None:
    ratio = base_ms / ours_ms
    met = "" if target is None else ("yes" if ratio >= target else "no")
    _print_row(case, f"{base_name} {base_ms * 1e3:.1f} µs".strip(), f"{ours_name} {ours_ms * 1e3:.1f} µs".strip(), f"{ratio:.2f}×",
               f"≥ {target}×" if target else "—", met, *extra)  # fmt: skip


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
        "t in K slices (ours)",
    )
    _print_row(*["---"] * 10)
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
        # ... and as the fused path computes it when t has too few tiles for the GPU (split-K)
        split = K.down_splits(m, k, r, K._processors(torch.device(device)))
        t_given = m >= K.T_GIVEN_ROWS or r * k >= K.T_GIVEN_DOWN
        sliced = "—"
        if t_given and split > 1:
            ours_first = _cold(functools.partial(make, fn=lambda x, down, up, bias, s=split: K.down_product(x, down, s)))
            sliced = f"{ours_first * 1e3:.1f} µs ({split} slices)"
        target = 1.3 if (r <= k // 8 or r <= n // 8) and m >= 512 else None
        _row(f"{m} × {k} → {n}, r={r}", "", base, "", ours, target, f"{dense * 1e3:.1f} µs", f"{eager * 1e3:.1f} µs",
             f"{first * 1e3:.1f} µs", sliced)  # fmt: skip


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
            tuned = _tuned_config(D.gemv_kernel())
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
    print("\n### Dequant-GEMM at prefill vs the fp16 dense matmul (CUDA graph, cold weights)\n")
    _print_row("M × in → out", "format", "fp16 F.linear", "kernel", "speedup")
    _print_row(*["---"] * 5)
    for m, n, k in GEMM_SHAPES:
        if _late("dequant GEMM"):
            break
        dense = _cold(functools.partial(make_dense, m=m, n=n, k=k))
        ours = _cold(functools.partial(make_quant, m=m, n=n, k=k, spec="int4g128"))
        _print_row(f"{m} × {k} → {n}", "int4g128", f"{dense * 1e3:.1f} µs", f"{ours * 1e3:.1f} µs", f"{dense / ours:.2f}×")


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
    )
    _print_row(*["---"] * 9)
    for n, b in MONARCH_SHAPES:
        p = n // b

        def factors(n=n, b=b, p=p):
            return torch.randn(b, p, b, device=device, dtype=dtype) / b**0.5, torch.randn(
                b, b, p, device=device, dtype=dtype
            ) / p**0.5

        for m in MONARCH_ROWS:
            if _late("Monarch"):
                return

            def make_dense(i, m=m, n=n):
                x, w = (torch.randn(m, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype))
                return (lambda: F.linear(x, w)), _nbytes(x, w)

            def make(i, fn, m=m, n=n):
                x, (L, R) = torch.randn(m, n, device=device, dtype=dtype), factors()
                return (lambda: fn(x, L, R, n)), _nbytes(x, L, R) + m * n * x.element_size()

            dense = _cold(make_dense)
            ours = _cold(functools.partial(make, fn=K.monarch_linear))
            ref = _cold(functools.partial(make, fn=K.monarch_linear_ref))
            eager = _bench(K.monarch_linear, torch.randn(m, n, device=device, dtype=dtype), *factors(), n)
            ratio = dense / ours
            _print_row(f"{m} × {n}", f"{b}, 1", f"{dense * 1e3:.1f} µs", f"{ours * 1e3:.1f} µs", f"{ratio:.2f}×", "≥ 3×",
                       "yes" if ratio >= 3 else "no", f"{ref * 1e3:.1f} µs", f"{eager * 1e3:.1f} µs")  # fmt: skip


# ---- decode proxy ----------------------------------------------------------------------------


def _proxy_layers(kind, device, dtype, layers, rank=64, spec="int4g32"):
    """SmolLM2-shaped projections per layer (q, k, v, o 576-wide; gate/up/down 576↔1536)."""
    from torch import nn

    from passes.lowrank import LowRankLinear
    from passes.quant_storage import QuantizedLinear

    shapes = PROXY_SHAPES
    out = []
    for i in range(layers):
        mods = {}
        for j, (name, (o, k)) in enumerate(shapes.items()):
            seed = 100 * i + j
            if kind == "dense":
                lin = nn.Linear(k, o, bias=False)
                lin.weight.data = torch.randn(o, k, generator=torch.Generator().manual_seed(seed)) / k**0.5
                mods[name] = lin
            elif kind == "lowrank":
                g = torch.Generator().manual_seed(seed)
                mods[name] = LowRankLinear(nn.Parameter(torch.randn(rank, k, generator=g) / k**0.5),
                                           nn.Parameter(torch.randn(o, rank, generator=g) / rank**0.5), None)  # fmt: skip
            else:
                mods[name] = QuantizedLinear(_packed(_format(spec), o, k, dtype, "cpu", seed)[0], None)
        out.append(nn.ModuleDict(mods).to(device=device, dtype=dtype).eval())
    return out


def _proxy_step(layers, fused: bool):
    """One decode step's projections (attention and norms left out: this times the weights' part)."""
    from codegen import dispatch

    def step(h):
        for m in layers:
            q = m["q"](h)
            m["k"](h)
            m["v"](h)
            if fused and hasattr(m["o"], "packed"):
                h = dispatch.quant_linear(q, m["o"].packed, None, epilogue="add", aux=[h])
                u = m["up"](h)
                a = dispatch.quant_linear(h, m["gate"].packed, None, epilogue="silu,mul", aux=[u])
                h = dispatch.quant_linear(a, m["down"].packed, None, epilogue="add", aux=[h])
            else:
                h = h + m["o"](q)
                h = h + m["down"](F.silu(m["gate"](h)) * m["up"](h))
        return h

    return step


def bench_decode_proxy(device, dtype, n_layers, kernel_variants: bool | None = None):
    from codegen import dispatch

    cuda = device == "cuda"
    kernel_variants = cuda if kernel_variants is None else kernel_variants
    print(
        f"\n### Decode proxy: {n_layers} SmolLM2-shaped layers of projections, batch 1 ({'CUDA' if cuda else 'CPU reference paths'})\n"
    )
    cols = (
        ["variant", "eager ms/token", "tokens/s"] + (["CUDA graph ms/token", "tokens/s (graph)"] if cuda else []) + ["weight MB"]
    )
    _print_row(*cols)
    _print_row(*["---"] * len(cols))
    x = torch.randn(1, PROXY_SHAPES["q"][1], device=device, dtype=dtype)
    variants = [("dense fp16" if cuda else "dense fp32", "dense", False, None)]
    if kernel_variants:
        variants += [("int4 g32, dequant kernel", "int4", False, True), ("int4 g32, kernel + fused epilogues", "int4", True, True),
                     ("int4 g32, torch dequant path", "int4", False, False), ("low-rank r=64, fused kernel", "lowrank", False, True),
                     ("low-rank r=64, two torch matmuls", "lowrank", False, False)]  # fmt: skip
    else:
        variants += [
            ("int4 g32, torch dequant path", "int4", False, False),
            ("low-rank r=64, two matmuls", "lowrank", False, False),
        ]
    for label, kind, fused, kernels in variants:
        if _late("decode proxy"):
            break
        layers = _proxy_layers(kind, device, dtype, n_layers)
        mb = sum(t.numel() * t.element_size() for m in layers for t in list(m.parameters()) + list(m.buffers())) / 2**20
        step = _proxy_step(layers, fused)

        def run(step=step):
            with torch.no_grad():
                return step(x)

        with dispatch.force_kernels(kernels) if kernels is not None else contextlib.nullcontext():
            eager = _wall(run, cuda)
            graph = _guard(f"graph {label}", _bench_graph, run, 5, 10) if cuda else None
        cells = [label, f"{eager:.3f}", f"{1e3 / eager:.0f}"]
        if cuda:
            cells += [f"{graph:.3f}" if graph else "—", f"{1e3 / graph:.0f}" if graph else "—"]
        _print_row(*cells, f"{mb:.1f}")
        del layers


def _wall(fn, cuda: bool, reps: int = 20) -> float:
    fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[len(times) // 2]


# ---- end to end (optional) -------------------------------------------------------------------


#: SmolLM2-135M's architecture (its config.json); the end-to-end rows time it with random weights,
#: since speed depends on shapes and storage formats, not on the values (the GPU machine has no
#: copy of the weights).
SMOLLM2_CONFIG = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                  "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
                  "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True}  # fmt: skip


def _e2e_models(device, layers: int | None = None):
    """(dense fp16 SmolLM2-shaped model, the same with every decoder-layer linear int4 g32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import passes

    cfg = dict(SMOLLM2_CONFIG, num_hidden_layers=layers or SMOLLM2_CONFIG["num_hidden_layers"])
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype=torch.float16).eval()
    names = [n for n, p in dense.named_parameters() if p.dim() == 2 and ".layers." in n]
    plan = passes.Plan({n: passes.IntNConfig(4, 32) for n in names})
    optimized = passes.apply(dense, plan, progress=False)
    return dense.to(device), optimized.to(device)


def _decode_timer(model, compile_kwargs, prompt: int, steps: int, device):
    """Seconds per decode token: a static KV cache (fixed shapes: one graph, CUDA-graph friendly),
    a ``prompt``-token prefill, then ``steps`` one-token forwards; returns (s/token, first-call s, tokens)."""
    from torch._dynamo.utils import counters
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 8)
    fwd = torch.compile(model, **compile_kwargs) if compile_kwargs is not None else model
    counters.clear()
    notes = _CompileNotes() if compile_kwargs is not None else None
    ids = torch.arange(1, prompt + 1, device=device)[None] % model.config.vocab_size
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(prompt, device=device), use_cache=True)
        tok = ids[:, -1:]
        pos = torch.tensor([prompt], device=device)
        t0 = time.time()
        with notes or contextlib.nullcontext():  # listens while compiling; detached even if it fails
            for _ in range(3):  # compile (and CUDA-graph recording) happens here
                logits = fwd(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True).logits
                tok = logits[:, -1:].argmax(-1)
                pos = pos + 1
            sync()
        first = time.time() - t0
        out = []
        host = 0.0  # seconds inside the model call: near the per-token time means the host is the bottleneck
        t0 = time.time()
        for _ in range(steps):
            h = time.perf_counter()
            logits = fwd(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True).logits
            host += time.perf_counter() - h
            tok = logits[:, -1:].argmax(-1)
            out.append(tok)
            pos = pos + 1
        sync()
        per_token = (time.time() - t0) / steps
        profile = _kernel_profile(lambda: fwd(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True), device)
        profile = f"host {host / steps * 1e3:.2f} ms/call in the model call; " + profile
        if notes is not None:
            profile += "\n    compile: " + notes.summary(counters)
        return per_token, first, torch.cat(out, 1), profile


class _CompileNotes(logging.Handler):
    """What torch.compile said while compiling (CUDA-graph skips, graph breaks, recompiles): a
    compiled step slower than its kernels' sum usually runs without CUDA graphs, and this says why."""

    KEYS = ("cudagraph", "graph break", "recompil")

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        with contextlib.suppress(Exception):  # diagnostics only: a torch without these artifacts still runs
            torch._logging.set_logs(perf_hints=True, graph_breaks=True, recompiles=True)
        # torch's dynamo and inductor loggers do not propagate to "torch": listen on each
        self._loggers = [logging.getLogger(n) for n in ("torch", "torch._dynamo", "torch._inductor")]
        for logger in self._loggers:
            logger.addHandler(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def emit(self, record):
        msg = record.getMessage()
        if any(k in msg.lower() for k in self.KEYS):
            self.lines.append(msg.strip().splitlines()[0][:240])

    def close(self):
        for logger in self._loggers:
            logger.removeHandler(self)
        with contextlib.suppress(Exception):
            torch._logging.set_logs()
        super().close()

    def summary(self, counters) -> str:
        inductor = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}
        stats = dict(counters["stats"])
        breaks = sum(counters["graph_break"].values())
        head = f"graphs {stats.get('unique_graphs', '?')}, graph breaks {breaks}, inductor cudagraph counters {inductor}"
        uniq = list(dict.fromkeys(self.lines))[:6]
        return head + "".join(f"\n      log: {m}" for m in uniq)


def _kernel_profile(step, device, top: int = 8) -> str:
    """Kernels one decode step launches (count, device time, the costliest), to see where a
    compiled model's time goes. On CPU: the top operators by CPU time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with torch.no_grad(), profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if (e.device_type.name == "CUDA") == cuda]
    attr = "device_time_total" if cuda else "self_cpu_time_total"
    events.sort(key=lambda e: -getattr(e, attr, 0.0))
    total = sum(getattr(e, attr, 0.0) for e in events)
    calls = sum(e.count for e in events)
    head = ", ".join(f"{e.key[:48]} ×{e.count} {getattr(e, attr, 0.0):.0f} µs" for e in events[:top])
    return f"{calls} {'kernels' if cuda else 'ops'}, {total:.0f} µs; top: {head}"


def bench_e2e(device, layers: int | None = None, steps: int = 64, rows: str = "all"):
    """SmolLM2-shaped decode: int4 g32 under backend='decomp' vs the dense model under inductor.

    ``rows="ours-compiled"``: only the compiled int4 model (a short GPU session's diagnostic run;
    the dense rows do not change between runs of our code)."""
    print("\n### SmolLM2-135M-shaped decode, batch 1: torch.compile(backend='decomp') vs dense + inductor\n")
    print("random weights of SmolLM2-135M's shapes (speed depends on shapes and formats, not values); "
          f"static KV cache, 32-token prompt, {steps} decode steps; mode='reduce-overhead' = CUDA graphs\n")  # fmt: skip
    _ensure_backend()
    dense, optimized = _e2e_models(device, layers)
    mb = {
        k: sum(_nbytes(t) for t in list(m.parameters()) + list(m.buffers())) / 2**20
        for k, m in (("dense", dense), ("int4", optimized))
    }
    _print_row("model", "how it runs", "ms/token", "tokens/s", "vs dense same mode", "first 3 calls s", "weights MB")
    _print_row(*["---"] * 7)
    cuda = device == "cuda"
    modes = [("eager", None, None)] if rows == "all" else []
    if cuda:
        modes += [("torch.compile, reduce-overhead", {"backend": "inductor", "mode": "reduce-overhead"},
                   {"backend": "decomp", "mode": "reduce-overhead"})]  # fmt: skip
    else:
        modes += [("torch.compile", {"backend": "inductor"}, {"backend": "decomp"})]
    for label, dense_kw, ours_kw in modes:
        if _late(f"e2e {label}"):
            break
        torch._dynamo.reset()
        d = _guard(f"e2e dense {label}", _decode_timer, dense, dense_kw, 32, steps, device) if rows == "all" else None
        torch._dynamo.reset()
        q = _guard(f"e2e int4 {label}", _decode_timer, optimized, ours_kw, 32, steps, device)
        for name, res, kw, base in (("dense fp16", d, dense_kw, None), ("int4 g32 layers", q, ours_kw, d)):
            if res is None:
                continue
            how = label if kw is None else f"{label} (backend={kw['backend']})"
            ratio = f"{base[0] / res[0]:.2f}×" if base else "1.00×" if name == "dense fp16" else "—"
            _print_row(name, how, f"{res[0] * 1e3:.2f}", f"{1 / res[0]:.0f}", ratio, f"{res[1]:.1f}",
                       f"{mb['dense' if base is None else 'int4']:.1f}")  # fmt: skip
        for name, res in (("dense fp16", d), ("int4 g32 layers", q)):
            if res is not None:
                print(f"  one step of {name}, {label}: {res[3]}", flush=True)


# ---- main ------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="correctness only (CUDA)")
    parser.add_argument("--e2e", action="store_true", help="also SmolLM2-shaped end-to-end decode (needs transformers)")
    parser.add_argument("--budget-s", type=float, default=270.0, help="start no section or row past this many seconds")
    parser.add_argument("--sections", default="lowrank,dequant,monarch,e2e,proxy",
                        help="speed sections to run, comma-separated (e2e also needs --e2e)")  # fmt: skip
    parser.add_argument("--e2e-rows", choices=("all", "ours-compiled"), default="all",
                        help="ours-compiled: only the compiled int4 model (short GPU sessions)")  # fmt: skip
    parser.add_argument("--gemv-formats", default=",".join(GEMV_FORMATS), help="formats of the GEMV rows, comma-separated")
    args = parser.parse_args(argv)
    wanted = set(args.sections.split(","))
    GEMV_FORMATS[:] = args.gemv_formats.split(",")
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
                     ("modules + torch.compile", lambda d: check_modules_and_compile(d, blocks))):  # fmt: skip
        _guard(name, fn, "cuda")
    print(f"\ncorrectness: {len(FAILURES)} failure(s), {time.time() - START:.0f} s so far", flush=True)
    if args.check:
        return 1 if FAILURES else 0

    os.environ["DECOMP_AUTOTUNE"] = "1"
    print(f"\n## Speed on {card} (fp16; per call, replayed from CUDA graphs over cold operand copies)")
    sections = [("dequant", bench_dequant), ("lowrank", bench_lowrank), ("monarch", bench_monarch)]
    if args.e2e:
        sections.append(("e2e", lambda d, t: bench_e2e(d, rows=args.e2e_rows)))
    sections.append(("proxy", lambda d, t: bench_decode_proxy(d, t, 30)))
    for name, fn in sections:
        if name not in wanted or _late(name):
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
    bench_decode_proxy("cpu", torch.float32, 4)


if __name__ == "__main__":
    sys.exit(main())
