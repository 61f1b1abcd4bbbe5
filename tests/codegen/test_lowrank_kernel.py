"""The fused low-rank kernel against its reference: dtypes × small and ragged shapes × epilogues."""

from __future__ import annotations

import pytest
import torch

from codegen.kernels import lowrank as K
from codegen.kernels.common import KernelError

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (rows, in, rank, out): batch-1 decode, ragged everything, rank not a power of two, rank > BK,
# prefill rows (≥ T_GIVEN_ROWS: t = x·downᵀ computed once, the kernel loads it)
SHAPES = ((1, 48, 8, 40), (37, 70, 5, 45), (130, 96, 20, 200), (3, 33, 64, 17), (300, 70, 12, 45))


def _factors(m, k, r, n, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    down = torch.randn(r, k, generator=g) / k**0.5
    up = torch.randn(n, r, generator=g) / r**0.5
    bias = torch.randn(n, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (x, down, up, bias)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(device, close_to_truth, dtype, shape):
    x, down, up, bias = _factors(*shape, dtype, device)
    out = K.lowrank_linear(x, down, up, bias)
    ref = K.lowrank_linear_ref(x, down, up, bias)
    truth = K.lowrank_linear_ref(x.double(), down.double(), up.double(), bias.double())
    close_to_truth(out, ref, truth, f"{dtype} {shape}")
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("epilogue", ["silu,mul", "gelu,add", "gelu_tanh", "relu,add,mul"])
def test_fused_epilogue(device, close_to_truth, dtype, epilogue):
    x, down, up, bias = _factors(37, 70, 12, 45, dtype, device, seed=1)
    n_aux = epilogue.count("mul") + epilogue.count("add")
    g = torch.Generator().manual_seed(2)
    aux = [torch.randn(37, 45, generator=g).to(device=device, dtype=dtype) for _ in range(n_aux)]
    out = K.lowrank_linear(x, down, up, bias, epilogue, aux)
    ref = K.lowrank_linear_ref(x, down, up, bias, epilogue, aux)
    truth = K.lowrank_linear_ref(x.double(), down.double(), up.double(), bias.double(), epilogue, [a.double() for a in aux])
    close_to_truth(out, ref, truth, f"{dtype} {epilogue}")


@pytest.mark.parametrize("rank", [6, 100], ids=lambda r: f"r{r}")
def test_prefill_rows_take_the_t_given_variant(device, close_to_truth, rank):
    """From T_GIVEN_ROWS rows on, t is one matmul and the kernel runs t·upᵀ as a GEMM over the rank
    (r = 100: two chunks of the default BK = 64, the second ragged); fused epilogue kept."""
    m = K.T_GIVEN_ROWS + 3
    x, down, up, bias = _factors(m, 40, rank, 24, torch.float16, device, seed=3)
    aux = [torch.randn(m, 24).to(device=device, dtype=torch.float16)]
    out = K.lowrank_linear(x, down, up, bias, "silu,mul", aux)
    ref = K.lowrank_linear_ref(x, down, up, bias, "silu,mul", aux)
    truth = K.lowrank_linear_ref(x.double(), down.double(), up.double(), bias.double(), "silu,mul", [aux[0].double()])
    close_to_truth(out, ref, truth, "t given")
    assert "if T_GIVEN:" in K.kernel().source


def test_first_product_given_from_prefill_rows_or_a_big_down():
    assert not K.first_product_given(1, 576, 64)  # decode, small down: each program computes its t
    assert K.first_product_given(K.T_GIVEN_ROWS, 576, 64)
    assert K.first_product_given(1, 4096, 256)  # 2^20 elements of down: one cuBLAS t, then the GEMM


def test_leading_dims_and_no_bias(device):
    x, down, up, _ = _factors(12, 40, 6, 24, torch.float32, device)
    x3 = x.view(3, 4, 40)
    out = K.lowrank_linear(x3, down, up, None)
    assert out.shape == (3, 4, 24)
    torch.testing.assert_close(out, K.lowrank_linear_ref(x3, down, up), rtol=1e-5, atol=1e-5)


def test_bad_arguments_name_the_problem(device):
    x, down, up, bias = _factors(4, 40, 6, 24, torch.float32, device)
    with pytest.raises(KernelError, match=r"down \(r, 30\)"):
        K.lowrank_linear(x[:, :30], down, up, bias)
    with pytest.raises(KernelError, match="float16"):
        K.lowrank_linear(x, down.half(), up, bias)
    with pytest.raises(KernelError, match="auxiliary"):
        K.lowrank_linear(x, down, up, bias, "mul", [])
    big = torch.zeros(300, 40, device=device)
    assert not K.supports(x, big)
    with pytest.raises(KernelError, match="on-chip"):
        K.lowrank_linear(x, big, torch.zeros(24, 300, device=device))
