"""What every section of ``benchmarks/kernels.py`` shares: the run's state (failures, time budget),
the timing methods (the module docstring of ``kernels.py`` says how GPU rows are timed), the
table rows, and the builders of packed test weights."""

from __future__ import annotations

import time
import traceback

import torch

__all__ = ["BUDGET_S", "FAILURES", "START"]

FAILURES: list[str] = []
START = time.time()
BUDGET_S = [300.0]  # set by --budget-s: no new row starts past it


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


# ---- packed weights ---------------------------------------------------------------------------


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


# ---- timing -----------------------------------------------------------------------------------


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


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _one_config(kernel, config):
    """``kernel`` (a built :class:`codegen.template.Kernel`) restricted to one tuning ``config``,
    launched untuned: what the per-config tables time."""
    import dataclasses

    raw = kernel.fn.fn if kernel.wrapped else kernel.fn  # the jitted function under triton.autotune
    return dataclasses.replace(kernel, fn=raw, configs=(config,), wrapped=False)


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
