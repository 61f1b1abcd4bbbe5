"""What a compiled rewritten model checks on every call: dynamo's guards per rewritten module.

A compiled decode step runs its guards on the host before every call; Python-evaluated guards
(``DUPLICATE_INPUT``: "this object is that object") cost microseconds each. Deriving the
quantized format from ``type(config).__name__`` inside ``forward`` added one per quantized
linear after the first (209 on SmolLM2's 210 linears) and, with the config fields, 20 guards per
linear instead of 11 now; the CPU guard check of a 30-layer SmolLM2-structured int4 model went
from 429 to ~320 µs (dense: ~170 µs; ``benchmarks/guard_cost.py``). These tests hold the
per-module guard count where it is now.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

import passes
from codegen import dispatch
from passes.lowrank import LowRankConfig
from passes.lq import LQConfig
from passes.monarch import MonarchConfig
from passes.quant_storage import IntNConfig, NF4Config

WIDTH = 64


def _installed_guards(model: nn.Module, x: torch.Tensor) -> collections.Counter:
    """Guard kinds dynamo installs (those that become checks) when compiling ``model(x)`` on the kernel path."""
    seen = []

    def keep_all(guards):
        seen.extend(guards)
        return [True] * len(guards)

    torch._dynamo.reset()
    with torch.no_grad(), dispatch.force_kernels():
        torch.compile(model, backend=lambda gm, example: gm.forward, options={"guard_filter_fn": keep_all})(x)
    torch._dynamo.reset()
    return collections.Counter(g.guard_type for g in seen if g.orig_guard.code_list)


def _stack(n: int, config) -> nn.Module:
    torch.manual_seed(0)
    dense = nn.Sequential(*[nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(n)]).eval()
    return passes.apply(dense, passes.Plan({f"{i}.weight": config for i in range(n)}), progress=False)


CONFIGS = {
    "int4": IntNConfig(4, 32),
    "nf4 dq": NF4Config(32, double_quant=True),
    "lowrank": LowRankConfig(8, activation_aware=False),
    "lq": LQConfig(8, 4, 32, activation_aware=False),
    "monarch": MonarchConfig(4, activation_aware=False),
}

#: Installed guards per added module besides one tensor check per stored tensor: a type check
#: per module and per ``_modules``/``_parameters``/``_buffers`` dict it is reached through, a
#: constant check per Python value ``forward`` reads (the kernel arguments, bias is None).
#: Measured: 8 for int4 and LQ (5 type, 2 constant, 1 sequence length; 12 when the buffers were
#: read through ``nn.Module.__getattr__`` and the shape apart). A new Python read in a
#: ``forward`` shows up here.
MAX_PER_MODULE = 8


@pytest.mark.parametrize("family", list(CONFIGS))
def test_guards_per_rewritten_module_are_cpp_checks_and_bounded(device, family):
    x = torch.randn(1, WIDTH, device=device)
    two = _installed_guards(_stack(2, CONFIGS[family]).to(device), x)
    four = _installed_guards(_stack(4, CONFIGS[family]).to(device), x)
    added = {k: four[k] - two[k] for k in four if four[k] != two[k]}
    assert "DUPLICATE_INPUT" not in added, f"{family}: Python-evaluated aliasing guards grow with the model: {added}"
    other = sum(n for kind, n in added.items() if kind != "TENSOR_MATCH")
    print(family, added)
    assert other <= 2 * MAX_PER_MODULE, f"{family}: {other / 2:.1f} non-tensor guards per module: {added}"
