"""The LLM.int8() kernels (a prologue quantizing the activations per token, then an int8 × int8 →
int32 GEMM with the fp32 outlier columns) against the module's torch code, which they must
reproduce: the same integer product, the same rounding of the activations (half to even), the same
scaling order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from codegen import dispatch
from codegen.kernels import int8_outlier as K
from codegen.kernels.common import KernelError
from passes import quant_formats as qf
from passes.int8_outlier import Int8OutlierConfig, Int8OutlierLinear, Int8OutlierWeight

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _weight(out, inn, outliers, dtype=torch.float32, seed=0) -> Int8OutlierWeight:
    config = Int8OutlierConfig()
    w = torch.randn(out, inn, generator=torch.Generator().manual_seed(seed)) * 0.05
    return Int8OutlierWeight(config, (out, inn), dtype, config.encode(w, torch.tensor(outliers, dtype=torch.long)))


def _inputs(m, inn, outliers, dtype, device, seed=1):
    x = torch.randn(m, inn, generator=torch.Generator().manual_seed(seed))
    x[:, outliers] *= 40
    if m > 2:  # a row on the rounding boundaries: absmax 127 → s_x = 1, so x/s_x = x; halves round to even
        x[1] = 0.0
        x[1, : min(inn, 8)] = torch.tensor([127.0, 2.5, -0.5, 3.5, -126.5, 0.5, 1.5, -2.5])[: min(inn, 8)]
        x[1, outliers] = 0.0
        x[2] = 0.0  # an all-zero row: s_x = 0, no division by zero
    return x.to(device=device, dtype=dtype)


def _buffers(pw, device):
    pw = pw.to(device)
    return pw.codes, pw.scale, pw.input_index, pw.outlier_columns, pw.outlier_weight


# (rows, in, out, outlier columns): decode and prefill rows, inner sizes off the tile, none or several outliers
SHAPES = ((1, 64, 48, [3]), (5, 200, 72, [7, 100, 150]), (37, 130, 96, []), (3, 256, 64, [0, 255]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}o{len(s[3])}")
def test_matches_the_modules_torch_code(device, close_to_truth, dtype, shape):
    m, inn, out, outliers = shape
    pw = _weight(out, inn, outliers)
    bias = torch.randn(out, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
    x = _inputs(m, inn, outliers, dtype, device)
    bufs = _buffers(pw, device)
    y = K.int8_outlier_linear(x, *bufs, bias)
    ref = K.int8_outlier_linear_ref(x, *bufs, bias)
    if dtype == torch.float32:  # same integers, same roundings: equal up to the outlier sum's order
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    else:  # one rounding to fp16/bf16 at the end vs the reference's; against its fp32 evaluation
        close_to_truth(y, ref, K.int8_outlier_linear_ref(x.double(), *bufs, bias.double()), f"{dtype} {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}o{len(s[3])}")
def test_prologue_quantizes_as_the_modules_torch_code(device, dtype, shape):
    """q and s_x equal ``int8_rowwise`` of the gathered columns bit for bit (the rounding-boundary and
    all-zero rows included); the outlier columns are copied exactly."""
    m, inn, out, outliers = shape
    _, _, index, outl, _ = _buffers(_weight(out, inn, outliers), device)
    x = _inputs(m, inn, outliers, dtype, device)
    q, sx, xo = K.quantize_activations(x, index, outl)
    q_ref, sx_ref = qf.int8_rowwise(x.index_select(1, index))
    assert q.dtype == torch.int8 and q.shape == (m, index.numel()) and q.is_contiguous()
    assert torch.equal(q, q_ref) and torch.equal(sx, sx_ref)
    assert torch.equal(xo, x.index_select(1, outl).float())
    if m > 2 and not set(outliers) & set(range(8)):  # the boundary row: s_x = 1, halves to even
        assert sx[1] == 1.0 and q[1, :8].tolist() == [127, 2, 0, 4, -126, 0, 2, -2]
    if m > 2:  # the all-zero row: s_x = 0, q = 0
        assert sx[2] == 0.0 and not q[2].any()


def test_reference_is_the_modules_torch_code():
    pw = _weight(72, 200, [7, 100, 150])
    x = _inputs(5, 200, [7, 100, 150], torch.float32, "cpu")
    bias = torch.randn(72)
    with dispatch.force_kernels(False):
        module = pw.linear(x, bias)
    assert torch.equal(K.int8_outlier_linear_ref(x, *_buffers(pw, "cpu"), bias), module)


@pytest.mark.parametrize("epilogue", ["silu,mul", "add"])
def test_fused_epilogue(device, epilogue):
    pw = _weight(48, 96, [5, 50])
    x = _inputs(9, 96, [5, 50], torch.float32, device)
    aux = [torch.randn(9, 48, generator=torch.Generator().manual_seed(5)).to(device)]
    bufs = _buffers(pw, device)
    torch.testing.assert_close(
        K.int8_outlier_linear(x, *bufs, None, epilogue, aux), K.int8_outlier_linear_ref(x, *bufs, None, epilogue, aux),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip


def test_bad_buffers_say_what_is_expected(device):
    codes, scale, index, outl, outw = _buffers(_weight(48, 96, [5]), device)
    x = torch.randn(2, 96, device=device)
    with pytest.raises(KernelError, match="int8 codes"):
        K.int8_outlier_linear(x, codes.float(), scale, index, outl, outw)
    with pytest.raises(KernelError, match="outlier_weight must be"):
        K.int8_outlier_linear(x, codes, scale, index, outl, outw[:, :0])


def _linear(out, inn, outliers, seed):
    return Int8OutlierLinear(_weight(out, inn, outliers, seed=seed), nn.Parameter(torch.randn(out) * 0.1))


def test_module_calls_the_kernel(device, monkeypatch):
    layer = _linear(48, 96, [5, 50], 0).eval().to(device)
    x = _inputs(4, 96, [5, 50], torch.float32, device)
    with torch.no_grad():
        with dispatch.force_kernels(False):
            eager = layer(x)
        calls = []
        real = K.int8_outlier_linear
        monkeypatch.setattr(K, "int8_outlier_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
        with dispatch.force_kernels():
            torch.testing.assert_close(layer(x), eager, rtol=1e-5, atol=1e-5)
    assert calls or device == "cuda"  # on CPU the op's host twin runs the kernel in the interpreter


def test_swiglu_tail_is_fused_into_the_kernel(device, gated_tail_fused):
    gated_tail_fused(
        _linear(48, 40, [3], 2),
        _linear(48, 40, [3], 3),
        _inputs(6, 40, [3], torch.float32, device).reshape(2, 3, 40),
        "int8_outlier_linear",
    )
