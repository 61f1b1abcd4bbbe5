"""The Monarch kernels (one launch for decode; two stages, the permutation fused into stage 1's
store) against their reference and against the dense matrix the factors stand for."""

from __future__ import annotations

import pytest
import torch

from codegen.kernels import monarch as K
from codegen.kernels.common import KernelError

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (rows, in, out, blocks, rank): square √n, ragged in/out (padding, cropping), rank > 1; up to
# GEMV_MAX_ROWS rows the one-launch decode kernel runs, beyond it the two stages
SHAPES = (
    (1, 64, 64, 8, 1), (3, 70, 45, 4, 2), (4, 100, 120, 8, 3), (2, 256, 256, 16, 1),
    (37, 70, 45, 4, 2), (9, 100, 120, 8, 3), (20, 256, 256, 16, 1), (33, 500, 300, 32, 1),
)  # fmt: skip


def _factors(m, inn, out, b, k, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    p, s = -(-inn // b), -(-out // b)
    L = torch.randn(b, s, b * k, generator=g) / (b * k) ** 0.5
    R = torch.randn(b, k * b, p, generator=g) / p**0.5
    x = torch.randn(m, inn, generator=g)
    bias = torch.randn(out, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (x, L, R, bias)]


def _dense(L, R, out, inn):
    b, kb, p = R.shape
    k, s = kb // b, L.shape[1]
    w = torch.einsum("iajt,jtic->iajc", L.reshape(b, s, b, k), R.reshape(b, k, b, p))
    return w.reshape(b * s, b * p)[:out, :inn]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(device, close_to_truth, dtype, shape):
    _, inn, out, _, _ = shape
    x, L, R, bias = _factors(*shape, dtype, device)
    y = K.monarch_linear(x, L, R, out, bias)
    ref = K.monarch_linear_ref(x, L, R, out, bias)
    truth = x.double() @ _dense(L.double(), R.double(), out, inn).T + bias.double()
    close_to_truth(y, ref, truth, f"{dtype} {shape}")


STAGE_CONFIGS = [("stage1_kernel", c) for c in K.STAGE1_CONFIGS] + [("stage2_kernel", c) for c in K.STAGE2_CONFIGS]


@pytest.mark.parametrize(
    "stage, config", STAGE_CONFIGS, ids=[f"{s[:6]}-" + "-".join(f"{k}{v}" for k, v in c.items()) for s, c in STAGE_CONFIGS]
)
def test_every_stage_config(device, close_to_truth, monkeypatch, stage, config):
    """Each config the tuner may pick for either stage computes the same product: 16 blocks of 63
    padded inputs (1000 features: several p steps for BP 32, the zero padding), 37 rows (a ragged
    row tile, the padding rows of the intermediate), rank 2 (BC 32 column tiles across terms)."""
    if device == "cuda":
        pytest.skip("the GPU tunes over these configs itself; the interpreter runs one at a time")
    import dataclasses

    kernel = dataclasses.replace(getattr(K, stage)(), configs=(config,))
    monkeypatch.setattr(K, stage, lambda *ep: kernel)
    x, L, R, bias = _factors(37, 1000, 300, 16, 2, torch.float16, device)
    truth = x.double() @ _dense(L.double(), R.double(), 300, 1000).T + bias.double()
    close_to_truth(K.monarch_linear(x, L, R, 300, bias), K.monarch_linear_ref(x, L, R, 300, bias), truth, str(config))


@pytest.mark.parametrize("rank", [1, 2])
def test_stage1_is_the_reference_regrouping(device, rank):
    """Stage 1's output is the reference's regrouped ``g`` (``(b, b·k, n)``, rows last) in a buffer
    whose rows are padded to 16; the padding rows hold zeros."""
    x, _, R, _ = _factors(21, 300, 260, 16, rank, torch.float32, device, seed=8)
    b, kb, p = R.shape
    h = torch.bmm(R, torch.nn.functional.pad(x, (0, b * p - 300)).reshape(21, b, p).permute(1, 2, 0))
    g = h.reshape(b, rank, b, 21).permute(2, 0, 1, 3).reshape(b, kb, 21)  # monarch_linear_ref's regrouping
    out = K.stage1(x, R)
    torch.testing.assert_close(out, g, rtol=1e-5, atol=1e-5)
    assert out.stride() == (kb * 32, 32, 1)
    padding = out.as_strided((b, kb, 11), out.stride(), out.storage_offset() + 21)
    assert torch.equal(padding, torch.zeros_like(padding))


def test_reference_is_the_layout_of_passes_monarch():
    monarch = pytest.importorskip("passes.monarch")
    x, L, R, bias = _factors(5, 70, 45, 4, 2, torch.float32, "cpu")
    torch.testing.assert_close(K.monarch_linear_ref(x, L, R, 45, bias), monarch.monarch_forward(x, L, R, 45, bias))


@pytest.mark.parametrize("rows", [13, 2], ids=["two-stage", "gemv"])
@pytest.mark.parametrize("epilogue", ["silu,mul", "add"])
def test_fused_epilogue(device, close_to_truth, epilogue, rows):
    x, L, R, bias = _factors(rows, 64, 48, 8, 2, torch.float16, device, seed=4)
    aux = [torch.randn(rows, 48, generator=torch.Generator().manual_seed(5)).to(device=device, dtype=torch.float16)]
    y = K.monarch_linear(x, L, R, 48, bias, epilogue, aux)
    ref = K.monarch_linear_ref(x, L, R, 48, bias, epilogue, aux)
    truth = K.monarch_linear_ref(x.double(), L.double(), R.double(), 48, bias.double(), epilogue, [aux[0].double()])
    close_to_truth(y, ref, truth, epilogue)


@pytest.mark.parametrize("rows", [1, K.GEMV_MAX_ROWS, K.GEMV_MAX_ROWS + 1])
def test_decode_takes_one_launch(device, monkeypatch, rows):
    """Up to ``GEMV_MAX_ROWS`` rows one kernel runs and no intermediate is allocated; beyond, the two stages."""
    launched = []
    for name in ("gemv_kernel", "stage1_kernel", "stage2_kernel"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _n=name, _r=real: launched.append(_n) or _r(*a))
    x, L, R, bias = _factors(rows, 64, 64, 8, 1, torch.float32, device)
    torch.testing.assert_close(K.monarch_linear(x, L, R, 64, bias), K.monarch_linear_ref(x, L, R, 64, bias), rtol=1e-5, atol=1e-5)
    assert launched == (["gemv_kernel"] if rows <= K.GEMV_MAX_ROWS else ["stage1_kernel", "stage2_kernel"])


def test_bad_factors(device):
    x, L, R, bias = _factors(2, 64, 64, 8, 1, torch.float32, device)
    with pytest.raises(KernelError, match="disagree"):
        K.monarch_linear(x, L[:, :, :4], R, 64, bias)
    with pytest.raises(KernelError, match="cover"):
        K.monarch_linear(x, L, R, 100, None)


def test_module_calls_the_kernel(device, monkeypatch):
    """``MonarchLinear`` goes through ``decomp::monarch_linear`` when kernels are on, with eager's result."""
    monarch = pytest.importorskip("passes.monarch")
    from torch import nn

    from codegen import dispatch

    calls = []
    real = dispatch.monarch_linear
    monkeypatch.setattr(dispatch, "monarch_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, L, R, bias = _factors(5, 70, 45, 4, 2, torch.float32, device)
    module = monarch.MonarchLinear(nn.Parameter(L), nn.Parameter(R), nn.Parameter(bias), 45, 70)
    with torch.no_grad():
        with dispatch.force_kernels(False):
            eager = module(x)
        with dispatch.force_kernels(True):
            fused = module(x)
    assert len(calls) == 1
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
