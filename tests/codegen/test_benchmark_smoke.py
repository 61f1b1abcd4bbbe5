"""benchmarks/kernels.py runs end to end (tiny shapes, kernels in the interpreter on CPU), so the
one GPU run it is written for does not fail on a typo."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_sections_run_at_tiny_sizes(device, capsys, monkeypatch):
    bench = _load()
    from kernel_bench import common, decode, speed  # on sys.path once kernels.py is loaded

    tiny = {
        "LOWRANK_SHAPES": [(3, 40, 24, 8), (1, 24, 40, 4), (260, 24, 40, 4), (256, 512, 40, 8)],  # t given; t split
        "GEMV_SHAPES": [(24, 64)],
        "GEMV_FORMATS": ["int4g32", "int8"],
        "LANDSCAPE_SHAPE": (24, 64),
        "GEMM_SHAPES": [(20, 24, 64)],
        "MONARCH_SHAPES": [(64, 8), (256, 16)],
        "MONARCH_ROWS": (1, 17),
        "MONARCH_LANDSCAPE": [(17, 256, 16)],
        "BLOCKDIAG_SHAPES": [(64, 4)],
        "BLOCKDIAG_ROWS": (1, 17),
        "INT8_OUTLIER_SHAPES": [(64, 3)],
        "KRONECKER_SHAPES": [(256, 2)],
        "KRONECKER_ROWS": (1, 17),
        "INT8_OUTLIER_ROWS": (1, 17),
    }
    for name, value in tiny.items():
        monkeypatch.setattr(speed, name, value)
    from codegen.kernels import dequant

    # the GEMV section may switch decode to the tensor-core path for the rest of its process: not past this test
    monkeypatch.setattr(dequant, "GEMV_MAX_M", dequant.GEMV_MAX_M)
    monkeypatch.setattr(
        decode,
        "PROXY_SHAPES",
        {"q": (32, 32), "k": (16, 32), "v": (16, 32), "o": (32, 32), "gate": (64, 32), "up": (64, 32), "down": (32, 64)},
    )
    common.FAILURES.clear()  # one list, appended to by every section
    dtype = torch.float32
    bench.bench_lowrank(device, dtype)
    bench.bench_dequant(device, dtype)
    bench.bench_monarch(device, dtype)
    bench.bench_blockdiag(device, dtype)
    bench.bench_int8_outlier(device, dtype)
    bench.bench_kronecker(device, dtype)
    bench.bench_decode_proxy(device, dtype, 2, kernel_variants=True)
    out = capsys.readouterr().out
    assert common.FAILURES == []
    for heading in ("Fused low-rank", "Dequant-GEMV", "tuning configs, each alone", "Dequant at prefill", "Monarch", "Block-diagonal",
                    "Monarch tuning configs",
                    "LLM.int8()", "Kronecker sums", "Decode proxy"):  # fmt: skip
        assert heading in out
    assert "kernel + fused epilogues" in out and "gate·up one SwiGLU kernel" in out and out.count("×") > 8
    assert sum(line.startswith(("| int4g32 | BN", "| int8 | BN")) for line in out.splitlines()) == 4  # 2 configs × 2 formats
    prefill = [line for line in out.splitlines() if line.startswith("| 17 × 64 | 8, 1 |")]
    # Monarch two-stage row: + stage 1 timed alone, + the floor (activations copied once / twice)
    assert len(prefill) == 1 and prefill[0].count("µs") == 6 and " / " in prefill[0].split("|")[-2]
    configs = [line for line in out.splitlines() if line.startswith(("| stage 1 | BM", "| both stages | BM"))]
    assert len(configs) == 2 and all(line.count("µs") == 1 for line in configs)  # the first config of each on CPU
    gemm = [line for line in out.splitlines() if line.startswith("| 20 × 64 → 24 | int4g128 |")]
    assert len(gemm) == 1 and gemm[0].count("µs") == 5  # dense, dispatched, GEMM kernel, decode + matmul, decode alone
    blockdiag = [line for line in out.splitlines() if line.startswith(("| 1 × 64 | 4 |", "| 17 × 64 | 4 |"))]
    # dense, kernel, torch path; at 17 rows (past GATHER_MAX_M) also the in-kernel gather
    assert len(blockdiag) == 2 and [line.count("µs") for line in blockdiag] == [3, 4]
    int8 = [line for line in out.splitlines() if line.startswith(("| 1 × 64 | 3 |", "| 17 × 64 | 3 |"))]
    assert len(int8) == 2 and all(line.count("µs") == 3 for line in int8)
    kron = [line for line in out.splitlines() if line.startswith(("| 1 × 256 | 2 |", "| 17 × 256 | 2 |"))]
    assert len(kron) == 2 and all(line.count("µs") == 3 for line in kron)


def test_host_split_times_inside_the_compiled_graph():
    """The e2e host split patches inductor's compiled-graph call: a renamed hook would read 0 µs inside."""
    import re

    _load()
    from kernel_bench.decode import _host_split

    torch._dynamo.reset()
    lin = torch.nn.Linear(8, 8)
    step = torch.compile(lin, backend="inductor")
    x = torch.randn(2, 8)
    with torch.no_grad():
        step(x)
        line = _host_split(lambda: step(x), 20, lambda: None)
    total, outside, inside = (int(v) for v in re.findall(r"(\d+) (?:µs per call|outside|inside)", line))
    assert inside > 0 and outside > 0 and abs(total - outside - inside) <= 1, line
    torch._dynamo.reset()
