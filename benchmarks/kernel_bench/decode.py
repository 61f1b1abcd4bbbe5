"""Decode speed: the per-layer proxy (SmolLM2's projections, eager and CUDA-graphed) and the
SmolLM2-shaped model end to end under ``torch.compile``, with what the compiler said."""

from __future__ import annotations

import contextlib
import logging
import time

import torch
import torch.nn.functional as F

from .checks import _ensure_backend
from .common import _bench_graph, _format, _guard, _late, _nbytes, _packed, _print_row, _wall

__all__ = ["PROXY_SHAPES", "SMOLLM2_CONFIG", "bench_decode_proxy", "bench_e2e"]

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


def _proxy_step(layers, fused: bool | str):
    """One decode step's projections (attention and norms left out: this times the weights' part).
    ``fused``: epilogues fused into the kernels; ``"grouped"``: also q/k/v in one launch and gate·up
    as one SwiGLU kernel (what ``codegen.fusion`` makes of a compiled decode step)."""
    from codegen import dispatch

    def step(h):
        for m in layers:
            if fused == "grouped":
                q, _, _ = dispatch.quant_linear_group(h, [m[n].packed for n in ("q", "k", "v")])
                h = dispatch.quant_linear(q, m["o"].packed, None, epilogue="add", aux=[h])
                (a,) = dispatch.quant_linear_group(h, [m["gate"].packed, m["up"].packed], pair=True)
                h = dispatch.quant_linear(a, m["down"].packed, None, epilogue="add", aux=[h])
                continue
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
                     ("int4 g32, + q/k/v one launch, gate·up one SwiGLU kernel", "int4", "grouped", True),
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


def _decode_timer(model, compile_kwargs, prompt: int, steps: int, device, host_profile: bool = False):
    """Seconds per decode token: a static KV cache (fixed shapes: one graph, CUDA-graph friendly),
    a ``prompt``-token prefill, then ``steps`` one-token forwards; returns (s/token, first-call s,
    tokens, a one-step profile line with the host time and what the compiler logged).
    ``host_profile``: also ``steps`` more calls timed in parts (:func:`_host_split`)."""
    from torch._dynamo.utils import counters
    from transformers import StaticCache

    # every call takes a cache slot (the 3 compiling calls, the timed steps, the profiled ones)
    cache = StaticCache(config=model.config, max_cache_len=prompt + 2 * steps + 8)
    # torch.compile pops guard_filter_fn out of options: each compile gets its own copy
    kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in (compile_kwargs or {}).items()}
    fwd = torch.compile(model, **kwargs) if compile_kwargs is not None else model
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
        call = lambda: fwd(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True)
        profile = f"host {host / steps * 1e3:.2f} ms/call in the model call; " + _kernel_profile(call, device)
        if host_profile:
            profile += "\n    host split: " + _host_split(call, steps, sync)
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


def _host_split(call, steps: int, sync) -> str:
    """Where the host time of a compiled call goes, over ``steps`` calls: inside inductor's compiled
    graph (``CompiledFxGraph.__call__``; on CUDA with CUDA graphs, of which the replay call itself),
    and the rest — dynamo's guards and argument gathering, AOT autograd's runtime wrappers — which
    grows with the number of tensors the compiled frame takes (parameters and buffers included)."""
    import unittest.mock

    from torch._inductor import cudagraph_trees, output_code

    spent = {"graph": 0.0, "replay": 0.0}

    def timed(key, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - t

        return wrapper

    graph_call, replay = output_code.CompiledFxGraph.__call__, cudagraph_trees.CUDAGraphNode.run_graph
    with (unittest.mock.patch.object(output_code.CompiledFxGraph, "__call__", timed("graph", graph_call)),
          unittest.mock.patch.object(cudagraph_trees.CUDAGraphNode, "run_graph", timed("replay", replay))):  # fmt: skip
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            call()
        total = time.perf_counter() - t
        sync()
    us = {k: v / steps * 1e6 for k, v in spent.items()}
    rest = total / steps * 1e6 - us["graph"]
    return (f"{total / steps * 1e6:.0f} µs per call: {rest:.0f} outside inductor's graph (dynamo guards and arguments, "
            f"AOT wrappers), {us['graph']:.0f} inside it (CUDA-graph replay call {us['replay']:.0f})")  # fmt: skip


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


def bench_e2e(device, layers: int | None = None, steps: int = 64, rows: str = "all", host_profile: bool = False,
              guard_filter: bool = False):  # fmt: skip
    """SmolLM2-shaped decode: int4 g32 under backend='decomp' vs the dense model under inductor.

    ``rows``: ``"all"``; ``"compiled"`` (no eager rows); ``"ours-compiled"`` (only the compiled int4
    model: a short GPU session's diagnostic run). ``host_profile``: the compiled rows also split
    their host time (:func:`_host_split`). ``guard_filter``: both models compiled once more with
    ``torch.compiler.skip_guard_on_all_nn_modules_unsafe`` as dynamo's guard filter — about half
    of a compiled decode step's host time is guards, arguments and AOT wrappers, which grow with
    the tensors a model holds (an int4 linear holds three: codes, scales, minima; H100 run 10)."""
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
    # inductor takes mode= or options=, not both: reduce-overhead is its triton.cudagraphs patch
    graphs = {"triton.cudagraphs": True} if cuda else {}
    if cuda:
        modes += [("torch.compile, reduce-overhead", {"backend": "inductor", "mode": "reduce-overhead"},
                   {"backend": "decomp", "mode": "reduce-overhead"})]  # fmt: skip
    else:
        modes += [("torch.compile", {"backend": "inductor"}, {"backend": "decomp"})]
    if guard_filter:
        skip = torch.compiler.skip_guard_on_all_nn_modules_unsafe
        modes += [(f"torch.compile{', CUDA graphs' if cuda else ''}, nn-module guards skipped",
                   {"backend": "inductor", "options": {**graphs, "guard_filter_fn": skip}},
                   {"backend": "decomp", "options": {"inductor": graphs, "guard_filter_fn": skip}})]  # fmt: skip
    for label, dense_kw, ours_kw in modes:
        if _late(f"e2e {label}"):
            break
        torch._dynamo.reset()
        prof = host_profile and dense_kw is not None
        d = (
            _guard(f"e2e dense {label}", _decode_timer, dense, dense_kw, 32, steps, device, prof)
            if rows != "ours-compiled"
            else None
        )
        torch._dynamo.reset()
        q = _guard(f"e2e int4 {label}", _decode_timer, optimized, ours_kw, 32, steps, device, prof)
        results = [("dense fp16", d, dense_kw, None), ("int4 g32 layers", q, ours_kw, d)]
        if cuda and rows == "all" and label.endswith("reduce-overhead") and not _late("e2e ungrouped"):
            # the same without sibling grouping / norm folding
            ungrouped_kw = {"backend": "decomp", "options": {"group_siblings": False, "inductor": graphs}}
            torch._dynamo.reset()
            u = _guard(f"e2e int4 ungrouped {label}", _decode_timer, optimized, ungrouped_kw, 32, steps, device)
            results.append(("int4 g32 layers, siblings not grouped", u, ungrouped_kw, d))
        for name, res, kw, base in results:
            if res is None:
                continue
            how = label if kw is None else f"{label} (backend={kw['backend']})"
            ratio = f"{base[0] / res[0]:.2f}×" if base else "1.00×" if name == "dense fp16" else "—"
            _print_row(name, how, f"{res[0] * 1e3:.2f}", f"{1 / res[0]:.0f}", ratio, f"{res[1]:.1f}",
                       f"{mb['dense' if name == 'dense fp16' else 'int4']:.1f}")  # fmt: skip
        for name, res, _, _ in results:
            if res is not None:
                print(f"  one step of {name}, {label}: {res[3]}", flush=True)
