"""What ``torch.compile(backend="decomp")`` makes of an int4 decode step on CUDA — without a GPU.

    python benchmarks/cuda_trace.py              # 2 SmolLM2-structured layers (tiny widths)
    python benchmarks/cuda_trace.py --layers 4 --json
    python benchmarks/cuda_trace.py --mixed      # layer 0: one linear per rewritten family
    python benchmarks/cuda_trace.py --prefill 600  # a 600-token prefill instead of a decode step

On a machine without CUDA the operators take their CPU branch, so a CPU compile never shows the
graph a GPU would get. This script makes the operators take their CUDA branch on CPU tensors
(``codegen.ops`` thinks it is on a GPU, Triton's front end targets sm_90), runs the real backend
(rewrite check, epilogue fusion, sibling grouping) and AOT autograd's functionalization — what
inductor receives — and reports, per compiled graph:

- graph breaks (dynamo's counter) and the number of graphs,
- Triton kernels (``triton_kernel_wrapper_functional`` nodes) per decoder layer, and the RMSNorms
  left for inductor (``rsqrt`` nodes: the ones not folded into a grouped kernel),
- the buffers functionalization clones per kernel: a kernel's outputs only, or it has been
  told it writes one of its inputs (which would cost copies, or CUDA-graph skips),
- inductor's verdict on CUDA-graph compatibility (``get_first_incompatible_cudagraph_node``),
- inputs that are not static (cudagraph trees copy those into place on every replay).

Nothing runs: the compiled graphs return zeros. Inductor itself, and what it decides at run time
on a real card (the GPU test ``test_compiled_int4_decoder_replays_as_cuda_graphs`` covers that),
are not exercised. Needs triton (no GPU) and runs in its own process: ``TRITON_INTERPRET`` must be
unset when triton is imported, since it decides what ``@triton.jit`` returns.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("cuda_trace.py traces compiled (not interpreted) kernels: run it with TRITON_INTERPRET unset")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # kernel_bench

import torch
from kernel_bench.mixed import TINY, mixed_plan


class _Sm90:
    """The part of Triton's active driver its front end asks for while torch analyses a kernel."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0


def _incompatible(gm: torch.fx.GraphModule):
    """Inductor's first CUDA-graph-incompatible node (``get_first_incompatible_cudagraph_node``).

    Before torch 2.13 that function fails on a user kernel's functional node (its value is a
    dict of output tensors), which inductor itself only meets after reinplacing it (value None):
    there the same two checks run on the node's tensors."""
    from torch._inductor.utils import get_first_incompatible_cudagraph_node, is_cudagraph_unsafe_fx_node
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    try:
        return get_first_incompatible_cudagraph_node(gm)
    except AssertionError:
        pass
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        values = list(val.values()) if isinstance(val, dict) else [val] if val is not None else []
        if is_cudagraph_unsafe_fx_node(node) or any(free_unbacked_symbols(v) for v in values):
            return node
    return None


def _kernel_name(node: torch.fx.Node) -> str:
    """The Triton kernel a ``triton_kernel_wrapper_*`` node launches."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
    while not hasattr(kernel, "__name__") and hasattr(kernel, "fn"):  # autotuner → jitted function
        kernel = kernel.fn
    return getattr(kernel, "__name__", type(kernel).__name__)


def _inspect(report: list):
    """An AOT forward compiler recording what inductor would receive; the graph returns zeros."""

    def compiler(gm: torch.fx.GraphModule, example_inputs):
        from torch._guards import TracingContext

        context = TracingContext.try_get()
        static = set(context.fw_metadata.static_input_indices) if context and context.fw_metadata else set()
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        kernels = [n for n in gm.graph.nodes if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target)]
        names = collections.Counter(_kernel_name(n) for n in kernels)
        report.append({
            "kernels": len(kernels),
            "kernel_names": dict(sorted(names.items())),
            "cloned": sorted({name for n in kernels for name in n.kwargs.get("tensors_to_clone", [])}),
            "rms_norms_left": sum(1 for n in gm.graph.nodes if n.op == "call_function" and "rsqrt" in str(n.target)),
            "cudagraph_incompatible": None if (bad := _incompatible(gm)) is None else bad.format_node(),
            "non_static_inputs": [
                f"{n.name} {tuple(n.meta['val'].shape)}" for i, n in enumerate(placeholders)
                if isinstance(n.meta.get("val"), torch.Tensor) and i not in static
            ],
            "ops": dict(collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function").most_common(6)),
        })  # fmt: skip
        outputs = next(iter(reversed(gm.graph.nodes))).args[0]

        def run(args):
            args.clear()
            return [torch.zeros(o.meta["val"].shape, dtype=o.meta["val"].dtype) if isinstance(o, torch.fx.Node) else o
                    for o in outputs]  # fmt: skip

        run._boxed_call = True
        return run

    return compiler


def trace(layers: int = 2, mixed: bool = False, prefill: int = 0) -> dict:
    """Compile one decode step of an int4 g32 Llama (SmolLM2's structure at tiny widths) on the
    operators' CUDA branch; returns graph breaks, the fusion report and each graph's record.
    ``mixed``: layer 0's seven linears each rewritten by another family (:func:`kernel_bench.mixed.mixed_plan`).
    ``prefill``: compile a prompt of that many tokens instead of a decode step."""
    from torch._dynamo.backends.registry import register_backend
    from torch._dynamo.utils import counters
    from torch._functorch.aot_autograd import aot_module_simplified
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache
    from triton.runtime import driver

    import codegen.fusion
    import codegen.ops
    import passes
    import passes.backend
    from codegen import dispatch
    from passes.quant_storage import IntNConfig

    cfg = LlamaConfig(num_hidden_layers=layers, **TINY)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(cfg).half().eval()
    names = [n for n, p in dense.named_parameters() if p.dim() == 2 and ".layers." in n]
    if mixed:  # LLM.int8() finds its outlier columns on calibration data
        batches = [(torch.randint(0, TINY["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(i)),) for i in range(2)]
        model = passes.apply(dense, mixed_plan(dense), calibration=batches, progress=False)
    else:
        model = passes.apply(dense, passes.Plan({n: IntNConfig(4, 32) for n in names}), progress=False)
    cache = StaticCache(config=cfg, max_cache_len=max(32, prefill + 1))
    if prefill:
        step_args = {"input_ids": torch.arange(prefill)[None] % TINY["vocab_size"], "cache_position": torch.arange(prefill)}
    else:  # a 4-token prompt eagerly, then the decode step compiled
        with torch.no_grad():
            model(input_ids=torch.arange(1, 5)[None], past_key_values=cache, cache_position=torch.arange(4), use_cache=True)
        step_args = {"input_ids": torch.tensor([[5]]), "cache_position": torch.tensor([4])}

    graphs, fusion = [], []
    real_fuse = codegen.fusion.fuse_epilogues
    saved = (codegen.ops._on_gpu, driver._active, passes.backend._inductor, codegen.fusion.fuse_epilogues)
    codegen.ops._on_gpu = lambda x: True
    driver.set_active(_Sm90())
    passes.backend._inductor = lambda gm, inputs, mode, patches: aot_module_simplified(gm, inputs, fw_compiler=_inspect(graphs))
    codegen.fusion.fuse_epilogues = lambda gm, **kw: fusion.append(str(real_fuse(gm, **kw)).splitlines()[0]) or None
    register_backend(compiler_fn=passes.backend.decomp_backend, name="decomp")
    torch._dynamo.reset()
    counters.clear()
    try:
        step = torch.compile(model, backend="decomp")
        with torch.no_grad(), dispatch.force_kernels():
            step(**step_args, past_key_values=cache, use_cache=True)
    finally:
        codegen.ops._on_gpu, driver._active, passes.backend._inductor, codegen.fusion.fuse_epilogues = saved
        torch._dynamo.reset()
    from codegen import analysis_cache

    analyses = analysis_cache.stats()
    return {"layers": layers, "mixed": mixed, "prefill": prefill, "graph_breaks": sum(counters["graph_break"].values()), "fusion": fusion, "graphs": graphs,
            "kernel_analyses": analyses["misses"], "kernel_analyses_memoized": analyses["hits"]}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the record as JSON")
    parser.add_argument("--mixed", action="store_true", help="layer 0's linears each of another family (every kernel)")
    parser.add_argument("--prefill", type=int, default=0, help="trace a prompt of this many tokens instead of a decode step")
    args = parser.parse_args(argv)
    result = trace(args.layers, args.mixed, args.prefill)
    if args.json:
        print(json.dumps(result))
        return 0
    what = f"{args.prefill}-token prefill" if args.prefill else "decode step"
    print(f"{what} of a {args.layers}-layer int4 g32 Llama, operators on their CUDA branch (traced on CPU)")
    print(f"graph breaks: {result['graph_breaks']}; graphs: {len(result['graphs'])}")
    for line in result["fusion"]:
        print(f"fusion: {line}")
    print(f"kernel write analyses (TTIR): {result['kernel_analyses']} run, {result['kernel_analyses_memoized']} memoized")
    for i, g in enumerate(result["graphs"]):
        print(f"graph {i}: {g['kernels']} Triton kernels ({g['kernels'] / args.layers:.1f} per layer), "
              f"{g['rms_norms_left']} RMSNorm(s) left to inductor; buffers cloned for kernels: {g['cloned']}")  # fmt: skip
        print(f"  CUDA-graph incompatible node: {g['cudagraph_incompatible']}; non-static inputs: {g['non_static_inputs']}")
        print(f"  kernels: {g['kernel_names']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
