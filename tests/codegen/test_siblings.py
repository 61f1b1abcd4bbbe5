"""Sibling grouping (``codegen.siblings``) on int4 Llama decode steps: q/k/v one launch, gate·up one
SwiGLU kernel, the RMSNorm before each folded in — counts and logits against eager — and the
backend option that turns it off."""

from __future__ import annotations

import copy

import pytest
import torch

import codegen.fusion
import passes
from codegen import dispatch
from passes.quant_storage import IntNConfig


def _int4_llama(device, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    dense = LlamaForCausalLM(cfg).eval()
    names = [n for n, p in dense.named_parameters() if p.dim() == 2 and ".layers." in n]
    return passes.apply(dense, passes.Plan({n: IntNConfig(4, 32) for n in names}), progress=False).to(device), cfg


def _decode_step(model, cfg, device, compile_fused):
    """A 4-token prefill into a static cache, then one decode step eager and one compiled through the
    fusion pass (each on its own copy of the cache): ``(eager logits, compiled logits, what fusion did)``."""
    from transformers import StaticCache

    cache = StaticCache(config=cfg, max_cache_len=16)
    ids = torch.tensor([[3, 7, 11, 5]], device=device)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(4, device=device), use_cache=True)
        steps = [{"input_ids": ids[:, -1:], "cache_position": torch.tensor([4], device=device), "past_key_values": c}
                 for c in (cache, copy.deepcopy(cache))]  # fmt: skip
        eager = model(**steps[0], use_cache=True).logits
        compiled, seen = compile_fused(lambda **kw: model(**kw, use_cache=True).logits, steps[1])
    return eager, compiled, seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_decode_step_groups_sibling_quantized_linears(device, dtype, compile_fused, count_calls):
    """One decode step of an int4 Llama: q/k/v become one launch and gate/up one SwiGLU kernel
    (7 quantized-linear kernels per layer → 4), each with the RMSNorm before it folded in (the
    final norm, before the dense lm_head, stays); the logits equal eager's."""
    model, cfg = _int4_llama(device)
    eager, compiled, (ops_before, report, gm) = _decode_step(model.to(dtype), cfg, device, compile_fused)
    assert ops_before["decomp.quant_linear"] == 14
    assert [g.pair for g in report.grouped] == [True, True, False, False]  # gate+up per layer, then q/k/v per layer
    assert [len(g.members) for g in report.grouped] == [2, 2, 3, 3]
    assert all(g.norm for g in report.grouped) and count_calls(gm, "rsqrt") == 1
    groups = count_calls(gm, "decomp.quant_linear_group")
    assert groups == 4 and count_calls(gm, "decomp.quant_linear") - groups == 4  # + o_proj and down_proj per layer
    assert report.kernels_removed >= 6 + 4 + 4  # 2 per q/k/v set, 1 per pair, 1 per norm (+ the fused epilogues)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(compiled, eager, rtol=tol, atol=tol)


def test_siblings_stay_apart_beyond_decode_rows(device, compile_fused, count_calls):
    model, _ = _int4_llama(device, layers=1)
    x = torch.randint(0, 128, (1, 9), device=device)  # 9 rows > GEMV_MAX_M: the GEMM path, one launch per weight
    with torch.no_grad():
        _, (_, report, gm) = compile_fused(lambda ids: model(input_ids=ids).logits, x)
    assert report.grouped == [] and count_calls(gm, "decomp.quant_linear_group") == 0


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


def test_qwen2_biased_qkv_group_with_their_biases(device, compile_fused, count_calls):
    """Qwen2's q/k/v have biases: they still launch as one kernel (each output with its own bias),
    the RMSNorm folded in; gate/up (no bias) stay a SwiGLU pair; the logits equal eager's."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=128, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    dense = Qwen2ForCausalLM(cfg).eval()
    for layer in dense.model.layers:  # random, not zero, biases: a bias on the wrong output shows
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            torch.nn.init.normal_(proj.bias, std=0.5)
    names = [n for n, p in dense.named_parameters() if p.dim() == 2 and ".layers." in n]
    model = passes.apply(dense, passes.Plan({n: IntNConfig(4, 32) for n in names}), progress=False).to(device)
    eager, compiled, (_, report, gm) = _decode_step(model, cfg, device, compile_fused)
    assert sorted((g.pair, len(g.members), g.norm) for g in report.grouped) == [(False, 3, True)] * 2 + [(True, 2, True)] * 2
    assert count_calls(gm, "decomp.quant_linear_group") == 4 and count_calls(gm, "rsqrt") == 1
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
