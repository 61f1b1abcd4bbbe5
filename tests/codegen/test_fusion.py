"""Epilogue fusion over captured graphs: what is matched (counts), what is left alone, and that the
fused graph — and ``torch.compile(backend="decomp")`` through it — computes what eager does."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import codegen.fusion
import passes
from codegen import dispatch
from codegen.fusion import fuse_epilogues
from passes.lowrank import LowRankLinear
from passes.quant_storage import IntNConfig, PackedWeight, QuantizedLinear


def _lowrank(out, inn, r, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LowRankLinear(
        nn.Parameter(torch.randn(r, inn, generator=g) / inn**0.5),
        nn.Parameter(torch.randn(out, r, generator=g) / r**0.5),
        nn.Parameter(torch.randn(out, generator=g)) if bias else None,
    )


def _quantized(out, inn, seed=0):
    config = IntNConfig(4, 32)
    w = torch.randn(out, inn, generator=torch.Generator().manual_seed(seed))
    return QuantizedLinear(PackedWeight(config, (out, inn), torch.float32, config.encode(w)), None)


class SwiGLUBlock(nn.Module):
    """A Llama MLP with its residual, every projection rewritten: the chains the pass must find."""

    def __init__(self, d=48, hidden=96):
        super().__init__()
        self.gate, self.up = (_lowrank(hidden, d, 8, False, 1), _lowrank(hidden, d, 8, False, 2))
        self.down = _quantized(d, hidden, 3)

    def forward(self, x):
        return x + self.down(F.silu(self.gate(x)) * self.up(x))


def test_swiglu_and_residual_chains_become_one_kernel_each(device, compile_fused, count_calls):
    torch.manual_seed(0)
    model = SwiGLUBlock().eval().to(device)
    x = torch.randn(2, 5, 48, device=device)
    fused, (ops_before, report, gm) = compile_fused(model, x)
    assert ops_before == {"decomp.lowrank_linear": 2, "decomp.quant_linear": 1}
    # gate → silu → ·up is one kernel, down → +x another: silu, mul and add no longer launch
    assert [(f.op, f.steps) for f in report.fused] == [("lowrank_linear", ("silu", "mul")), ("quant_linear", ("add",))]
    assert report.kernels_removed == 3 and report.round_trips_avoided == 3
    assert count_calls(gm, "silu") == 0 and count_calls(gm, "mul") == 0 and count_calls(gm, "add") == 0
    with torch.no_grad(), dispatch.force_kernels(False):
        eager = model(x)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


def test_unfusable_tails_are_left_alone():
    """A second user of the linear's output, a broadcast operand or a scalar stop the chain."""

    def f(x, down, up, vec):
        y = torch.ops.decomp.lowrank_linear(x, down, up, None, "", [])
        z = torch.ops.decomp.lowrank_linear(x, down, up, None, "", [])
        w = torch.ops.decomp.lowrank_linear(x, down, up, None, "", [])
        return F.silu(y) + y, z * vec, w * 2.0

    import codegen.ops  # noqa: F401

    gm = fx.symbolic_trace(f)
    args = (torch.randn(4, 16), torch.randn(3, 16), torch.randn(8, 3), torch.randn(8))
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(*args)
    before = gm(*args)
    report = fuse_epilogues(gm)
    assert report.fused == []
    for a, b in zip(gm(*args), before):
        torch.testing.assert_close(a, b)


def test_backend_fuses_and_matches_eager(device, monkeypatch):
    """``torch.compile(model, backend="decomp")`` of a rewritten model: the fused kernels run
    (the interpreter on CPU) and the result equals eager."""
    reports = []
    real = codegen.fusion.fuse_epilogues
    monkeypatch.setattr(codegen.fusion, "fuse_epilogues", lambda gm, **kw: reports.append(real(gm, **kw)) or reports[-1])
    torch.manual_seed(0)
    model = SwiGLUBlock().eval().to(device)
    x = torch.randn(3, 48, device=device)
    with torch.no_grad():
        eager = model(x)
        with dispatch.force_kernels():
            compiled = torch.compile(copy.deepcopy(model), backend="decomp")(x)
    assert len(reports) == 1 and report_steps(reports[0]) == [("silu", "mul"), ("add",)]
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def report_steps(report):
    return [f.steps for f in report.fused]


def test_backend_plan_runners_are_lowered_to_the_operators(device, monkeypatch, mlp):
    """Planning inside the compile: the backend's replacement calls become decomp ops, fused."""
    reports = []
    real = codegen.fusion.fuse_epilogues
    monkeypatch.setattr(codegen.fusion, "fuse_epilogues", lambda gm, **kw: reports.append(real(gm, **kw)) or reports[-1])
    plan = passes.Plan({"fc1.weight": passes.LowRankConfig(8, False), "fc2.weight": passes.LowRankConfig(8, False)})
    mlp = mlp.to(device)
    x = torch.randn(6, 48, device=device)
    with torch.no_grad():
        expected = passes.apply(mlp, plan, progress=False)(x)
        with dispatch.force_kernels():
            compiled = torch.compile(mlp, backend="decomp", options={"plan": plan})(x)
    assert reports and reports[0].lowered == 2
    # fc1 → relu and fc2 → relu: each rewritten linear absorbs its activation
    assert report_steps(reports[0]) == [("relu",), ("relu",)]
    torch.testing.assert_close(compiled, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("on", [False, True])
def test_should_fuse_only_where_kernels_run(on):
    x = torch.randn(2, 3)
    with dispatch.force_kernels(on):
        assert codegen.fusion.should_fuse([x]) is on
