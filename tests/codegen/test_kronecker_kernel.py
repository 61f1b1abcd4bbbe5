"""The Kronecker-sum kernel (a token's input held as a matrix, both small products on chip) against
its reference and the dense matrix the factors stand for; the module calling it and the fusion pass
folding an epilogue into it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from codegen import dispatch
from codegen.kernels import kronecker as K
from codegen.kernels.common import KernelError
from passes.kronecker import KroneckerLinear, kronecker_dense, kronecker_forward

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (rows, in, out, a_out, a_in, b_out, b_in, terms): square and rectangular factors, padded input
# (in < a_in·b_in), cropped output, factor sides below 16 (padded tiles), several terms
SHAPES = (
    (1, 64, 64, 8, 8, 8, 8, 1), (3, 70, 45, 5, 9, 9, 8, 2), (37, 256, 192, 12, 16, 16, 16, 3),
    (4, 600, 500, 20, 25, 25, 24, 2), (2, 32, 64, 4, 2, 16, 16, 1),
)  # fmt: skip


def _factors(m, inn, out, a_out, a_in, b_out, b_in, r, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, a_out, a_in, generator=g) / a_in**0.5
    B = torch.randn(r, b_out, b_in, generator=g) / b_in**0.5
    x, bias = torch.randn(m, inn, generator=g), torch.randn(out, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (x, A, B, bias)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(device, close_to_truth, dtype, shape):
    inn, out = shape[1], shape[2]
    x, A, B, bias = _factors(*shape, dtype, device)
    y = K.kronecker_linear(x, A, B, out, bias)
    ref = K.kronecker_linear_ref(x, A, B, out, bias)
    truth = x.double() @ kronecker_dense(A.double(), B.double(), out, inn).T + bias.double()
    close_to_truth(y, ref, truth, f"{dtype} {shape}")


def test_reference_is_the_layout_of_passes_kronecker():
    x, A, B, bias = _factors(5, 70, 45, 5, 9, 9, 8, 2, torch.float64, "cpu")
    torch.testing.assert_close(K.kronecker_linear_ref(x, A, B, 45, bias), kronecker_forward(x, A, B, 45, bias))


@pytest.mark.parametrize("epilogue", ["silu,mul", "add"])
def test_fused_epilogue(device, close_to_truth, epilogue):
    x, A, B, bias = _factors(9, 64, 48, 6, 8, 8, 8, 2, torch.float16, device, seed=4)
    aux = [torch.randn(9, 48, generator=torch.Generator().manual_seed(5)).to(device=device, dtype=torch.float16)]
    y = K.kronecker_linear(x, A, B, 48, bias, epilogue, aux)
    ref = K.kronecker_linear_ref(x, A, B, 48, bias, epilogue, aux)
    truth = K.kronecker_linear_ref(x.double(), A.double(), B.double(), 48, bias.double(), epilogue, [aux[0].double()])
    close_to_truth(y, ref, truth, epilogue)


def test_bad_arguments_and_factors_past_the_register_tile(device):
    x, A, B, _ = _factors(2, 64, 64, 8, 8, 8, 8, 1, torch.float32, device)
    with pytest.raises(KernelError, match="cover"):
        K.kronecker_linear(x, A, B, 65)
    with pytest.raises(KernelError, match="A is torch.float16"):
        K.kronecker_linear(x, A.half(), B, 64)
    big_a, big_b = torch.zeros(1, 4, 128, device=device), torch.zeros(1, 4, 128, device=device)
    assert not K.supports(big_a, big_b)
    with pytest.raises(KernelError, match="register tile"):
        K.kronecker_linear(torch.zeros(1, 128 * 128, device=device), big_a, big_b, 16)


def _module(out=48, inn=40, seed=0):
    _, A, B, bias = _factors(1, inn, out, 6, 5, 8, 8, 2, torch.float32, "cpu", seed)
    return KroneckerLinear(nn.Parameter(A), nn.Parameter(B), nn.Parameter(bias), out, inn)


def test_module_calls_the_kernel(device):
    module = _module().eval().to(device)
    x = torch.randn(2, 3, 40, device=device)
    with torch.no_grad():
        with dispatch.force_kernels(False):
            eager = module(x)
        with dispatch.force_kernels():
            torch.testing.assert_close(module(x), eager, rtol=1e-5, atol=1e-5)


def test_swiglu_tail_is_fused_into_the_kernel(device, gated_tail_fused):
    gated_tail_fused(_module(48, 40, seed=2), _module(48, 40, seed=3), torch.randn(2, 5, 40, device=device), "kronecker_linear")
