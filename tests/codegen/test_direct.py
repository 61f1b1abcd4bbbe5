"""Eager calls on a CUDA tensor skip the operator dispatcher and call each operator's CUDA branch
(``codegen.ops.<op>_cuda``) directly. Here the branch runs its kernels in Triton's interpreter on
CPU tensors (``dispatch._direct`` patched to accept them): every family's module, and a sibling
group, give the torch path's results without ever calling ``torch.ops.decomp``."""

from __future__ import annotations

import pytest
import torch

from codegen import dispatch
from codegen.kernels import dequant as D
from passes.quant_storage import IntNConfig, PackedWeight


@pytest.fixture
def direct(monkeypatch):
    """Eager direct calls on any real tensor; the operators themselves must not be reached."""

    def no_ops():
        raise AssertionError("an eager direct call went through torch.ops.decomp")

    monkeypatch.setattr(dispatch, "_direct", lambda x: type(x) is torch.Tensor)
    monkeypatch.setattr(dispatch, "_ops", no_ops)


def test_every_family_module_calls_its_cuda_branch_directly(direct):
    """A 1-layer Llama whose seven linears are each of another family (low-rank, LQ, Monarch,
    block-diagonal, Kronecker, LLM.int8() with outliers, int4): logits equal the torch path's."""
    import sys
    from pathlib import Path

    from transformers import LlamaConfig, LlamaForCausalLM

    import passes

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from kernel_bench.mixed import TINY, mixed_plan

    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, **TINY)).eval()
    batches = [(torch.randint(0, TINY["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    model = passes.apply(dense, mixed_plan(dense), calibration=batches, progress=False)
    ids = torch.randint(0, TINY["vocab_size"], (1, 5), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        with dispatch.force_kernels(False):
            ref = model(input_ids=ids).logits
        with dispatch.force_kernels():
            out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_sibling_group_calls_its_cuda_branch_directly(direct):
    g = torch.Generator().manual_seed(0)
    packed = [PackedWeight(IntNConfig(4, 32), (48, 64), torch.float32, IntNConfig(4, 32).encode(torch.randn(48, 64, generator=g)))
              for _ in range(2)]  # fmt: skip
    x = torch.randn(1, 64, generator=g)
    with torch.no_grad():
        (y,) = dispatch.quant_linear_group(x, packed, pair=True)
    gate, up = (D.quant_linear_ref(x, p.codes, [p.scale, p.minimum], "int4g32", 64) for p in packed)
    torch.testing.assert_close(y, torch.nn.functional.silu(gate) * up, rtol=1e-5, atol=1e-5)
