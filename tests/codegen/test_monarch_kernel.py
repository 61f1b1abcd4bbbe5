"""The Monarch kernels (the permutation fused into stage 1's store, rows first or last) against
their reference and against the dense matrix the factors stand for."""

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


@pytest.mark.parametrize("config", K.STAGE1_BLOCKED_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_every_blocked_stage1_config(device, close_to_truth, monkeypatch, config):
    """Each config the tuner may pick for the blocked stage 1 computes the same product: 16 blocks of
    63 padded inputs (1000 features: several p steps for the small tiles, a ragged last one, the
    zero padding), 37 rows (a ragged row block)."""
    if device == "cuda":
        pytest.skip("the GPU tunes over these configs itself; the interpreter runs one at a time")
    import dataclasses

    kernel = dataclasses.replace(K.stage1_blocked_kernel(), configs=(config,))
    monkeypatch.setattr(K, "stage1_blocked_kernel", lambda: kernel)
    x, L, R, bias = _factors(37, 1000, 256, 16, 1, torch.float16, device)
    assert K.blocked(R)
    truth = x.double() @ _dense(L.double(), R.double(), 256, 1000).T + bias.double()
    close_to_truth(K.monarch_linear(x, L, R, 256, bias), K.monarch_linear_ref(x, L, R, 256, bias), truth, str(config))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[0] > K.GEMV_MAX_ROWS], ids=lambda s: "x".join(map(str, s)))
def test_rows_last_intermediate(device, close_to_truth, monkeypatch, dtype, shape):
    """``INTERMEDIATE = "rows_last"``: stage 1 stores ``g[i, j·k + t, n]``, stage 2 reads it transposed."""
    monkeypatch.setattr(K, "INTERMEDIATE", "rows_last")
    _, inn, out, _, _ = shape
    x, L, R, bias = _factors(*shape, dtype, device, seed=3)
    truth = x.double() @ _dense(L.double(), R.double(), out, inn).T + bias.double()
    close_to_truth(K.monarch_linear(x, L, R, out, bias), K.monarch_linear_ref(x, L, R, out, bias), truth, f"{dtype} {shape}")


@pytest.mark.parametrize("rank", [1, 2])
def test_stage1_layouts_hold_the_reference_regrouping(device, rank):
    """Both layouts of stage 1's output are the reference's regrouped ``g`` (``(b, b·k, n)``, rows last),
    one with the rows moved first — so stage 2 reads the same values either way."""
    x, _, R, _ = _factors(21, 300, 260, 16, rank, torch.float32, device, seed=8)
    b, kb, p = R.shape
    h = torch.bmm(R, torch.nn.functional.pad(x, (0, b * p - 300)).reshape(21, b, p).permute(1, 2, 0))
    g = h.reshape(b, rank, b, 21).permute(2, 0, 1, 3).reshape(b, kb, 21)  # monarch_linear_ref's regrouping
    torch.testing.assert_close(K.stage1(x, R, rows_last=True), g, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(K.stage1(x, R).reshape(21, b, kb), g.permute(2, 0, 1), rtol=1e-5, atol=1e-5)


def test_reference_is_the_layout_of_passes_monarch():
    monarch = pytest.importorskip("passes.monarch")
    x, L, R, bias = _factors(5, 70, 45, 4, 2, torch.float32, "cpu")
    torch.testing.assert_close(K.monarch_linear_ref(x, L, R, 45, bias), monarch.monarch_forward(x, L, R, 45, bias))


@pytest.mark.parametrize("rows, intermediate", [(13, "rows_first"), (2, "rows_first"), (13, "rows_last")],
                         ids=["two-stage", "gemv", "two-stage-rows-last"])  # fmt: skip
@pytest.mark.parametrize("epilogue", ["silu,mul", "add"])
def test_fused_epilogue(device, close_to_truth, monkeypatch, epilogue, rows, intermediate):
    monkeypatch.setattr(K, "INTERMEDIATE", intermediate)
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
    for name in ("gemv_kernel", "stage1_kernel", "stage1_blocked_kernel", "stage2_kernel"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _n=name, _r=real: launched.append(_n) or _r(*a))
    x, L, R, bias = _factors(rows, 64, 64, 8, 1, torch.float32, device)
    torch.testing.assert_close(K.monarch_linear(x, L, R, 64, bias), K.monarch_linear_ref(x, L, R, 64, bias), rtol=1e-5, atol=1e-5)
    assert launched == (["gemv_kernel"] if rows <= K.GEMV_MAX_ROWS else ["stage1_kernel", "stage2_kernel"])


@pytest.mark.parametrize(
    "blocks, rank, intermediate, stage1",
    [(16, 1, "rows_first", "stage1_blocked_kernel"), (32, 1, "rows_first", "stage1_blocked_kernel"),
     (8, 1, "rows_first", "stage1_kernel"), (16, 2, "rows_first", "stage1_kernel"), (16, 1, "rows_last", "stage1_kernel")],
)  # fmt: skip
def test_stage1_choice(device, monkeypatch, blocks, rank, intermediate, stage1):
    """Rows first, rank-1 factors with ≥ BLOCKED_MIN_BLOCKS blocks take the blocked stage 1 (stores in
    runs of 16 input blocks), others the per-block one; rows last, every factor the per-block one."""
    monkeypatch.setattr(K, "INTERMEDIATE", intermediate)
    launched = []
    for name in ("stage1_kernel", "stage1_blocked_kernel"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _n=name, _r=real: launched.append(_n) or _r(*a))
    x, L, R, bias = _factors(24, 300, 260, blocks, rank, torch.float32, device, seed=7)
    y = K.monarch_linear(x, L, R, 260, bias)
    torch.testing.assert_close(y, K.monarch_linear_ref(x, L, R, 260, bias), rtol=1e-5, atol=1e-5)
    assert launched == [stage1]


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
