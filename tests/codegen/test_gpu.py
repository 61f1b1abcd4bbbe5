"""Compiled (not interpreted) kernels on a GPU: tuned launches at real sizes, inductor's generated
code calling the fused kernel, CUDA-graph capture. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codegen import dispatch
from codegen.kernels import dequant as D
from codegen.kernels import lowrank as K
from passes.quant_storage import IntNConfig, PackedWeight, QuantizedLinear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_tuned_kernels_at_real_sizes(close_to_truth):
    g = torch.Generator().manual_seed(0)
    x, down, up = (
        torch.randn(512, 4096, generator=g),
        torch.randn(256, 4096, generator=g) / 64,
        torch.randn(4096, 256, generator=g) / 16,
    )
    args = [t.cuda().half() for t in (x, down, up)]
    close_to_truth(
        K.lowrank_linear(*args), K.lowrank_linear_ref(*args), K.lowrank_linear_ref(*[t.cuda().double() for t in (x, down, up)])
    )
    config = IntNConfig(4, 128)
    pw = PackedWeight(config, (4096, 4096), torch.float16, config.encode(torch.randn(4096, 4096, generator=g) / 64)).cuda()
    consts = [pw.scale, pw.minimum]
    for m in (1, 512):
        xm = torch.randn(m, 4096, generator=g).cuda().half()
        out = D.quant_linear(xm, pw.codes, consts, "int4g128", 4096)
        ref = D.quant_linear_ref(xm, pw.codes, consts, "int4g128", 4096)
        close_to_truth(out, ref, D.quant_linear_ref(xm.double(), pw.codes, consts, "int4g128", 4096))


def _backend_registered() -> None:
    """``backend="decomp"`` without ``pip install`` (the entry point is missing in a bare checkout)."""
    from torch._dynamo.backends.registry import lookup_backend, register_backend

    try:
        lookup_backend("decomp")
    except Exception:  # noqa: BLE001 — InvalidBackend
        from passes.backend import decomp_backend

        register_backend(compiler_fn=decomp_backend, name="decomp")


def test_inductor_code_calls_the_fused_kernel():
    from torch._inductor.utils import run_and_get_code

    _backend_registered()
    config = IntNConfig(4, 32)
    w = torch.randn(1536, 576)
    gate = QuantizedLinear(PackedWeight(config, (1536, 576), torch.float16, config.encode(w)), None).cuda()
    up = torch.nn.Linear(576, 1536, bias=False).cuda().half()

    def block(x):
        return F.silu(gate(x)) * up(x)

    x = torch.randn(8, 576, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        eager = block(x)
        out, code = run_and_get_code(torch.compile(block, backend="decomp"), x)
    assert any("_dequant_gemm_kernel_silu_mul" in c for c in code), "the fused kernel is not in inductor's code"
    torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)


def test_cuda_graph_capture_of_a_module():
    config = IntNConfig(4, 32)
    m = QuantizedLinear(PackedWeight(config, (1536, 576), torch.float16, config.encode(torch.randn(1536, 576))), None).cuda()
    x = torch.randn(1, 576, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        expected = m(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = m(x)
        graph.replay()
    assert dispatch.use_kernels(x)
    torch.testing.assert_close(out, expected)
