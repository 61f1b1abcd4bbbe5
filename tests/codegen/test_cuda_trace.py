"""The CUDA branch of the operators under ``torch.compile(backend="decomp")``, traced on CPU
(``benchmarks/cuda_trace.py`` in its own process: it needs triton imported without the
interpreter): what inductor would receive for an int4 decode step on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cuda_trace.py"


def test_int4_decode_step_is_one_cuda_graph_friendly_graph_of_grouped_kernels():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--json"], check=False, env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(run.stdout.strip().splitlines()[-1])
    assert record["graph_breaks"] == 0 and len(record["graphs"]) == 1, record
    graph = record["graphs"][0]
    # per layer: q/k/v one launch, o_proj (+ residual), gate·up SwiGLU pair, down_proj (+ residual)
    assert graph["kernels"] == 4 * record["layers"], record
    assert graph["rms_norms_left"] == 1  # the final norm (before the dense lm_head); the others are in the kernels
    # functionalization clones only what the kernels write (their outputs), never a weight or activation
    assert set(graph["cloned"]) <= {"out_ptr", "out0_ptr", "out1_ptr", "out2_ptr"}, graph["cloned"]
    assert graph["cudagraph_incompatible"] is None
    assert len(graph["non_static_inputs"]) == 1, graph["non_static_inputs"]  # the token ids; weights and cache are static
    # torch analyses what each kernel call writes (TTIR); ours once per kernel and signature: 4, not one per call
    assert record["kernel_analyses"] <= 4 < record["kernel_analyses"] + record["kernel_analyses_memoized"], record


def test_every_rewritten_family_compiles_into_one_cuda_graph_friendly_graph():
    """Layer 0's seven linears each of another family (low-rank, LQ, Monarch, block-diagonal,
    Kronecker, LLM.int8(), int4): each is one kernel on the CUDA branch (LLM.int8() two: its
    activation quantization, then the int8 GEMM), epilogues fused, no graph break, nothing CUDA
    graphs refuse, nothing cloned but buffers the operators allocate for their kernels to write."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--mixed", "--json"], check=False, env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(run.stdout.strip().splitlines()[-1])
    assert record["graph_breaks"] == 0 and len(record["graphs"]) == 1, record
    graph = record["graphs"][0]
    names = graph["kernel_names"]
    for kernel in ("_lowrank_linear_kernel", "_monarch_gemv_kernel", "_blockdiag_linear_kernel_add",
                   "_kronecker_linear_kernel_silu_mul", "_int8_outlier_quant_kernel", "_int8_outlier_kernel"):  # fmt: skip
        assert names.get(kernel) == 1, names
    # layer 0: 7 linears in 8 kernels (o_proj + residual, gate·up SwiGLU, down + residual fused); layer 1: 4 grouped
    assert graph["kernels"] == 8 + 4, names
    assert graph["cudagraph_incompatible"] is None
    written = {"out_ptr", "out0_ptr", "out1_ptr", "out2_ptr", "q_ptr", "sx_ptr", "xo_ptr"}  # outputs; LLM.int8()'s q, s_x, x_o
    assert set(graph["cloned"]) <= written, graph["cloned"]
    assert len(graph["non_static_inputs"]) == 1, graph["non_static_inputs"]


def test_long_prefill_decodes_each_weight_once_then_multiplies():
    """A prompt past DEQUANT_FIRST_M tokens: each int4 linear is one weight-decoding kernel and a
    matmul (no GEMM kernel re-decoding tiles per row block), in one graph with no break."""
    pytest.importorskip("triton")
    from codegen.kernels.dequant import DEQUANT_FIRST_M

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", "--prefill", str(DEQUANT_FIRST_M + 8)],
        check=False, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(run.stdout.strip().splitlines()[-1])
    assert record["graph_breaks"] == 0 and len(record["graphs"]) == 1, record
    graph = record["graphs"][0]
    assert graph["kernel_names"] == {"_dequant_weight_kernel": 7 * record["layers"]}, graph["kernel_names"]
    assert graph["cloned"] == ["w_ptr"], graph["cloned"]  # the decoded weight, allocated in the op
