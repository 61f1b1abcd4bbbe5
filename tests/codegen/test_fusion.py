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


def _compile_fused(model, x):
    """Run ``model`` compiled by a backend that fuses the dynamo graph and runs it as it is
    (under forced kernels the graph calls the decomp ops; on CPU they run in the interpreter).
    ``x``: the input, or a dict of keyword inputs."""
    seen = []

    def backend(gm, example_inputs):
        ops_before = {name: _count(gm, name) for name in ("decomp.lowrank_linear", "decomp.quant_linear")}
        seen.append((ops_before, fuse_epilogues(gm), gm))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad(), dispatch.force_kernels():
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        out = compiled(**x) if isinstance(x, dict) else compiled(x)
    return out, seen[0]


def _count(gm, name):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and name in str(n.target))


def test_swiglu_and_residual_chains_become_one_kernel_each(device):
    torch.manual_seed(0)
    model = SwiGLUBlock().eval().to(device)
    x = torch.randn(2, 5, 48, device=device)
    fused, (ops_before, report, gm) = _compile_fused(model, x)
    assert ops_before == {"decomp.lowrank_linear": 2, "decomp.quant_linear": 1}
    # gate → silu → ·up is one kernel, down → +x another: silu, mul and add no longer launch
    assert [(f.op, f.steps) for f in report.fused] == [("lowrank_linear", ("silu", "mul")), ("quant_linear", ("add",))]
    assert report.kernels_removed == 3 and report.round_trips_avoided == 3
    assert _count(gm, "silu") == 0 and _count(gm, "mul") == 0 and _count(gm, "add") == 0
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


def _int4_llama(device, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    dense = LlamaForCausalLM(cfg).eval()
    names = [n for n, p in dense.named_parameters() if p.dim() == 2 and ".layers." in n]
    return passes.apply(dense, passes.Plan({n: IntNConfig(4, 32) for n in names}), progress=False).to(device), cfg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_decode_step_groups_sibling_quantized_linears(device, dtype):
    """One decode step of an int4 Llama: q/k/v become one launch and gate/up one SwiGLU kernel
    (7 quantized-linear kernels per layer → 4), each with the RMSNorm before it folded in (the
    final norm, before the dense lm_head, stays); the logits equal eager's."""
    from transformers import StaticCache

    model, cfg = _int4_llama(device)
    model = model.to(dtype)
    cache = StaticCache(config=cfg, max_cache_len=16)
    ids = torch.tensor([[3, 7, 11, 5]], device=device)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(4, device=device), use_cache=True)
        steps = [{"input_ids": ids[:, -1:], "cache_position": torch.tensor([4], device=device), "past_key_values": c}
                 for c in (cache, copy.deepcopy(cache))]  # fmt: skip
        eager = model(**steps[0], use_cache=True).logits
        compiled, (ops_before, report, gm) = _compile_fused(lambda **kw: model(**kw, use_cache=True).logits, steps[1])
    assert ops_before["decomp.quant_linear"] == 14
    assert [g.pair for g in report.grouped] == [True, True, False, False]  # gate+up per layer, then q/k/v per layer
    assert [len(g.members) for g in report.grouped] == [2, 2, 3, 3]
    assert all(g.norm for g in report.grouped) and _count(gm, "rsqrt") == 1
    groups = _count(gm, "decomp.quant_linear_group")
    assert groups == 4 and _count(gm, "decomp.quant_linear") - groups == 4  # + o_proj and down_proj per layer
    assert report.kernels_removed >= 6 + 4 + 4  # 2 per q/k/v set, 1 per pair, 1 per norm (+ the fused epilogues)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(compiled, eager, rtol=tol, atol=tol)


def test_siblings_stay_apart_beyond_decode_rows(device):
    model, _ = _int4_llama(device, layers=1)
    x = torch.randint(0, 128, (1, 9), device=device)  # 9 rows > GEMV_MAX_M: the GEMM path, one launch per weight
    with torch.no_grad():
        _, (_, report, gm) = _compile_fused(lambda ids: model(input_ids=ids).logits, x)
    assert report.grouped == [] and _count(gm, "decomp.quant_linear_group") == 0


@pytest.mark.parametrize("group", [True, False])
def test_backend_option_group_siblings(device, monkeypatch, group):
    """``options={"group_siblings": False}`` keeps every quantized linear its own launch (the
    benchmark's side-by-side row); the default groups them."""
    from transformers import StaticCache

    reports = []
    real = codegen.fusion.fuse_epilogues
    monkeypatch.setattr(codegen.fusion, "fuse_epilogues", lambda gm, **kw: reports.append(real(gm, **kw)) or reports[-1])
    model, cfg = _int4_llama(device, layers=1)
    cache = StaticCache(config=cfg, max_cache_len=8)
    step = {"input_ids": torch.tensor([[3]], device=device), "cache_position": torch.tensor([0], device=device)}
    torch._dynamo.reset()
    with torch.no_grad(), dispatch.force_kernels():
        options = None if group else {"group_siblings": False}
        torch.compile(model, backend="decomp", options=options)(**step, past_key_values=cache, use_cache=True)
    assert len(reports) == 1 and len(reports[0].grouped) == (2 if group else 0)
