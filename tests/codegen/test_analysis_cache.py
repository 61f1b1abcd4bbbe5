"""``codegen.analysis_cache``: torch.compile's per-call analysis of what a kernel writes, memoized
for our kernels on what the analysis reads (kernel, scalar and constexpr values, tensor dtypes)."""

from __future__ import annotations

import pytest
import torch

from codegen import analysis_cache, template


class _Kernel:
    """Stands in for a built kernel (only its identity matters to the memo)."""


@pytest.fixture
def memo(monkeypatch):
    """A memoized analysis over a recording stand-in for torch's, for one 'built' kernel."""
    ours = _Kernel()
    monkeypatch.setattr(template, "built_kernel_ids", lambda: {id(ours)})
    calls = []

    def torch_analysis(kernel, kwargs, tma_descriptor_metadata):
        calls.append(dict(kwargs))
        return ["out_ptr"] if kwargs.get("W", 1) == 1 else ["out0_ptr", "out1_ptr"]

    return ours, analysis_cache._memoized(torch_analysis), calls


def _args(dtype=torch.float16, n=576, w=1):
    return {"x_ptr": torch.empty(2, dtype=dtype), "out_ptr": torch.empty(2, dtype=dtype), "N": n, "W": w, "EPS": 1e-5}


def test_one_analysis_per_kernel_and_signature(memo):
    ours, analysis, calls = memo
    for _ in range(30):  # 30 layers, one signature
        assert analysis(ours, _args(), {}) == ["out_ptr"]
    assert len(calls) == 1
    # what the TTIR is generated from selects a new analysis: a scalar, a constexpr, a tensor dtype
    assert analysis(ours, _args(n=1536), {}) == ["out_ptr"]
    assert analysis(ours, _args(w=3), {}) == ["out0_ptr", "out1_ptr"]
    assert analysis(ours, _args(dtype=torch.bfloat16), {}) == ["out_ptr"]
    assert len(calls) == 4


def test_callers_get_their_own_copy(memo):
    ours, analysis, _ = memo
    first = analysis(ours, _args(), {})
    first.append("x_ptr")  # a caller changing its result does not change the next caller's
    assert analysis(ours, _args(), {}) == ["out_ptr"]


def test_other_kernels_and_unknown_arguments_go_to_torch_every_time(memo):
    ours, analysis, calls = memo
    other = _Kernel()
    for _ in range(3):
        analysis(other, _args(), {})
    assert len(calls) == 3
    analysis(ours, _args(), {})  # memoized from here on
    for _ in range(2):
        analysis(ours, _args(), {"x_ptr": ("tma",)})  # TMA descriptors: not in the key
        analysis(ours, {**_args(), "odd": object()}, {})  # an argument of a kind the key does not know
    assert len(calls) == 8


def test_symbolic_sizes_share_an_entry(memo):
    ours, analysis, calls = memo
    import sympy

    analysis(ours, {**_args(), "N": sympy.Symbol("s0")}, {})
    analysis(ours, {**_args(), "N": sympy.Symbol("s1") + 1}, {})  # torch stands every symbol in by 2
    assert len(calls) == 1


def test_installed_on_torchs_analysis_by_the_operators():
    from torch._higher_order_ops import triton_kernel_wrap as wrap

    import codegen.ops  # noqa: F401  (installs)

    names = [n for n in analysis_cache.ANALYSES if hasattr(wrap, n)]
    assert names, "this torch has none of the analyses the memo knows: update ANALYSES"
    assert all(hasattr(getattr(wrap, n), "decomp_original") for n in names)
    assert analysis_cache.install() == names  # idempotent: not wrapped twice
    assert not hasattr(getattr(wrap, names[0]).decomp_original, "decomp_original")
