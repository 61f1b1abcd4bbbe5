"""Kernel tests run on CUDA when there is a GPU, else on CPU in Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before triton is imported (it decides how ``@triton.jit``
wraps functions, Triton's own library included), so it is set here, at collection, and only
when no GPU is present: on a GPU machine the same tests launch compiled kernels.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        _INTERPRETER_PROBLEM = "triton was imported before TRITON_INTERPRET=1 could be set; run tests/codegen on its own"
    else:
        os.environ["TRITON_INTERPRET"] = "1"
        _INTERPRETER_PROBLEM = None
else:
    _INTERPRETER_PROBLEM = None

try:
    import triton  # noqa: F401

    _HAS_TRITON = True
except ImportError:
    _HAS_TRITON = False


@pytest.fixture
def device() -> str:
    """Where kernels run: ``cuda``, or ``cpu`` through the interpreter (skipped when impossible)."""
    if not _HAS_TRITON:
        pytest.skip("triton is not installed")
    if _INTERPRETER_PROBLEM:
        pytest.skip(_INTERPRETER_PROBLEM)
    return "cuda" if torch.cuda.is_available() else "cpu"


def assert_close_to_truth(out: torch.Tensor, ref_same_dtype: torch.Tensor, truth: torch.Tensor, what: str = "") -> None:
    """The kernel's error against the fp32 truth is at most twice the eager reference's (same dtype),
    plus a few units of the dtype's rounding at the output's scale.

    Why not ``assert_close`` against the reference: the kernels accumulate and apply epilogues
    in fp32 and round once, the eager reference rounds after every op, so in fp16/bf16 the two
    differ by rounding noise in either direction; what matters is that the kernel is no less
    accurate than eager. In fp32 both sides are tight.
    """
    out, ref, truth = out.float(), ref_same_dtype.float(), truth.float()
    eps = torch.finfo(ref_same_dtype.dtype).eps
    scale = truth.abs().max().clamp_min(1.0)
    err = (out - truth).abs().max()
    bound = 2 * (ref - truth).abs().max() + 4 * eps * scale
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    assert err <= bound, f"{what}: kernel error {err:.3g} > bound {bound:.3g} (eager error {(ref - truth).abs().max():.3g})"


@pytest.fixture
def close_to_truth():
    """:func:`assert_close_to_truth` as a fixture (test modules here do not import each other)."""
    return assert_close_to_truth


def _count_calls(gm, name: str) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and name in str(n.target))


def _compile_fused(model, x):
    """Run ``model`` compiled by a backend that fuses the dynamo graph (``fuse_epilogues``, sibling
    grouping included) and runs it as it is: under forced kernels the graph calls the decomp ops,
    on CPU in the interpreter. ``x``: the input, or a dict of keyword inputs. Returns
    ``(output, (decomp op counts before fusion, FusionReport, graph))``."""
    from codegen import dispatch
    from codegen.fusion import fuse_epilogues

    seen = []

    def backend(gm, example_inputs):
        names = (f"decomp.{op}_linear" for op in ("lowrank", "quant", "monarch", "blockdiag", "int8_outlier", "kronecker"))
        ops_before = {name: n for name in names if (n := _count_calls(gm, name))}  # the operators present
        seen.append((ops_before, fuse_epilogues(gm), gm))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad(), dispatch.force_kernels():
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        out = compiled(**x) if isinstance(x, dict) else compiled(x)
    return out, seen[0]


class _GatedBlock(torch.nn.Module):
    """``silu(gate(x)) * up(x)``: the SwiGLU tail the fusion pass folds into the gate's kernel."""

    def __init__(self, gate, up):
        super().__init__()
        self.gate, self.up = gate, up

    def forward(self, x):
        return torch.nn.functional.silu(self.gate(x)) * self.up(x)


def _assert_gated_tail_fused(gate, up, x, op: str) -> None:
    """Compiled through the fusion pass, ``silu(gate(x)) * up(x)`` over two rewritten linears that
    call ``decomp::{op}`` is one kernel with the ``silu,mul`` epilogue, and computes what eager does."""
    from codegen import dispatch

    model = _GatedBlock(gate, up).eval().to(x.device)
    fused, (ops_before, report, gm) = _compile_fused(model, x)
    assert ops_before == {f"decomp.{op}": 2}
    assert [(f.op, f.steps) for f in report.fused] == [(op, ("silu", "mul"))]
    assert _count_calls(gm, "silu") == 0 and _count_calls(gm, "mul") == 0
    with torch.no_grad(), dispatch.force_kernels(False):
        eager = model(x)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


@pytest.fixture
def gated_tail_fused():
    """:func:`_assert_gated_tail_fused` as a fixture."""
    return _assert_gated_tail_fused


@pytest.fixture
def compile_fused():
    """:func:`_compile_fused`: compile through the fusion pass, return the output and what it did."""
    return _compile_fused


@pytest.fixture
def count_calls():
    """Number of ``call_function`` nodes of a graph whose target's name contains a string."""
    return _count_calls
