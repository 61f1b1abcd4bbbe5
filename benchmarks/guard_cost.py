"""Host cost of a compiled decode step's guards: dense (inductor) vs every decoder linear int4 g32
(``backend="decomp"``, kernel path), on SmolLM2's 30-layer structure.

    python benchmarks/guard_cost.py             # CPU: tiny widths, kernels in Triton's interpreter
    python benchmarks/guard_cost.py --layers 8

Before every call of a compiled model, dynamo checks its guards (C++ checks, plus any
Python-evaluated ones); that runs on the host whether or not the step replays from a CUDA graph.
The number reported is the median time of that check alone (the frame's guard manager called on
the step's arguments), so it compares the two models' guards, not their kernels. Widths are shrunk
(64-wide layers): guard cost depends on the number of modules and tensors, not their sizes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
        "vocab_size": 256}  # fmt: skip


def guard_check_us(model, backend: str, kernels: bool, reps: int = 200) -> tuple[float, int]:
    """(median µs of one guard check of the compiled decode frame, number of cache entries)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from transformers import StaticCache

    from codegen import dispatch

    torch._dynamo.reset()
    device = next(model.parameters()).device
    cache = StaticCache(config=model.config, max_cache_len=64)
    step = {"input_ids": torch.tensor([[3]], device=device), "past_key_values": cache,
            "cache_position": torch.tensor([1], device=device), "use_cache": True}  # fmt: skip
    compiled = torch.compile(model, backend=backend)
    fn = type(model).forward
    frame = {"args": (model,), "kwargs": step, **dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))}
    times = []
    with torch.no_grad(), dispatch.force_kernels(kernels):  # the state the guards were made in
        for _ in range(3):  # compile, then the recompile for an initialised cache
            compiled(**step)
        entries = _debug_get_cache_entry_list(fn)
        manager = next(e.guard_manager for e in entries if e.guard_manager.check(frame))
        for _ in range(reps):
            t = time.perf_counter()
            manager.check(frame)
            times.append(time.perf_counter() - t)
    return 1e6 * sorted(times)[len(times) // 2], len(entries)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    args = parser.parse_args(argv)
    from kernel_bench.checks import _ensure_backend
    from kernel_bench.decode import SMOLLM2_CONFIG, _e2e_models

    _ensure_backend()
    SMOLLM2_CONFIG.update(TINY)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dense, optimized = _e2e_models(device, layers=args.layers)
    print(f"{args.layers} SmolLM2-structured layers (64 wide), {device}, torch {torch.__version__}\n")
    print("| model | guard check per call | compiled entries |")
    print("| --- | --- | --- |")
    for name, model, backend, kernels in (("dense", dense, "inductor", False), ("int4 g32", optimized, "decomp", True)):
        us, n = guard_check_us(model, backend, kernels)
        print(f"| {name} | {us:.0f} µs | {n} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
