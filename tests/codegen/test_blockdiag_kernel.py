"""The block-diagonal kernel (input permutation fused into its loads, output permutation into its
store) against its reference and the dense matrix the blocks stand for; the module calling it, and
the fusion pass folding an epilogue into it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from codegen import dispatch
from codegen.kernels import blockdiag as K
from codegen.kernels.common import KernelError
from passes.blockdiag import BlockDiagLinear, _output_positions, blockdiag_dense, blockdiag_forward

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (rows, in, out, blocks, permuted): decode and prefill rows, ragged in/out (padding, dropped rows)
# (37 and 33 rows: past GATHER_MAX_M, the wrapper gathers the input first, with and without padding)
SHAPES = ((1, 64, 64, 4, True), (3, 70, 45, 4, True), (37, 100, 120, 8, True), (20, 256, 200, 2, False), (5, 23, 19, 4, True),
          (33, 64, 48, 4, True))  # fmt: skip


def _blocks(m, inn, out, b, permuted, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, p = -(-out // b), -(-inn // b)
    blocks = torch.randn(b, s, p, generator=g) / p**0.5
    in_index = torch.randperm(b * p, generator=g).int() if permuted else None
    out_index = torch.randperm(b * s, generator=g)[:out].int() if permuted else None
    x = torch.randn(m, inn, generator=g)
    bias = torch.randn(out, generator=g)
    move = lambda t: None if t is None else t.to(device)
    out_pos = move(_output_positions(out_index, b * s))
    x, blocks, bias = (t.to(device=device, dtype=dtype) for t in (x, blocks, bias))
    return x, blocks, move(in_index), move(out_index), out_pos, bias


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(device, close_to_truth, dtype, shape):
    _, inn, out, _, _ = shape
    x, blocks, in_index, out_index, out_pos, bias = _blocks(*shape, dtype, device)
    y = K.blockdiag_linear(x, blocks, out, in_index, out_pos, bias)
    ref = K.blockdiag_linear_ref(x, blocks, out, in_index, out_pos, bias)
    w = blockdiag_dense(blocks.double().cpu(), out, inn, *(None if t is None else t.cpu() for t in (in_index, out_index)))
    truth = x.double() @ w.to(device).T + bias.double()
    close_to_truth(y, ref, truth, f"{dtype} {shape}")


@pytest.mark.parametrize("shape", [(37, 100, 120, 8, True), (33, 64, 48, 4, True)], ids=lambda s: "x".join(map(str, s)))
def test_gather_in_the_loads_and_gather_first_agree(device, monkeypatch, shape):
    """Prefill rows: the gather-first path (default) and the in-kernel gather give the same output."""
    _, _, out, _, _ = shape
    x, blocks, in_index, _, out_pos, bias = _blocks(*shape, torch.float32, device)
    first = K.blockdiag_linear(x, blocks, out, in_index, out_pos, bias)
    monkeypatch.setattr(K, "GATHER_MAX_M", 10**6)
    in_loads = K.blockdiag_linear(x, blocks, out, in_index, out_pos, bias)
    torch.testing.assert_close(first, in_loads, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first, K.blockdiag_linear_ref(x, blocks, out, in_index, out_pos, bias), rtol=1e-5, atol=1e-5)


def test_reference_is_the_layout_of_passes_blockdiag():
    x, blocks, in_index, out_index, out_pos, bias = _blocks(5, 70, 45, 4, True, torch.float64, "cpu")
    torch.testing.assert_close(
        K.blockdiag_linear_ref(x, blocks, 45, in_index, out_pos, bias),
        blockdiag_forward(x, blocks, 45, in_index, out_index, bias),
    )


def test_reference_has_no_data_dependent_shapes():
    """The torch path is what the CUDA operator runs past KERNEL_MAX_M rows: inside a CUDA graph
    (reduce-overhead prefill) a data-dependent op (``nonzero``) is a host sync that fails the
    capture (H100, run 8). Under fake tensors such an op raises; the reference must not."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, blocks, in_index, _, out_pos, bias = _blocks(37, 100, 120, 8, True, torch.float32, "cpu")
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (x, blocks, in_index, out_pos, bias)]
        assert K.blockdiag_linear_ref(fake[0], fake[1], 120, *fake[2:]).shape == (37, 120)


@pytest.mark.parametrize("epilogue", ["silu,mul", "add"])
def test_fused_epilogue(device, close_to_truth, epilogue):
    x, blocks, in_index, _, out_pos, bias = _blocks(9, 64, 48, 4, True, torch.float16, device, seed=4)
    aux = [torch.randn(9, 48, generator=torch.Generator().manual_seed(5)).to(device=device, dtype=torch.float16)]
    y = K.blockdiag_linear(x, blocks, 48, in_index, out_pos, bias, epilogue, aux)
    ref = K.blockdiag_linear_ref(x, blocks, 48, in_index, out_pos, bias, epilogue, aux)
    truth = K.blockdiag_linear_ref(x.double(), blocks.double(), 48, in_index, out_pos, bias.double(), epilogue, [aux[0].double()])
    close_to_truth(y, ref, truth, epilogue)


def test_bad_arguments_say_what_is_expected(device):
    x, blocks, in_index, _, out_pos, _ = _blocks(2, 64, 64, 4, True, torch.float32, device)
    with pytest.raises(KernelError, match="in_index must be int32"):
        K.blockdiag_linear(x, blocks, 64, in_index.long(), out_pos)
    with pytest.raises(KernelError, match="cover"):
        K.blockdiag_linear(x, blocks, 65, in_index, out_pos)
    with pytest.raises(KernelError, match="blocks is torch.float16"):
        K.blockdiag_linear(x, blocks.half(), 64, in_index, out_pos)


def _module(out=48, inn=40, b=4, seed=0):
    _, blocks, in_index, out_index, _, bias = _blocks(1, inn, out, b, True, torch.float32, "cpu", seed)
    return BlockDiagLinear(nn.Parameter(blocks), nn.Parameter(bias), out, inn, in_index, out_index)


def test_module_calls_the_kernel_and_keeps_its_output_positions_through_a_reload(device):
    torch.manual_seed(0)
    module = _module().eval().to(device)
    x = torch.randn(2, 3, 40, device=device)
    with torch.no_grad():
        with dispatch.force_kernels(False):
            eager = module(x)
        with dispatch.force_kernels():
            kernel = module(x)
        torch.testing.assert_close(kernel, eager, rtol=1e-5, atol=1e-5)
        assert "out_pos" not in module.state_dict()  # derived from out_index, not stored
        fresh = _module(seed=1).to(device)  # other indices; loading must re-derive the positions
        fresh.load_state_dict(module.state_dict())
        with dispatch.force_kernels():
            torch.testing.assert_close(fresh(x), eager, rtol=1e-5, atol=1e-5)


def test_swiglu_tail_is_fused_into_the_kernel(device, gated_tail_fused):
    gated_tail_fused(_module(48, 40, seed=2), _module(48, 40, seed=3), torch.randn(2, 5, 40, device=device), "blockdiag_linear")


def test_cuda_operator_runs_the_kernel_up_to_kernel_max_m_rows_only(monkeypatch):
    """On CUDA the operator takes the kernel at decode rows and the torch path past KERNEL_MAX_M
    (measured faster there); both give the module's result."""
    from codegen import ops

    calls = []
    monkeypatch.setattr(ops, "_on_gpu", lambda x: True)  # CPU tensors take the CUDA branch
    for name in ("blockdiag_linear", "blockdiag_linear_ref"):
        real = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    module = _module().eval()
    for rows in (K.KERNEL_MAX_M, K.KERNEL_MAX_M + 1):
        x = torch.randn(rows, 40)
        with torch.no_grad():
            with dispatch.force_kernels(False):
                eager = module(x)
            y = torch.ops.decomp.blockdiag_linear(x, module.blocks, 48, module.in_index, module.out_pos, module.bias, "", [])
        torch.testing.assert_close(y, eager, rtol=1e-5, atol=1e-5)
    assert calls == ["blockdiag_linear", "blockdiag_linear_ref"]
